"""Hand-off of the router thread's outputs to asyncio consumers: one loop wake-up per burst, not per output."""
from __future__ import annotations

import asyncio
import threading
from typing import Any


class LoopMailbox:
    """Delivers `(queue, item)` pairs from any thread into asyncio queues of one event loop.

    A decode step streams one output per running request; waking the loop once per output cost the router
    thread a pipe write and a handle each, under the GIL that the loop thread needs. Invariant: while
    `_items` is non-empty, exactly one `_drain` is scheduled on the loop, so nothing waits undelivered.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to read the queue
            with self._lock:
                self._items.clear()

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
