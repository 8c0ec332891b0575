"""One background asyncio loop that runs every program statement and backend call."""
from __future__ import annotations

import asyncio
import atexit
import threading
from concurrent.futures import Future
from typing import Any, Coroutine

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="epdlang-loop", daemon=True).start()
            atexit.register(_loop.call_soon_threadsafe, _loop.stop)
        return _loop


def submit(coro: Coroutine) -> Future:
    """Schedule `coro` on the DSL loop; returns a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run_sync(coro: Coroutine, timeout: float | None = None) -> Any:
    """Run `coro` on the DSL loop and wait for its result (never call from the loop itself)."""
    return submit(coro).result(timeout)
