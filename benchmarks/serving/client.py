"""Async streaming client: sends the workload on its arrival schedule and timestamps every chunk.

Request bodies (with their base64 images) are serialized before the clock starts, so the timed
region only does HTTP and SSE parsing. Client CPU time over the run is measured with
`time.process_time()` and reported, so client overhead is visible next to server latencies.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm

from benchmarks.serving.metrics import RequestResult
from benchmarks.serving.workloads import BenchRequest

FAILED_FINISH = ("error", "abort")  # streamed, but the server gave up on the request


@dataclass(frozen=True)
class Target:
    base_url: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    request_timeout_s: float = 600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/v1/chat/completions"

    @property
    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        return h | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})


@dataclass(frozen=True)
class RunOutput:
    results: tuple[RequestResult, ...]
    duration_s: float
    client_cpu_s: float


def encode_body(target: Target, req: BenchRequest) -> bytes:
    body: dict = {"model": target.model, "messages": list(req.messages), "max_tokens": req.output_len,
                  "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if target.ignore_eos:
        body |= {"ignore_eos": True, "min_tokens": req.output_len}
    if req.response_format:
        body["response_format"] = req.response_format
    return json.dumps(body).encode()


@dataclass
class _Stream:
    """Mutable per-request state while its SSE stream is read."""

    start: float
    chunks: list[float]
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    finish_reason: str = ""
    text: str = ""

    def feed(self, data: bytes, now: float) -> None:
        obj = json.loads(data)
        if "error" in obj:
            self.error = str(obj["error"])[:500]
            return
        for choice in obj.get("choices") or ():
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            if content := (choice.get("delta") or {}).get("content"):
                self.chunks.append(now)
                self.text += content
        if usage := obj.get("usage"):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.output_tokens = int(usage.get("completion_tokens") or 0)

    def result(self, t0: float, end: float) -> RequestResult:
        if self.error or not self.chunks or self.finish_reason in FAILED_FINISH:
            error = self.error or f"stream ended with finish_reason={self.finish_reason or None}"
            return RequestResult(False, self.start - t0, error=error, finish_reason=self.finish_reason)
        itl = tuple(b - a for a, b in zip(self.chunks, self.chunks[1:]))
        return RequestResult(True, self.start - t0, self.chunks[0] - self.start, end - self.start, itl,
                             self.prompt_tokens, self.output_tokens or len(self.chunks), "", self.finish_reason,
                             self.text)


async def send(session: aiohttp.ClientSession, target: Target, body: bytes, t0: float) -> RequestResult:
    st = _Stream(time.perf_counter(), [])
    try:
        async with session.post(target.url, data=body, headers=target.headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:500]
                return RequestResult(False, st.start - t0, error=f"HTTP {resp.status}: {text}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                st.feed(data, time.perf_counter())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        return RequestResult(False, st.start - t0, error=f"{type(e).__name__}: {e}"[:500])
    return st.result(t0, time.perf_counter())


async def _run(target: Target, bodies: Sequence[bytes], arrivals: Sequence[float],
               max_concurrency: int | None, progress: bool) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(max_concurrency or len(bodies) or 1)
    timeout = aiohttp.ClientTimeout(total=target.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    bar = tqdm(total=len(bodies), disable=not progress, desc="requests", unit="req")
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()

        async def one(body: bytes, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with sem:
                r = await send(session, target, body, t0)
            bar.update(1)
            return r

        results = await asyncio.gather(*(one(b, a) for b, a in zip(bodies, arrivals)))
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


def run_benchmark(target: Target, requests: Sequence[BenchRequest], arrivals: Sequence[float],
                  max_concurrency: int | None = None, progress: bool = True) -> RunOutput:
    """Send `requests` at `arrivals` (seconds from start) with at most `max_concurrency` in flight."""
    bodies = [encode_body(target, r) for r in requests]
    cpu0 = time.process_time()
    results, duration = asyncio.run(_run(target, bodies, arrivals, max_concurrency, progress))
    return RunOutput(tuple(results), duration, time.process_time() - cpu0)
