"""The API server's CPU per request and per streamed token, measured through a real `epd serve` and HTTP.

`Processor.prepare` alone is well under half of what the API server process spends on a multi-image
request: the HTTP body, JSON, pydantic, the router's pixel hand-over to shared memory and the reply add
the rest. So the profile times the whole path: a colocated `epd serve` of the model is sent each request
shape with `max_tokens` 1, and the server process's own CPU time (every thread; its instances are other
processes) is read from /proc before and after. Its idle CPU (the router's poll loop) is subtracted.
Streaming is timed the same way, on a burst of concurrent streams (whose outputs the router batches, as
under load); the client's parsing (this process's CPU, an asyncio client like the benchmark's) is counted
apart, because the client is its own process: it takes cores, not the API server's time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from runtime.cluster.server_process import free_port, spawn_server, stop, wait_healthy

log = logging.getLogger(__name__)
REPEATS = 3
IDLE_S = 1.0
STREAMS, STREAM_TOKENS = 16, 32


def cpu_ms(pid: int) -> float:
    """CPU time of every thread of `pid` so far, in ms (from the scheduler's ns counters)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended while we read
            pass
    return total / 1e6


def can_measure() -> bool:
    return Path(f"/proc/{os.getpid()}/task").is_dir()


class FrontMeter:
    """One `epd serve MODEL --instances EPD` for the profile's lifetime; `ms(messages)` is the median server
    CPU of REPEATS requests of those messages (after one warm-up request when the server starts)."""

    def __init__(self, model_dir: Path, timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = Path(tempfile.mkstemp(prefix="epd-plan-front-", suffix=".log")[1])
        model = str(Path(model_dir).resolve())  # the server runs from the repository root
        self.proc = spawn_server(model, "EPD", self.port, ["--log-level", "warning"], self._log)
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._warm = False
        try:
            wait_healthy(self.url, self.proc, timeout_s, self._log)
            self.model = self.client.get("/v1/models").json()["data"][0]["id"]
            self.idle_ms_per_s = self._idle_rate()
        except BaseException:
            self.close()
            raise

    def _idle_rate(self) -> float:
        c0, t0 = cpu_ms(self.proc.pid), time.perf_counter()
        time.sleep(IDLE_S)
        return (cpu_ms(self.proc.pid) - c0) / (time.perf_counter() - t0)

    def _once(self, messages: list[dict]) -> float:
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0}
        c0, t0 = cpu_ms(self.proc.pid), time.perf_counter()
        reply = self.client.post("/v1/chat/completions", json=body)
        wall, cpu = time.perf_counter() - t0, cpu_ms(self.proc.pid) - c0
        reply.raise_for_status()
        return max(0.0, cpu - self.idle_ms_per_s * wall)

    def ms(self, messages: list[dict]) -> float:
        if not self._warm:
            self._once(messages)
            self._warm = True
        runs = [self._once(messages) for _ in range(REPEATS)]
        log.info("API server CPU per request: %s ms", ", ".join(f"{r:.1f}" for r in runs))
        return statistics.median(runs)

    def _burst(self, tokens: int) -> tuple[float, float]:
        """CPU ms of the server and of this client over STREAMS concurrent streams of `tokens` tokens, read
        with an asyncio client as the benchmark client reads them."""
        body = {"model": self.model, "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "stream": True}

        async def stream(client: httpx.AsyncClient) -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        json.loads(line[5:])

        async def burst() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=self.client.timeout) as client:
                await asyncio.gather(*(stream(client) for _ in range(STREAMS)))

        c0, mine0, t0 = cpu_ms(self.proc.pid), time.process_time(), time.perf_counter()
        asyncio.run(burst())
        wall, mine = time.perf_counter() - t0, (time.process_time() - mine0) * 1000.0
        return cpu_ms(self.proc.pid) - c0 - self.idle_ms_per_s * wall, mine

    def stream_costs(self) -> tuple[float, float]:
        """CPU per streamed token of the API server and of the client: bursts of STREAMS concurrent streams
        of STREAM_TOKENS tokens, less the same bursts of one token (their requests' own cost); the median of
        REPEATS for each."""
        self._burst(2)
        server, client = [], []
        for _ in range(REPEATS):
            (s_long, c_long), (s_one, c_one) = self._burst(STREAM_TOKENS), self._burst(1)
            per = STREAMS * (STREAM_TOKENS - 1)
            server.append((s_long - s_one) / per)
            client.append((c_long - c_one) / per)
        log.info("CPU per streamed token, API server: %s ms; client: %s ms",
                 ", ".join(f"{r:.3f}" for r in server), ", ".join(f"{r:.3f}" for r in client))
        return max(0.0, statistics.median(server)), max(0.0, statistics.median(client))

    def close(self) -> None:
        self.client.close()
        stop(self.proc)
        self._log.unlink(missing_ok=True)
