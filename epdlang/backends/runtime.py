"""`epd.Runtime`: a local runtime used as a DSL backend. Every compiler pass takes effect here."""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Sequence

from epdlang.backends.base import Backend, OnText, pick_choice
from epdlang.errors import EpdError
from epdlang.ir import Expr, Image
from epdlang.sampling import SamplingParams
from epdlang.template import template_for

log = logging.getLogger(__name__)
MAX_CACHED_IMAGES = 256


class Runtime(Backend):
    """Starts a local runtime for `model` (default: the embedded trained shapes Qwen2-VL, docs/shapes_model.md;
    any served family).

    `instances` is a topology spec (`EPD`, `E,PD`, `E,P,D`, `2E,P,D`, ... or a YAML file): every instance
    is its own process behind the router, exactly as `epd serve` runs them. Engine config overrides
    (page_size, kv_cache_bytes, ...) pass through. With `ray` (`"local"`, `"auto"`, `HOST:PORT`) the instances
    are placed on a Ray cluster instead, as `epd serve --ray` does. With `role_switching=True`, moves follow the
    planner's model for `slo` (a `runtime.config.Slo`; default 3000/100 ms) once `epd plan` has profiled the
    model here, as under `epd serve --role-switching`. Close it, or use it as a context manager.
    """

    encode_ahead_supported = prefix_sharing_supported = scoring_supported = True

    def __init__(self, model: str | Path | None = None, instances: str = "EPD", ray: str | None = None,
                 slo: Any = None, **engine_overrides: Any) -> None:
        from runtime.cluster.deployment import Deployment
        from runtime.cluster.topology import parse_topology
        from runtime.planner.switching import move_chooser

        if model is None:
            from runtime.tiny_model import SHAPES_CHECKPOINT

            model = SHAPES_CHECKPOINT
        topology = parse_topology(instances)
        chooser = move_chooser(model, topology, slo, **engine_overrides)
        self.deployment = Deployment(model, topology, ray=ray, move_chooser=chooser, **engine_overrides)
        self.processor = self.deployment.processor
        self.chat_template = template_for(self.processor.model_type)
        self._images: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def stats(self) -> Counter[str]:
        """Counters summed over the instances (images_encoded, prefill_tokens, decode_tokens, ...)."""
        snap = self.deployment.snapshot_now()
        return Counter({k.removeprefix("stats_"): v for k, v in snap.items() if k.startswith("stats_")})

    # ---- prompts ----------------------------------------------------------------------------
    async def _image_inputs(self, images: Sequence[Image]) -> list[Any]:
        with self._lock:
            missing = list({img.key: img for img in images if img.key not in self._images}.values())
        if missing:
            done = await asyncio.to_thread(lambda: [self.processor.image_input(img.source) for img in missing])
            with self._lock:
                for img, inp in zip(missing, done):
                    self._images[img.key] = inp
                while len(self._images) > MAX_CACHED_IMAGES:
                    self._images.popitem(last=False)
        with self._lock:
            return [self._images[img.key] for img in images]

    async def _prepare(self, pieces: Sequence[Expr]) -> Any:
        text, images = self.chat_template.render(pieces)
        return self.processor.prepare(prompt=text, images=await self._image_inputs(images))

    async def _run(self, input_ids: Sequence[int], images: Sequence[Any], params: SamplingParams,
                   session_id: str | None, on_text: OnText | None = None) -> tuple[str, Any]:
        from runtime.messages import GenerateRequest

        msg = GenerateRequest(rid=uuid.uuid4().hex, input_ids=tuple(input_ids), images=tuple(images), sampling=params,
                              session_id=session_id)
        chunks, last = [], None
        async for out in self.deployment.generate(msg):
            if out.new_text:
                chunks.append(out.new_text)
                if on_text is not None:
                    on_text(out.new_text)
            last = out
        if last is None or last.error or last.finish_reason == "abort":
            raise EpdError(f"request failed: {last.error if last else 'no output'}")
        return "".join(chunks), last

    # ---- backend ----------------------------------------------------------------------------
    async def encode_ahead(self, images: Sequence[Image]) -> None:
        """Preprocess every image now and send them all to the E instances at once, so they are encoded
        in parallel while the program's first statements are prepared; the prefills then find them in an
        encoder cache. An image that cannot be read is skipped here; its statement raises when it runs."""
        readable = []
        for img in images:
            try:
                readable += await self._image_inputs([img])
            except EpdError:
                continue
        if readable:
            self.deployment.encode_ahead(list({inp.content_hash: inp for inp in readable}.values()))

    async def add_image(self, image: Image) -> None:
        await self._image_inputs([image])

    async def prefill(self, pieces: Sequence[Expr], *, session_id: str | None = None) -> dict[str, Any]:
        if not pieces:
            return {}
        prepared = await self._prepare(pieces)
        _, out = await self._run(prepared.input_ids, prepared.images, SamplingParams(max_new_tokens=0), session_id)
        return _meta(out)

    async def generate(self, pieces: Sequence[Expr], params: SamplingParams, on_text: OnText, *,
                       session_id: str | None = None) -> tuple[str, dict]:
        prepared = await self._prepare(pieces)
        text, out = await self._run(prepared.input_ids, prepared.images, params, session_id, on_text)
        return text, _meta(out)

    async def select(self, pieces: Sequence[Expr], choices: Sequence[str], *,
                     session_id: str | None = None) -> tuple[int, dict]:
        """Score each choice by its mean token logprob after the prompt, in prefill-only requests."""
        prepared = await self._prepare(pieces)
        ids, start = list(prepared.input_ids), len(prepared.input_ids)
        tokenizer = self.processor.tokenizer
        choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if len(choices) > 1:  # the prompt once, then every choice reuses it from the prefix cache
            await self._run(ids, prepared.images, SamplingParams(max_new_tokens=0), session_id)
        score = SamplingParams(max_new_tokens=0, prompt_logprobs_start=start)
        outs = await asyncio.gather(*(self._run(ids + c, prepared.images, score, session_id) for c in choice_ids))
        token_lps = [[lp.logprob for lp in out.prompt_logprobs if lp is not None] for _, out in outs]
        return pick_choice(token_lps, [out.cached_tokens for _, out in outs], start)

    def end_program(self, session_id: str) -> None:
        if getattr(self, "deployment", None) is not None:
            self.deployment.end_session(session_id)

    def close(self) -> None:
        if getattr(self, "deployment", None) is not None:
            self.deployment.shutdown()
            self.deployment = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _meta(out: Any) -> dict[str, Any]:
    return {"id": out.rid, "finish_reason": out.finish_reason, "matched_stop": out.matched_stop,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens}

