"""How the encoder thread and the LM thread of one engine share its torch threads on CPU."""
from __future__ import annotations

import contextlib
import threading

import torch

from runtime.models.gemv import split_over


class ThreadShare:
    """torch's thread count belongs to the calling thread, so the encoder and LM threads each run their own
    OpenMP team. While both stages work they get half the threads each; otherwise twice as many threads as
    cores would fight. A stage running alone gets them all."""

    def __init__(self, split: bool) -> None:
        self.total = torch.get_num_threads()
        self.split = split
        self.loop_thread = threading.get_ident()  # an encode run inline on this thread has nothing beside it

    def set_total(self, n: int) -> None:
        torch.set_num_threads(n)
        self.total = n

    def apply(self, other_stage_busy: bool) -> None:
        """Set the calling thread's count for a pass, given whether the other stage runs beside it."""
        if self.split:
            torch.set_num_threads(max(1, self.total // 2) if other_stage_busy else self.total)

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self.loop_thread

    def one_row_pass(self, rows: int, other_stage_busy: bool) -> contextlib.AbstractContextManager:
        """For an LM pass of one row with every thread to itself: one torch thread, and the large one-row
        matmuls split over the rest (`runtime/models/gemv.py`). Otherwise nothing changes."""
        n = torch.get_num_threads()
        if rows != 1 or other_stage_busy or n < 2:
            return contextlib.nullcontext()
        return split_over(n)
