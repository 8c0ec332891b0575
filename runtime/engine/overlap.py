"""Whether an engine's vision tower runs beside its LM passes or inside the engine step.

Beside (the encoder thread), the tower and the LM share the CPU threads; inside, each runs on all of them and
the other waits. On 2 cores neither wins everywhere (docs/performance.md, item 15): beside pays when the two
stages are balanced, and loses when one of them dominates, because beside each other both run slower."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

from runtime.config import OverlapMode

STAGES = ("tower", "lm")
# How much slower a stage's passes ran beside the other stage than alone, in serving (benchmarks/epd_alone.sh
# on a 2-core AMD EPYC, 2026-12-07): the tower 1.68x (tiny model, 224²), 1.87x (448²), 1.60x (small model);
# the LM per prefill token or decode row 1.6x (tiny, both sizes) and 1.8x (small, compute-bound). The tower's
# figure is the low end, so a near-balanced workload stays beside (its decode keeps going during encodes);
# the LM's the high end, so a compute-bound LM that dominates moves the tower inside.
TOWER_BESIDE = 1.6
LM_BESIDE = 1.8
# A gap between passes counts toward the decay for at most the pass's own length plus this much: "recent" means
# recent work, so an idle server keeps the prior and the last workload's shares instead of decaying them to nothing.
IDLE_GAP_S = 1.0
log = logging.getLogger(__name__)


class OverlapChooser:
    """Chooses beside or inside for each encode from the seconds each stage's passes took lately.

    With E and L the recent tower and LM pass time (sums that halve every `half_life_s`), inside takes about
    E + L, and beside max(sT * E, sL * L), the stages overlapping but each slowed (`TOWER_BESIDE`,
    `LM_BESIDE`). So beside is kept while the tower has at most 1/sT of the work and the LM at most 1/sL.
    The slowdowns are constants, the same in both modes, so the shares measured in either mode give the
    answer: no probing, which would stall decode steps in workloads that should stay beside. Both sums start
    at `prior_s`, as if the stages had been balanced: the first passes of a burst, all encodes, do not move
    the tower inside before the LM work they lead to has run. Idle time decays nothing (`IDLE_GAP_S`), so
    that holds for a burst that comes minutes after start-up, too."""

    def __init__(self, mode: OverlapMode, half_life_s: float = 10.0, prior_s: float = 1.0,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.mode, self.half_life_s, self.now = mode, half_life_s, now  # `now`: seconds (the simulator's clock)
        self.max_share = {"tower": 1.0 / TOWER_BESIDE, "lm": 1.0 / LM_BESIDE}
        self.seconds = dict.fromkeys(STAGES, prior_s)
        self.current = True
        self._at = now()
        self._lock = threading.Lock()  # the encoder thread records beside the loop thread

    def record(self, stage: str, seconds: float) -> None:
        """A pass of `stage` ("tower" or "lm") took `seconds`."""
        with self._lock:
            now = self.now()
            elapsed = min(now - self._at, seconds + IDLE_GAP_S)
            decay = math.exp2(-elapsed / self.half_life_s)
            self._at = now
            for s in STAGES:
                self.seconds[s] *= decay
            self.seconds[stage] += seconds

    def shares(self) -> dict[str, float]:
        """Each stage's share of the recent pass time."""
        with self._lock:
            total = sum(self.seconds.values()) or 1.0
            return {s: v / total for s, v in self.seconds.items()}

    def beside(self) -> bool:
        """Run the next encode beside the LM's passes (rather than inside the step)?"""
        if self.mode != "auto":
            return bool(self.mode)
        shares = self.shares()
        choice = all(shares[s] <= self.max_share[s] for s in STAGES)
        if choice != self.current:
            log.info("the vision tower now runs %s the engine step (shares of recent pass time: %s)",
                     "beside LM passes, not inside" if choice else "inside", shares)
            self.current = choice
        return choice
