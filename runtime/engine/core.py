"""`runtime.Engine`: the offline, single-process engine. All three stages, continuous batching."""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from epdlang.errors import InvalidRequest
from epdlang.sampling import SamplingParams
from runtime.config import DECODE_WAIT_ROWS, EngineConfig
from runtime.engine.admission import check_fits
from runtime.engine.calibrate import Budgets, calibrate
from runtime.engine.completion import Completion, merge_deltas
from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.engine.encoder_cache import EncoderCache
from runtime.engine.kv_setup import build_kv, build_kv_manager
from runtime.engine.model_runner import Chunk, ChunkLogits, ModelRunner
from runtime.engine.overlap import OverlapChooser
from runtime.engine.request import Req, Status
from runtime.engine.sampler import SamplingState, prompt_logprobs, sample
from runtime.engine.scheduler import Scheduler
from runtime.engine.threads import ThreadShare
from runtime.messages import GenerateRequest, RequestOutput
from runtime.models import load_model
from runtime.preprocess import Processor

if TYPE_CHECKING:
    from runtime.engine.grammar import GrammarCompiler

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None, **overrides: Any) -> None:
        self.config = (config or EngineConfig()).replace(**overrides)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.model_path = str(model)
        self.processor = Processor(model)
        self.model = load_model(model, dtype=getattr(torch, self.config.dtype), device=self.config.device,
                                load_vision=self.config.load_vision, load_lm=self.config.load_lm,
                                attn_backend=self.config.attention_backend, linear_backend=self.config.linear_backend)
        self.kv_pool = build_kv(self.model.config, self.config)
        self.kv = build_kv_manager(self.kv_pool, self.config, self.model.config.image_token_id)
        self.encoder_cache = EncoderCache(self.config.encoder_cache_bytes)
        self.runner = ModelRunner(self.model, self.kv_pool, self.model.config.image_token_id)
        self.scheduler = Scheduler(self.config, self.kv, self.encoder_cache)
        if self.config.tpot_target_ms and self.model.lm is not None:
            self._apply_budgets()
        self.reqs: dict[str, Req] = {}
        self.stats: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()  # forward-pass time by stage: encode, prefill, mixed, decode
        self.stage_passes: Counter[str] = Counter()
        self._grammar = None
        both = None not in (self.model.visual, self.model.lm)
        overlap = self.config.overlap_encode is not False and both
        self.threads = ThreadShare(split=self.config.device == "cpu" and both)
        self.overlap = OverlapChooser(self.config.overlap_encode)
        self._lm_busy = False
        self._last_decode = 0.0
        self._encoder_pool = ThreadPoolExecutor(1, thread_name_prefix="encoder") if overlap else None
        self._encode_job: tuple[Future, list] | None = None
        self.wait_s: float | None = 0.0

    def _apply_budgets(self) -> None:
        defaults = Budgets(self.config.max_running, self.config.prefill_token_budget, self.config.encode_tokens)
        b = calibrate(self.model, self.kv_pool, self.kv.allocator, self.config.tpot_target_ms, defaults)
        self.scheduler.max_running = b.max_running
        self.scheduler.prefill_budget = b.prefill_token_budget
        self.scheduler.encode_budget = b.encode_token_budget
        self.budgets = b

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, *, messages: list | None = None, prompt: str | None = None,
                    input_ids: Sequence[int] | None = None, images: Sequence[Any] = (),
                    sampling_params: SamplingParams | None = None, rid: str | None = None,
                    priority: int = 0) -> str:
        """Preprocess and queue one request. Raises a typed `InvalidRequest` subclass on bad input."""
        params = sampling_params or SamplingParams()
        prepared = self.processor.prepare(messages, prompt=prompt, input_ids=input_ids, images=images)
        msg = GenerateRequest(rid=rid or uuid.uuid4().hex, input_ids=prepared.input_ids,
                              images=prepared.images, sampling=params, priority=priority)
        return self.submit(msg)

    def submit(self, msg: GenerateRequest) -> str:
        """Queue an already-tokenized request."""
        if msg.rid in self.reqs:
            raise InvalidRequest(f"request id {msg.rid!r} is already in flight")
        self._check_fits(msg)
        req = self._make_req(msg)
        self.reqs[msg.rid] = req
        self.scheduler.add(req)
        return msg.rid

    def _check_fits(self, msg: GenerateRequest) -> None:
        check_fits(msg, self.config, self.model.config.vocab_size, self.kv.total_pages * self.config.page_size)

    def _make_req(self, msg: GenerateRequest) -> Req:
        grids = [img.grid_thw for img in msg.images]
        positions, delta = self.model.rope_positions(list(msg.input_ids), grids)
        params = msg.sampling
        eos = () if params.ignore_eos else self.processor.eos_token_ids
        req = Req(msg=msg, positions=positions, rope_delta=delta,
                  detok=IncrementalDetokenizer(self.processor.tokenizer, params, eos, msg.input_ids),
                  sampling_state=self._sampling_state(msg),
                  image_embeds=[None] * len(msg.images))
        if params.prompt_logprobs_start == 0:
            req.prompt_logprobs.append(None)
        return req

    def _sampling_state(self, msg: GenerateRequest) -> SamplingState:
        params = msg.sampling
        grammar = None
        if params.regex or params.json_schema:
            grammar = self.grammar_compiler().compile(regex=params.regex, json_schema=params.json_schema)
        return SamplingState(params, prompt_ids=msg.input_ids, eos_ids=self.processor.eos_token_ids,
                             grammar=grammar)

    def grammar_compiler(self) -> "GrammarCompiler":
        from runtime.engine.grammar import GrammarCompiler

        if self._grammar is None:
            self._grammar = GrammarCompiler(self.processor.tokenizer,
                                            json_whitespace_flexible=self.config.json_whitespace_flexible)
        return self._grammar

    # ---- the loop -----------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """True while any request is queued, running, or finished with its last output not yet returned."""
        return bool(self.reqs) or self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """One scheduler step. Afterwards `wait_s` says how long a loop may wait for outside input before the
        next step is worth taking: 0 (step at once), seconds (held decode rows), or None (until input comes)."""
        encoded = self._finish_encode(wait=False)
        hold = (self._encoding_beside() and len(self.scheduler.running) < DECODE_WAIT_ROWS
                and time.perf_counter() - self._last_decode < self.config.decode_wait_s)
        plan = self.scheduler.schedule(allow_encode=self.model.visual is not None and self._encode_job is None,
                                       decode_alone=not hold)
        self._lm_busy = bool(plan.prefill)  # decode steps are short: beside them the encoder keeps every thread
        if plan.encode:
            self._start_encode(plan.encode, beside_lm=bool(plan.decode or plan.prefill))
        batches = [(plan.decode, True), (plan.prefill, False)]
        if self.config.mixed_batches and plan.decode and plan.prefill:
            batches = [(plan.decode + plan.prefill, False)]  # decode rows first: `num_decode` of the pass
        elif self.config.schedule_policy == "prefill-first":
            batches.reverse()
        ran_lm = False
        self.threads.apply(self._encoding_beside())
        for chunks, is_decode in batches:
            if chunks:
                self._run_lm(chunks, is_decode)
                ran_lm = True
        if not ran_lm:  # nothing else to do: wait for the encoder (held decode rows: until their wait ends)
            encoded |= self._finish_encode(wait=True, timeout=self._hold_left() if hold else None)
        # Held rows whose tower runs elsewhere (a RoleEngine's encode jobs) leave `_finish_encode` at once: the
        # loop then sleeps out the hold instead of spinning through empty steps, which took the tower's core.
        busy = ran_lm or plan.encode or encoded
        self.wait_s = 0.0 if busy else self._hold_left() if hold else None
        return self._collect_outputs()

    def _hold_left(self) -> float:
        return max(0.0, self._last_decode + self.config.decode_wait_s - time.perf_counter())

    def _start_encode(self, picked: list[tuple[Req, int]], beside_lm: bool) -> None:
        """Run the vision tower for `picked`: on the encoder thread when overlap is on and LM work runs beside
        it, else here. (Alone, the tower ran 30-60% slower on the encoder thread after decode steps than on
        this one: page faults and involuntary switches, measured per request in docs/performance.md.)"""
        todo: dict[str, tuple[Any, list[tuple[Req, int]]]] = {}
        for req, i in picked:
            image = req.msg.images[i]
            todo.setdefault(image.content_hash, (image, []))[1].append((req, i))
        images = [image for image, _ in todo.values()]
        beside = beside_lm and bool(self._encoder_pool) and self.overlap.beside()
        job = lambda: self._timed_encode(images)  # noqa: E731
        future = self._encoder_pool.submit(job) if beside else _done(job)
        self._encode_job = (future, list(todo.values()))

    def set_num_threads(self, n: int) -> None:
        """Every stage uses `n` torch threads from now on (`torch.set_num_threads` alone would be undone at the
        next step, which restores the engine's own count)."""
        self.threads.set_total(n)

    def _encoding_beside(self) -> bool:
        return self._encode_job is not None and not self._encode_job[0].done()

    def _timed_encode(self, images: list) -> list[torch.Tensor]:
        self.threads.apply(self._lm_busy and not self.threads.on_loop_thread())
        t0 = time.perf_counter()
        pixels = [self.processor.tower_pixels(im.pixel_values) for im in images]
        out = self.runner.encode(pixels, [im.grid_thw for im in images])
        seconds = time.perf_counter() - t0
        self.stage_seconds["encode"] += seconds
        self.overlap.record("tower", seconds)
        self.stage_passes["encode"] += 1
        return out

    def _finish_encode(self, wait: bool, timeout: float | None = None) -> bool:
        """Collect the encode in flight if it is done (with `wait`: once it is, or `timeout` seconds passed)."""
        if self._encode_job is None:
            return False
        future, todo = self._encode_job
        if wait and timeout is not None:
            futures_wait([future], timeout=max(0.0, timeout))
        if not (future.done() or (wait and timeout is None)):
            return False
        self._encode_job = None
        for (image, users), emb in zip(todo, future.result()):
            self.encoder_cache.put(image.content_hash, emb)
            for req, i in users:
                req.image_embeds[i] = emb
        self.stats["images_encoded"] += len(todo)
        return True

    def _run_lm(self, chunks: list[Chunk], is_decode: bool) -> None:
        t0 = time.perf_counter()
        with self.threads.one_row_pass(sum(c.num_tokens for c in chunks), self._encoding_beside()):
            results = self.runner.run(chunks, is_decode)
        self._sample(chunks, results)
        decoded = sum(1 for c in chunks if c.generated)
        if decoded:
            self._last_decode = time.perf_counter()
        stage = "decode" if is_decode else "mixed" if decoded else "prefill"
        seconds = time.perf_counter() - t0
        self.stage_seconds[stage] += seconds
        self.overlap.record("lm", seconds)
        self.stage_passes[stage] += 1
        self.stats["decode_tokens"] += decoded
        self.stats["prefill_tokens"] += sum(c.num_tokens for c in chunks) - decoded

    def _sample(self, chunks: list[Chunk], results: list[ChunkLogits]) -> None:
        for chunk, res in zip(chunks, results):
            self._advance(chunk, res)
        sampling = [(c.req, r.sample) for c, r in zip(chunks, results) if r.sample is not None]
        for req, _ in [s for s in sampling if s[0].msg.sampling.max_new_tokens == 0]:
            req.finish_reason = "length"  # prefill only: nothing to sample
            self.scheduler.remove(req, cache=True)
        sampling = [s for s in sampling if not s[0].finish_reason]
        if not sampling:
            return
        out = sample(torch.stack([lg for _, lg in sampling]), [r.sampling_state for r, _ in sampling])
        for (req, _), token, lp in zip(sampling, out.token_ids, out.logprobs):
            self._append_token(req, token, lp)

    def _advance(self, chunk: Chunk, res: ChunkLogits) -> None:
        req = chunk.req
        req.num_computed = chunk.end
        if res.prompt is not None:
            targets = req.token_ids(res.prompt_rows.start + 1, res.prompt_rows.stop + 1)
            top_n = req.msg.sampling.logprobs or 0
            req.prompt_logprobs.extend(prompt_logprobs(res.prompt, targets, top_n))
        if chunk.samples and req.status is Status.WAITING:
            self.kv.cache_computed(req)
            req.status = Status.RUNNING
            self.scheduler.waiting.remove(req)
            self.scheduler.running.append(req)

    def _append_token(self, req: Req, token: int, logprob: Any) -> None:
        req.output_ids.append(token)
        req.pending_ids.append(token)
        if logprob is not None:
            req.pending_logprobs.append(logprob)
        step = req.detok.append(token, req.sampling_state.grammar_terminated)
        req.pending_text += step.new_text
        if step.finished:
            req.finish_reason, req.matched_stop = step.finish_reason, step.matched_stop
        elif req.seq_len >= self.config.max_model_len:
            req.finish_reason = "length"
        if req.finish_reason:
            self.scheduler.remove(req, cache=True)

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for req in list(self.reqs.values()):
            if not req.pending_ids and not req.finish_reason:
                continue
            outputs.append(self._delta(req))
            if req.finish_reason:
                del self.reqs[req.rid]
        return outputs

    def _delta(self, req: Req) -> RequestOutput:
        send_prompt_lps = not req.prompt_logprobs_sent and (req.output_ids or req.finish_reason)
        req.prompt_logprobs_sent = req.prompt_logprobs_sent or bool(send_prompt_lps)
        out = RequestOutput(
            rid=req.rid, new_token_ids=tuple(req.pending_ids), new_text=req.pending_text,
            finished=req.finish_reason is not None, finish_reason=req.finish_reason,
            matched_stop=req.matched_stop, prompt_tokens=req.prompt_len,
            completion_tokens=len(req.output_ids), cached_tokens=req.cached_tokens,
            logprobs=tuple(req.pending_logprobs),
            prompt_logprobs=tuple(req.prompt_logprobs) if send_prompt_lps else (), error=req.error)
        req.pending_ids, req.pending_logprobs, req.pending_text = [], [], ""
        return out

    def abort(self, rid: str) -> bool:
        """Cancel a request at any stage; its pages go back at once."""
        req = self.reqs.get(rid)
        if req is None or req.finish_reason:
            return False
        self.scheduler.remove(req, cache=False)
        req.finish_reason = "abort"
        return True

    def fail_all(self, reason: str) -> list[RequestOutput]:
        """Finish every request in flight with an error (used when a step itself failed)."""
        for req in list(self.reqs.values()):
            if not req.finish_reason:
                self.scheduler.remove(req, cache=False)
                req.finish_reason, req.error = "error", reason
        return self._collect_outputs()

    def flush_cache(self) -> bool:
        """Drop cached prefixes and encoder outputs that no request is using."""
        self.encoder_cache.clear()
        return self.kv.flush()

    # ---- convenience --------------------------------------------------------------------------
    def generate(self, requests: Iterable[dict] | dict, sampling_params: SamplingParams | None = None,
                 max_steps: int = 1_000_000) -> list[Completion]:
        """Run requests to completion. Each request is a dict of `add_request` keyword arguments."""
        batch = [requests] if isinstance(requests, dict) else list(requests)
        rids = [self.add_request(**({"sampling_params": sampling_params} | r)) for r in batch]
        acc: dict[str, list[RequestOutput]] = {rid: [] for rid in rids}
        for _ in range(max_steps):
            if all(d and d[-1].finished for d in acc.values()):
                break
            for out in self.step():
                if out.rid in acc:
                    acc[out.rid].append(out)
        return [merge_deltas(rid, acc[rid]) for rid in rids]

    def snapshot(self) -> dict[str, float]:
        """Queue depth, KV and cache figures, and the stats counters (call it on the engine's thread)."""
        kv, sched, enc = self.kv, self.scheduler, self.encoder_cache
        used, total = kv.used_pages(), kv.total_pages
        radix = getattr(kv, "cache", None)  # None without a prefix cache
        cached = radix.cached_pages if radix is not None else 0
        lookups = enc.hits + enc.misses
        return {
            "num_waiting_requests": len(sched.waiting), "num_running_requests": len(sched.running),
            "kv_used_pages": used, "kv_cached_pages": cached, "kv_request_pages": used - cached,
            "kv_total_pages": total, "kv_usage": used / total if total else 0.0,
            "encoder_cache_hit_rate": enc.hits / lookups if lookups else 0.0,
            **({"prefix_cache_hit_rate": radix.hit_rate} if radix is not None else {}),
            "num_preemptions": sched.num_preemptions, "num_requests_in_engine": len(self.reqs),
        } | {f"stats_{k}": v for k, v in self.stats.items()} | self.stage_figures()

    def stage_figures(self) -> dict[str, float]:
        """`stage_seconds_<stage>` and `stage_passes_<stage>` so far: what serving's steps cost, per stage."""
        return ({f"stage_seconds_{k}": v for k, v in self.stage_seconds.items()}
                | {f"stage_passes_{k}": v for k, v in self.stage_passes.items()})

    def check_integrity(self) -> None:
        self.kv.check_integrity(self.scheduler.requests())

    def integrity(self) -> dict[str, Any]:
        """Page accounting (free + cached + in use = total) and whether the cache invariants hold."""
        radix = getattr(self.kv, "cache", None)
        cached = radix.cached_pages if radix is not None else 0
        free, total = self.kv.allocator.num_free, self.kv.total_pages
        in_use = sum(len(r.pages) - r.num_shared_pages for r in self.scheduler.requests())
        error = None if free + cached + in_use == total else f"{free} + {cached} + {in_use} != {total} pages"
        try:
            self.check_integrity()
        except AssertionError as exc:
            error = error or str(exc) or "integrity check failed"
        return {"ok": error is None, "error": error, "free": free, "cached": cached, "in_use": in_use,
                "total": total, "requests": len(self.reqs)}


def _done(fn) -> Future:
    future: Future = Future()
    future.set_result(fn())
    return future
