"""What both APIs share: image loading, prompt preparation under limits, submitting engine requests,
collecting or merging their outputs, metrics per request, and aborting on client disconnect."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from PIL import Image

from epdlang.errors import InvalidRequest, PromptTooLong
from epdlang.sampling import SamplingParams
from runtime.cluster.deployment import Deployment
from runtime.messages import GenerateRequest, ImageInput, RequestOutput, TokenLogprob
from runtime.preprocess import PreparedPrompt
from runtime.server.config import ServerConfig
from runtime.server.errors import ApiError
from runtime.server.image_store import ImageStore, is_image_id
from runtime.server.media import MediaLoader
from runtime.server.metrics import Metrics

T = TypeVar("T")


@dataclass
class Accum:
    """Everything one engine request has produced so far."""

    rid: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        self.finished, self.finish_reason, self.matched_stop = out.finished, out.finish_reason, out.matched_stop
        self.prompt_tokens, self.cached_tokens, self.error = out.prompt_tokens, out.cached_tokens, out.error
        self.completion_tokens = out.completion_tokens


class EngineStream:
    """One engine request. `start()` waits for its first output, so that errors the engine raises at
    submit (an invalid regex, a prompt that can never fit) become a 4xx before any response is sent."""

    def __init__(self, deployment: Deployment, msg: GenerateRequest, metrics: Metrics) -> None:
        self.msg, self.metrics = msg, metrics
        self.acc = Accum(msg.rid)
        self._agen = deployment.generate(msg)
        self._first: RequestOutput | None = None
        self._t0 = time.perf_counter()
        self._ttft: float | None = None
        self._closed = False

    async def start(self) -> None:
        self._first = await self._agen.__anext__()

    async def deltas(self) -> AsyncIterator[RequestOutput]:
        """Every delta; the first is the one `start()` received."""
        if self._first is not None:
            first, self._first = self._first, None
            yield self._record(first)
        while not self.acc.finished:
            yield self._record(await self._agen.__anext__())

    async def drain(self) -> Accum:
        async for _ in self.deltas():
            pass
        return self.acc

    def _record(self, out: RequestOutput) -> RequestOutput:
        self.acc.add(out)
        if self._ttft is None and out.new_token_ids:
            self._ttft = time.perf_counter() - self._t0
        if out.finished:
            a = self.acc
            self.metrics.observe(self._ttft, time.perf_counter() - self._t0, a.prompt_tokens, a.cached_tokens,
                                 a.completion_tokens, a.finish_reason)
        return out

    async def aclose(self) -> None:
        """Abort the request if it has not finished (client gone, or a sibling request failed)."""
        if not self.acc.finished and not self._closed:
            self.metrics.finished.labels("abort").inc()
        self._closed = True
        await self._agen.aclose()


class Frontend:
    """Shared by the OpenAI and SGLang routes. Preprocessing runs on one worker thread (the tokenizer
    is not safe to share between threads), engine work on the engine's own thread."""

    def __init__(self, deployment: Deployment, config: ServerConfig, metrics: Metrics) -> None:
        self.deployment, self.config, self.metrics = deployment, config, metrics
        self.processor = deployment.processor
        self.limits = config.limits
        self.media = MediaLoader(config.limits, config.allowed_media_dirs, config.allow_remote_media,
                                 config.allow_private_media_urls)
        self.images = ImageStore()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="preprocess")

    async def close(self) -> None:
        await self.media.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    def check_image_count(self, refs: Sequence[str]) -> None:
        """Refuse requests that load too many images; uploaded images named by id load nothing and do not count."""
        n = sum(not is_image_id(r) for r in refs)
        if n > self.limits.max_images:
            raise ApiError(400, f"the request has {n} images; the limit is {self.limits.max_images}",
                           "too_many_images")

    async def load_images(self, refs: Sequence[str], raw_base64: bool = False) -> list[Image.Image | ImageInput]:
        """Decoded images; an `epd-image:<hash>` ref is the image uploaded earlier, already preprocessed."""
        stored = {i: self.images.get(r) for i, r in enumerate(refs) if is_image_id(r)}
        fresh = [r for i, r in enumerate(refs) if i not in stored]
        datas = await asyncio.gather(*(self.media.read(r, raw_base64) for r in fresh))
        decoded = iter([await self._in_pool(self.media.decode, d) for d in datas])
        return [stored[i] if i in stored else next(decoded) for i in range(len(refs))]

    async def upload_images(self, refs: Sequence[str]) -> list[ImageInput]:
        """Preprocess and keep images for later requests to name by id, and start encoding them now."""
        self.check_image_count(refs)
        loaded = await self.load_images(refs, raw_base64=True)
        inputs = [await self._in_pool(self.processor.image_input, x) for x in loaded]
        for image in inputs:
            self.images.put(image)
        self.images.uploads += sum(not is_image_id(r) for r in refs)
        self.deployment.encode_ahead(list({x.content_hash: x for x in inputs}.values()))
        return inputs

    async def tokenize(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        tokenizer = self.processor.tokenizer
        return await self._in_pool(
            lambda: [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts])

    async def prepare_chat(self, messages: list[dict]) -> PreparedPrompt:
        """Apply the chat template to OpenAI-style messages whose image parts carry `image_url` refs."""
        refs = [p["image_url"] for m in messages if isinstance(m.get("content"), list)
                for p in m["content"] if p.get("type") == "image_url"]
        self.check_image_count(refs)
        images = iter(await self.load_images(refs))
        resolved = [{**m, "content": [{"type": "image", "image": next(images)} if p.get("type") == "image_url"
                                      else p for p in m["content"]]} if isinstance(m.get("content"), list) else m
                    for m in messages]
        return await self._in_pool(self.processor.prepare, resolved)

    async def prepare_prompt(self, prompt: str | None = None, input_ids: Sequence[int] | None = None,
                             images: Sequence[Image.Image | ImageInput] = ()) -> PreparedPrompt:
        return await self._in_pool(self.processor.prepare, prompt=prompt, input_ids=input_ids, images=images)

    def max_new_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The request's output budget; refuse requests over the total-token limit."""
        room = self.limits.max_total_tokens - prompt_len
        if room <= 0:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens; the limit for prompt plus output is "
                                f"{self.limits.max_total_tokens}")
        if requested is None:
            return min(room, self.limits.default_max_tokens)
        if requested > room:
            raise PromptTooLong(f"prompt ({prompt_len} tokens) plus max tokens ({requested}) is over the limit "
                                f"of {self.limits.max_total_tokens}")
        return requested

    def requests(self, rid: str, prepared: PreparedPrompt, params: SamplingParams, n: int,
                 session_id: str | None = None) -> list[GenerateRequest]:
        """n engine requests for one prompt: distinct rids, the seed (if any) offset per sample."""
        if not 1 <= n <= self.limits.max_n:
            raise ApiError(400, f"n is {n}; it must be in [1, {self.limits.max_n}]", "invalid_value", "n")
        out = []
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            out.append(GenerateRequest(rid=rid if n == 1 else f"{rid}-{i}", input_ids=prepared.input_ids,
                                       images=prepared.images, sampling=params.replace(n=1, seed=seed),
                                       session_id=session_id))
        return out

    async def start(self, msgs: Sequence[GenerateRequest]) -> list[EngineStream]:
        """Submit every request and wait for each one's first output; if any fails, abort them all."""
        streams = [EngineStream(self.deployment, m, self.metrics) for m in msgs]
        results = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await close_all(streams)
            raise errors[0]
        return streams


