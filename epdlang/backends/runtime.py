"""`epd.Runtime`: a local runtime used as a DSL backend. Every compiler pass takes effect here."""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

from epdlang.backends.base import Backend, OnText
from epdlang.errors import EpdError
from epdlang.ir import Expr, Image
from epdlang.sampling import SamplingParams

log = logging.getLogger(__name__)
MAX_CACHED_IMAGES = 256


class Runtime(Backend):
    """Starts a local runtime for `model` (default: the embedded tiny Qwen2-VL checkpoint).

    For now this is one in-process `runtime.Engine` (all of E, P and D) on an `AsyncEngine` thread:
    the role-typed multi-process runtime has not landed, so `instances` must be "EPD". Engine config
    overrides (page_size, kv_cache_bytes, ...) pass through. Close it, or use it as a context manager.
    """

    encode_ahead_supported = prefix_sharing_supported = scoring_supported = True

    def __init__(self, model: str | Path | None = None, instances: str = "EPD", **engine_overrides: Any) -> None:
        if instances.replace(" ", "").upper() != "EPD":
            raise NotImplementedError(f"instances={instances!r}: only the single in-process 'EPD' instance exists yet")
        from runtime.async_engine import AsyncEngine
        from runtime.engine import Engine

        if model is None:
            from runtime.tiny_model import ensure_tiny_model

            model = ensure_tiny_model()
        self.engine = Engine(model, **engine_overrides)
        self.aengine = AsyncEngine(self.engine)
        self.processor = self.engine.processor
        self._images: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._background: set[asyncio.Task] = set()

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
                   on_text: OnText | None = None) -> tuple[str, Any]:
        from runtime.messages import GenerateRequest

        msg = GenerateRequest(rid=uuid.uuid4().hex, input_ids=tuple(input_ids), images=tuple(images), sampling=params)
        chunks, last = [], None
        async for out in self.aengine.generate(msg):
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
        """Preprocess every image now and submit one prefill-only request carrying all of them, so the
        engine encodes them in one batch while the program's first statements are prepared. An image
        that cannot be read is skipped here; its statement raises the error when it runs."""
        readable = []
        for img in images:
            try:
                readable += await self._image_inputs([img])
            except EpdError:
                continue
        inputs = list({inp.content_hash: inp for inp in readable}.values())
        if not inputs:
            return
        prepared = self.processor.prepare(prompt=self.chat_template.image * len(inputs), images=inputs)
        task = asyncio.ensure_future(self._run(prepared.input_ids, prepared.images, SamplingParams(max_new_tokens=0)))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("encode-ahead request failed: %s", task.exception())

    async def add_image(self, image: Image) -> None:
        await self._image_inputs([image])

    async def prefill(self, pieces: Sequence[Expr]) -> dict[str, Any]:
        if not pieces:
            return {}
        prepared = await self._prepare(pieces)
        _, out = await self._run(prepared.input_ids, prepared.images, SamplingParams(max_new_tokens=0))
        return _meta(out)

    async def generate(self, pieces: Sequence[Expr], params: SamplingParams, on_text: OnText) -> tuple[str, dict]:
        prepared = await self._prepare(pieces)
        text, out = await self._run(prepared.input_ids, prepared.images, params, on_text)
        return text, _meta(out)

    async def select(self, pieces: Sequence[Expr], choices: Sequence[str]) -> tuple[int, dict]:
        """Score each choice by its mean token logprob after the prompt, in prefill-only requests."""
        prepared = await self._prepare(pieces)
        ids, start = list(prepared.input_ids), len(prepared.input_ids)
        tokenizer = self.processor.tokenizer
        choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if len(choices) > 1:  # the prompt once, then every choice reuses it from the prefix cache
            await self._run(ids, prepared.images, SamplingParams(max_new_tokens=0))
        score = SamplingParams(max_new_tokens=0, prompt_logprobs_start=start)
        outs = await asyncio.gather(*(self._run(ids + c, prepared.images, score) for c in choice_ids))
        token_lps = [[lp.logprob for lp in out.prompt_logprobs if lp is not None] for _, out in outs]
        normalized = [sum(lps) / max(len(lps), 1) for lps in token_lps]
        best = max(range(len(choices)), key=lambda i: (normalized[i], -i))
        meta = {"normalized_prompt_logprobs": normalized, "input_token_logprobs": token_lps,
                "cached_tokens": [out.cached_tokens for _, out in outs], "prompt_tokens": start,
                "completion_tokens": 0}
        return best, meta

    def close(self) -> None:
        for task in list(getattr(self, "_background", ())):
            task.get_loop().call_soon_threadsafe(task.cancel)
        if getattr(self, "aengine", None) is not None:
            self.aengine.shutdown()
            self.aengine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _meta(out: Any) -> dict[str, Any]:
    return {"id": out.rid, "finish_reason": out.finish_reason, "matched_stop": out.matched_stop,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens}
