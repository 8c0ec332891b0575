"""Runs an `Engine` on a background thread and exposes it to asyncio callers (the HTTP server, the DSL)."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from runtime.engine import Engine
from runtime.messages import GenerateRequest, RequestOutput

log = logging.getLogger(__name__)


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class AsyncEngine:
    """Thread-safe front of one engine. The engine itself is only ever touched by its own thread."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        self.engine, self.idle_wait_s = engine, idle_wait_s
        self.processor = engine.processor
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- public -----------------------------------------------------------------------------
    async def generate(self, msg: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit and stream deltas. Leaving the iterator early (disconnect, cancel) aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        sink = lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)  # noqa: E731
        submit = self.call_nowait(lambda: self._submit(msg, sink))
        finished = False
        try:
            await asyncio.wrap_future(submit)
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished and _may_have_submitted(submit):
                self.call_nowait(lambda: self.engine.abort(msg.rid))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and return its result (or raise its error)."""
        return await asyncio.wrap_future(self.call_nowait(fn))

    def call_nowait(self, fn: Callable[[], Any]) -> Future:
        cmd = _Command(fn)
        self._commands.put(cmd)
        return cmd.future

    def is_alive(self) -> bool:
        """True while the engine thread runs (it stops only on `shutdown`)."""
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------------
    def _submit(self, msg: GenerateRequest, sink: Callable[[RequestOutput], None]) -> str:
        rid = self.engine.submit(msg)
        self._sinks[rid] = sink
        return rid

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._run(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _run(cmd: _Command) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return  # the caller was cancelled before it ran
        try:
            cmd.future.set_result(cmd.fn())
        except BaseException as exc:  # the caller gets the error; the loop carries on
            cmd.future.set_exception(exc)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; failing the requests in flight")
            outputs = self.engine.fail_all("internal error in the engine step")
        for out in outputs:
            sink = self._sinks.pop(out.rid, None) if out.finished else self._sinks.get(out.rid)
            if sink is not None:
                sink(out)


def _may_have_submitted(submit: Future) -> bool:
    """False only if the submit surely never took effect (cancelled before it ran, or it raised)."""
    if submit.cancelled():
        return False
    return not (submit.done() and submit.exception() is not None)
