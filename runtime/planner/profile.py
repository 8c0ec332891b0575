"""Stage costs measured by running the model here, cached as JSON per model and machine.

Every figure is the best of a few timed runs after a warm-up, in ms, per torch thread count (the
least disturbed by other programs on the machine, as in runtime/engine/calibrate.py):
- encode: the vision tower on real images of the workload, by image tokens and batch size;
- prefill: one engine step (forward and sampling) over a prompt of N tokens;
- decode: one engine step of B running requests at context C (and whether the attention backend's cost
  follows the batch's mean context or, padded, its longest: `decode_context`);
- transfer: hand-over of N bytes on each data plane (shm, zmq), fitted as fixed + per-byte;
- front: the API server process's CPU for one request of each shape, through a real `epd serve` and HTTP
  (runtime/planner/front.py: body, JSON, image decode, patchify, tokenize, the router's hand-over), the
  median of a few requests;
- stream: the CPU one streamed token costs the API server (`stream_ms_per_token`) and, apart, the client
  (`client_ms_per_token`), through the same server (without /proc: a microbenchmark of wire encode, zmq,
  the SSE chunk's JSON and its parse for the server, a lower bound, and 0 for the client).
Measurements the cache lacks (a new image size, say) are taken and added when first needed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.engine.calibrate import best_ms
from runtime.planner.front import FrontMeter, can_measure

log = logging.getLogger(__name__)
VERSION = 6  # 2: LM stages at the table's thread count (v1 ran them at every core); 3: front and stream via HTTP;
# 4: decode rows with every request running through the timed steps; 5: SDPA decode grouped by context (mean);
# 6: encode includes expanding the compact uint8 pixels the API server now sends (and front their smaller copy)
THREADS_KEY = "threads"
PREFILL_TOKENS = (16, 64, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 4, 16, 32, 64, 128)
DECODE_CONTEXTS = (128, 1024)
ENCODE_BATCHES = (1, 2, 4)
DECODE_STEPS = 4
TRANSFER_BYTES = (1 << 16, 1 << 20, 8 << 20)


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count() or 1, "torch": torch.__version__,
            "machine": platform.machine()}


def model_key(model_dir: Path) -> str:
    h = hashlib.sha1((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:12]


def cache_path(model_dir: Path, cache_dir: Path) -> Path:
    machine = hashlib.sha1(json.dumps(machine_info(), sort_keys=True).encode()).hexdigest()[:8]
    return cache_dir / f"{model_dir.name}-{model_key(model_dir)}-{machine}.json"


def load_or_new(path: Path, model_dir: Path) -> dict[str, Any]:
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("version") == VERSION:
            return data
    return {"kind": "epd-profile", "version": VERSION, "source": "measured on this machine by `epd plan`",
            "model": str(model_dir), "model_key": model_key(model_dir), "machine": machine_info(),
            THREADS_KEY: {}, "front_ms": {}}


def save(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


class Profiler:
    """Takes the measurements a profile lacks, on one in-process engine (E and LM weights)."""

    def __init__(self, model_dir: Path, data: dict[str, Any]) -> None:
        from runtime.engine.core import Engine

        self.data, self.model_dir, self._front = data, model_dir, None
        self.engine = Engine(model_dir, enable_prefix_cache=False, overlap_encode=False)
        proc = self.engine.processor
        special = set(proc.tokenizer.all_special_ids) | {proc.image_token_id, proc.vision_start_id, proc.vision_end_id}
        self.plain = np.array([i for i in range(min(proc.vocab_size, 5000)) if i not in special])
        self.rng = np.random.default_rng(0)
        kv = self.engine.kv_pool
        per_token = 2 * kv.num_layers * kv.k.shape[2] * kv.k.shape[3] * kv.k.element_size()
        data["kv_bytes_per_token"] = int(per_token)
        data["embed_bytes_per_token"] = int(self.engine.model.config.hidden_size * 4)
        data["decode_context"] = self.engine.model.backend.decode_cost_by

    def table(self, threads: int) -> dict[str, Any]:
        t = self.data[THREADS_KEY].setdefault(str(threads), {})
        for key in ("encode_ms", "prefill_ms", "decode_ms"):
            t.setdefault(key, {})
        return t

    def ensure(self, threads: int, images: dict[int, Any]) -> bool:
        """Measure what is missing at `threads`; `images` maps image tokens -> one ImageInput. True if it measured."""
        self.engine.set_num_threads(threads)
        t = self.table(threads)
        before = json.dumps(t, sort_keys=True)
        for tokens, image in sorted(images.items()):
            if str(tokens) not in t["encode_ms"] and self.engine.model.visual is not None:
                t["encode_ms"][str(tokens)] = {str(b): self._encode(image, b) for b in ENCODE_BATCHES}
        for n in PREFILL_TOKENS:
            t["prefill_ms"].setdefault(str(n), self._prefill(n))
        for ctx in DECODE_CONTEXTS:
            row = t["decode_ms"].setdefault(str(ctx), {})
            for b in DECODE_BATCHES:
                if str(b) not in row and self._fits(b, ctx):
                    row[str(b)] = self._decode(b, ctx)
        return json.dumps(t, sort_keys=True) != before

    def _encode(self, image: Any, batch: int) -> float:
        runner, tower_pixels = self.engine.runner, self.engine.processor.tower_pixels  # expanding, as serving does
        return best_ms(lambda: runner.encode([tower_pixels(image.pixel_values) for _ in range(batch)],
                                             [tuple(image.grid_thw)] * batch))

    def _ids(self, n: int) -> tuple[int, ...]:
        return tuple(int(x) for x in self.rng.choice(self.plain, n))

    def _submit(self, n: int, max_new: int) -> str:
        from epdlang.sampling import SamplingParams
        from runtime.messages import GenerateRequest

        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
        msg = GenerateRequest(rid=f"profile-{self.rng.integers(1 << 62)}", input_ids=self._ids(n), sampling=params)
        return self.engine.submit(msg)

    def _drain(self) -> None:
        while self.engine.has_unfinished():
            self.engine.step()

    def _prefill(self, n: int) -> float:
        def one() -> None:
            self._submit(n, 1)
            self.engine.step()
            self._drain()

        log.info("profiling prefill of %d tokens", n)
        return best_ms(one)

    @staticmethod
    def _decode_len(batch: int) -> int:
        return DECODE_STEPS + 2 + batch

    def _fits(self, batch: int, ctx: float) -> bool:
        """Whether the KV pool holds `batch` requests at `ctx` to the end of their outputs (else the point is
        left out, and costs past the last measured batch extend along the last segment)."""
        per_request = int(ctx) + self._decode_len(batch) + self.engine.config.page_size  # a partly used last page
        return batch * per_request <= self.engine.kv_pool.k.shape[1]

    def _decode(self, batch: int, ctx: float) -> float:
        """One step of `batch` running requests at context `ctx`. Their outputs are long enough that none ends
        while the steps are timed: the budget prefills them in waves, so with short outputs the first wave
        finished early and the "batch of 64" steps ran 16 to 48 rows (profile version 3 read 64 as ~16)."""
        eng = self.engine
        rids = [self._submit(int(ctx), self._decode_len(batch)) for _ in range(batch)]
        while any(not r.output_ids for r in eng.reqs.values()):
            eng.step()
        times = []
        for _ in range(DECODE_STEPS):
            if len(eng.scheduler.running) != batch:
                raise RuntimeError(f"profiling decode: {len(eng.scheduler.running)} of {batch} requests running")
            t0 = time.perf_counter()
            eng.step()
            times.append((time.perf_counter() - t0) * 1000.0)
        for rid in rids:
            eng.abort(rid)
        self._drain()
        log.info("profiled decode batch %d context %d: %.2f ms", batch, ctx, min(times))
        return min(times)

    def front(self, key: str, messages: list[dict], num_images: int = 0) -> float:
        """The API server's CPU for one request of this shape (cached by `key`); without /proc (not Linux),
        its preprocessing alone."""
        if key not in self.data["front_ms"]:
            if can_measure():
                self.data["front_ms"][key] = self.meter().ms(messages)
            else:
                proc = self.engine.processor
                self.data["front_ms"][key] = best_ms(lambda: proc.prepare(messages))
        return self.data["front_ms"][key]

    def meter(self) -> FrontMeter:
        if self._front is None:
            log.info("starting a colocated epd serve to time the API server")
            self._front = FrontMeter(self.model_dir)
        return self._front

    def close(self) -> None:
        if self._front is not None:
            self._front.close()
            self._front = None

    def transfers(self) -> None:
        if "transfer" not in self.data:
            self.data["transfer"] = {name: fit_transfer(name) for name in ("shm", "zmq")}
        if "client_ms_per_token" not in self.data:  # profiles before it held server and client as one figure
            server, client = self.meter().stream_costs() if can_measure() else (stream_ms_per_token(), 0.0)
            self.data["stream_ms_per_token"], self.data["client_ms_per_token"] = server, client


def stream_ms_per_token(tokens: int = 200) -> float:
    import zmq

    from runtime.cluster import wire
    from runtime.messages import RequestOutput

    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = tx.bind_to_random_port("tcp://127.0.0.1")
    rx.connect(f"tcp://127.0.0.1:{port}")
    out = RequestOutput(rid="chatcmpl-" + "0" * 24, new_token_ids=(42,), new_text=" word", completion_tokens=1)

    def stream() -> None:
        for _ in range(tokens):
            tx.send_multipart(wire.encode(wire.Outputs((out,))))
            msg, _ = wire.decode(rx.recv_multipart())
            delta = {"content": msg.outputs[0].new_text}
            chunk = json.dumps({"id": msg.outputs[0].rid, "object": "chat.completion.chunk", "model": "m",
                                "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            json.loads(f"data: {chunk}\n\n"[6:])

    try:
        return best_ms(stream) / tokens
    finally:
        tx.close(0)
        rx.close(0)
        ctx.term()


def fit_transfer(name: str) -> dict[str, float]:
    """fixed_ms + ms_per_byte * n for a hand-over of n bytes: allocate, fill, seal, open, release."""
    from runtime.cluster.transfer import make_transfer, sweep_segments

    prefix = f"epd-profile-{os.getpid()}"
    backend = make_transfer(name, prefix)
    xs, ys = [], []
    try:
        for nbytes in TRANSFER_BYTES:
            src = torch.ones(nbytes // 4)

            def hand_over(src: torch.Tensor = src) -> None:
                handle, buf = backend.allocate(src.dtype, tuple(src.shape))
                buf.copy_(src)
                del buf
                backend.seal(handle)
                frames = backend.frames(handle)
                out = backend.open(handle, [bytes(f) if name == "zmq" else f for f in frames],
                                   dtype=src.dtype, shape=tuple(src.shape))
                float(out[-1])
                backend.release(handle)

            xs.append(nbytes)
            ys.append(best_ms(hand_over))
    finally:
        sweep_segments(prefix)
    slope, fixed = np.polyfit(xs, ys, 1)
    return {"fixed_ms": max(0.0, float(fixed)), "ms_per_byte": max(0.0, float(slope))}
