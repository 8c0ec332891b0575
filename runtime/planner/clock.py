"""The event clock of the simulator: timed callbacks, and work that shares the processors.

Times are milliseconds. A `Job` is `work_ms` of compute at full speed on `threads` threads. Where the
machine has `cores` (a CPU host), every active job runs `slowdown = max(1, busy threads / cores)`
times slower than alone: processor sharing, recomputed whenever a job starts or ends. Where `cores`
is None (one accelerator per instance), jobs share only their own `device`: two jobs at once on one
accelerator (a hybrid's encoder beside its LM step) each run at half speed; other devices are apart.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable

Callback = Callable[[], None]
EPS = 1e-9


@dataclass(eq=False)
class Job:
    remaining: float  # ms of work left at full speed
    threads: int
    done: Callback
    device: object = None  # accelerator mode: jobs on the same device share it


@dataclass
class Clock:
    cores: int | None = None
    max_events: int = 5_000_000
    now: float = 0.0
    events: int = 0
    _timed: list = field(default_factory=list)
    _jobs: list[Job] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def at(self, t: float, fn: Callback) -> None:
        heapq.heappush(self._timed, (max(t, self.now), next(self._seq), fn))

    def after(self, delay_ms: float, fn: Callback) -> None:
        self.at(self.now + delay_ms, fn)

    def start(self, work_ms: float, threads: int, done: Callback, device: object = None) -> None:
        self._jobs.append(Job(max(0.0, work_ms), max(1, threads), done, device))

    def slowdowns(self) -> list[float]:
        if self.cores is not None:
            shared = max(1.0, sum(j.threads for j in self._jobs) / self.cores)
            return [shared] * len(self._jobs)
        per_device: dict[int, int] = {}
        for j in self._jobs:
            per_device[id(j.device)] = per_device.get(id(j.device), 0) + 1
        return [float(per_device[id(j.device)]) if j.device is not None else 1.0 for j in self._jobs]

    def run(self, until: float = float("inf")) -> None:
        """Process events in time order until none is left, `until` passes, or `max_events` is hit."""
        while self.events < self.max_events:
            slows = self.slowdowns()
            ends = [j.remaining * s for j, s in zip(self._jobs, slows)]
            k = min(range(len(ends)), key=ends.__getitem__, default=None)
            job = self._jobs[k] if k is not None else None
            t_job = self.now + ends[k] if job else float("inf")
            t_ev = self._timed[0][0] if self._timed else float("inf")
            t_next = min(t_job, t_ev)
            if t_next == float("inf") or t_next > until:
                return
            self._advance(t_next, slows)
            self.events += 1
            if job is not None and t_job <= t_ev:
                self._jobs.remove(job)
                job.done()
            else:
                heapq.heappop(self._timed)[2]()

    def _advance(self, t: float, slows: list[float]) -> None:
        dt = t - self.now
        for j, slow in zip(self._jobs, slows):
            left = j.remaining - dt / slow
            j.remaining = left if left > EPS else 0.0
        self.now = t
