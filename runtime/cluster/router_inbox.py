"""The router's inbox: commands from other threads (submit, abort, control, ...) and the pipe that wakes
the router's poll loop when one arrives."""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

from epdlang import errors


class Inbox:
    """Thread-safe command queue with a wake pipe for `zmq.Poller`.

    Invariant: once `close()` has run, the pipe's fds are never used again (the numbers may already
    belong to another file), and every command posted or still queued is refused with RequestAborted,
    so that no caller waits forever on a router that is gone.
    """

    def __init__(self) -> None:
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._lock = threading.Lock()
        self.wake_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)

    def post(self, command: tuple) -> None:
        with self._lock:
            if self._write_fd < 0:
                refuse(command)
                return
            self._commands.put(command)
            try:
                os.write(self._write_fd, b"x")
            except BlockingIOError:
                pass  # the pipe is full, so the loop is awake anyway

    def drain(self, woken: bool) -> Iterator[tuple]:
        """The commands queued so far (`woken`: the poller saw the wake fd readable)."""
        if woken:
            os.read(self.wake_fd, 4096)
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        with self._lock:
            os.close(self.wake_fd)
            os.close(self._write_fd)
            self.wake_fd = self._write_fd = -1
        for command in self.drain(False):
            refuse(command)


def refuse(command: tuple, error: Exception | None = None) -> None:
    """Answer a command that will not be carried out: the router has stopped (RequestAborted), or
    handling it failed (`error`)."""
    kind, *args = command
    error = error or errors.RequestAborted("the deployment is shut down")
    if kind == "submit":
        args[1](error)
    elif kind == "control" and not args[1].done():
        args[1].set_exception(error)
