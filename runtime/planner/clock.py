"""The event clock of the simulator: timed callbacks, work that shares the processors, and FIFO threads.

Times are milliseconds. A `Job` is `work_ms` of compute at full speed on `threads` threads. Where the
machine has `cores` (a CPU host), every active job runs `slowdown = max(1, busy threads / cores)`
times slower than alone: processor sharing, recomputed whenever a job starts or ends. Where `cores`
is None (one accelerator per instance), jobs share only their own `device`: two jobs at once on one
accelerator (a hybrid's encoder beside its LM step) each run at half speed; other devices are apart.

Invariant: a job's `remaining` is its work left at time `since`; between two starts or ends that touch
its share, it runs at the constant speed 1/`slow`, so its end is `since + remaining * slow`. The heap
of ends holds one live entry per job (older ones carry a stale `version` and are skipped).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

Callback = Callable[[], None]
EPS = 1e-9


@dataclass(eq=False)
class Job:
    remaining: float  # ms of work left at full speed, as of `since`
    threads: int
    done: Callback
    device: object = None  # accelerator mode: jobs on the same device share it
    slow: float = 1.0
    since: float = 0.0
    version: int = 0
    live: bool = True


@dataclass
class Clock:
    cores: int | None = None
    max_events: int = 5_000_000
    now: float = 0.0
    events: int = 0
    _timed: list = field(default_factory=list)
    _ends: list = field(default_factory=list)  # (end, seq, job, version)
    _jobs: list[Job] = field(default_factory=list)
    _by_device: dict[int, list[Job]] = field(default_factory=dict)
    _busy_threads: int = 0
    _seq: itertools.count = field(default_factory=itertools.count)

    def at(self, t: float, fn: Callback) -> None:
        heapq.heappush(self._timed, (max(t, self.now), next(self._seq), fn))

    def after(self, delay_ms: float, fn: Callback) -> None:
        self.at(self.now + delay_ms, fn)

    def start(self, work_ms: float, threads: int, done: Callback, device: object = None) -> None:
        job = Job(max(0.0, work_ms), max(1, threads), done, device, since=self.now)
        self._jobs.append(job)
        self._busy_threads += job.threads
        if self._shares_device(job):
            self._sharers(job).append(job)
        self._reshare(job)

    def _shares_device(self, job: Job) -> bool:
        return self.cores is None and job.device is not None

    def _sharers(self, job: Job) -> list[Job]:
        return self._by_device.setdefault(id(job.device), [])

    def _reshare(self, job: Job) -> None:
        """Bring the jobs whose speed `job` starting or ending changes up to date, at their new speed."""
        if self.cores is not None:
            group, slow = self._jobs, max(1.0, self._busy_threads / self.cores)
        elif self._shares_device(job):
            group = self._sharers(job)
            slow = float(max(1, len(group)))
        else:
            group, slow = ([job] if job.live else []), 1.0
        for j in group:
            j.remaining = max(0.0, j.remaining - (self.now - j.since) / j.slow)
            j.remaining = j.remaining if j.remaining > EPS else 0.0
            j.since, j.slow, j.version = self.now, slow, j.version + 1
            heapq.heappush(self._ends, (self.now + j.remaining * slow, next(self._seq), j, j.version))

    def _next_end(self) -> tuple[float, Job | None]:
        while self._ends:
            end, _, job, version = self._ends[0]
            if job.live and version == job.version:
                return end, job
            heapq.heappop(self._ends)
        return float("inf"), None

    def _finish(self, job: Job) -> None:
        heapq.heappop(self._ends)
        job.live = False
        self._jobs.remove(job)
        self._busy_threads -= job.threads
        if self._shares_device(job):
            self._sharers(job).remove(job)
        self._reshare(job)
        job.done()

    def run(self, until: float = float("inf")) -> None:
        """Process events in time order until none is left, `until` passes, or `max_events` is hit."""
        while self.events < self.max_events:
            t_job, job = self._next_end()
            t_ev = self._timed[0][0] if self._timed else float("inf")
            t_next = min(t_job, t_ev)
            if t_next == float("inf") or t_next > until:
                return
            self.now = max(self.now, t_next)
            self.events += 1
            if job is not None and t_job <= t_ev:
                self._finish(job)
            else:
                heapq.heappop(self._timed)[2]()


@dataclass(eq=False)
class Fifo:
    """One thread doing its jobs in order: the API server's preprocess thread, its event loop, the client."""

    clock: Clock
    queue: deque = field(default_factory=deque)  # (ms of work, callback when done)
    busy: bool = False
    cpu_ms: float = 0.0

    def put(self, work_ms: float, done: Callback) -> None:
        self.queue.append((work_ms, done))
        self._poll()

    def _poll(self) -> None:
        if self.busy or not self.queue:
            return
        work, done = self.queue.popleft()
        self.busy = True
        self.cpu_ms += work
        self.clock.start(work, 1, lambda: self._done(done))

    def _done(self, done: Callback) -> None:
        self.busy = False
        done()
        self._poll()