async def close_all(streams: Sequence[EngineStream]) -> None:
    await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)


async def collect(streams: Sequence[EngineStream]) -> list[Accum]:
    try:
        return list(await asyncio.gather(*(s.drain() for s in streams)))
    finally:
        await close_all(streams)


async def merged(streams: Sequence[EngineStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, delta) from several streams as they arrive. Closing this aborts whatever is unfinished."""
    if len(streams) == 1:  # the common case, without a task and a queue per delta
        try:
            async for out in streams[0].deltas():
                yield 0, out
        finally:
            await close_all(streams)
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async for out in stream.deltas():
                queue.put_nowait((i, out))
        except Exception as exc:  # handed to the consumer
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


class ClientDisconnected(ApiError):
    def __init__(self) -> None:
        super().__init__(499, "client disconnected", "client_disconnected")


async def guarded(request: Request, work: Awaitable[T]) -> T:
    """Run `work` unless the client disconnects first; then cancel it, which aborts its engine requests."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_logprob_start(start: int | None, prompt_len: int) -> None:
    if start is not None and start >= prompt_len:
        raise InvalidRequest(f"logprob_start_len ({start}) must be less than the prompt length ({prompt_len})")


def token_texts(tokenizer: Any, ids: set[int] | Sequence[int]) -> dict[int, str]:
    """Each token's text on its own (for logprobs), decoding every distinct id once."""
    unique = sorted(set(ids))
    return dict(zip(unique, tokenizer.batch_decode([[i] for i in unique])))
