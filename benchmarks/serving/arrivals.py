"""Request arrival schedules, seeded: Poisson, bursty (gamma) and all-at-once.

As in `vllm bench serve`: inter-arrival gaps are gamma distributed with shape = burstiness and
mean 1 / rate. burstiness 1 is a Poisson process; below 1 is burstier, above 1 more regular.
`rate = inf` sends everything at t = 0 (bounded by the client's concurrency cap).
"""
from __future__ import annotations

import math

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the run start for `n` requests (non-decreasing, first at 0)."""
    if n <= 0:
        return []
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0 (got {rate}, {burstiness})")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    gaps = rng.gamma(shape=burstiness, scale=theta, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]
