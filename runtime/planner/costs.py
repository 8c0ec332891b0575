"""Stage costs for the simulator, read from a profile: piecewise-linear between measured points.

A profile (measured here, see profile.py, or a device profile derived from published figures) holds,
per thread count, tables of ms: `encode_ms[image tokens][batch]`, `prefill_ms[tokens]`,
`decode_ms[context][batch]`, and per data plane `transfer = fixed_ms + ms_per_byte * bytes`.
Between points costs are interpolated linearly; past the last point they are extended along the last
segment; below the first they keep the first value (a fixed overhead dominates small batches).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np


def interp(points: dict[str, float], x: float) -> float:
    xs = sorted(float(k) for k in points)
    ys = [float(points[_key(points, k)]) for k in xs]
    if len(xs) == 1 or x <= xs[0]:
        return ys[0] * (x / xs[0] if len(xs) == 1 and x > xs[0] else 1.0)
    if x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + max(0.0, slope) * (x - xs[-1])


def _key(points: dict[str, float], x: float) -> str:
    return next(k for k in points if float(k) == x)


class ProfileCosts:
    def __init__(self, profile: dict[str, Any], data_plane: str = "shm") -> None:
        self.profile = profile
        self.tables = {int(t): v for t, v in profile["threads"].items()}
        plane = profile.get("transfer", {}).get(data_plane, {"fixed_ms": 0.0, "ms_per_byte": 0.0})
        self.fixed_ms, self.ms_per_byte = float(plane["fixed_ms"]), float(plane["ms_per_byte"])
        self.kv_bytes_per_token = int(profile["kv_bytes_per_token"])
        self.embed_bytes_per_token = int(profile["embed_bytes_per_token"])
        self.stream_ms_per_token = float(profile.get("stream_ms_per_token", 0.0))

    def _table(self, threads: int) -> dict[str, Any]:
        fitting = [t for t in self.tables if t <= threads]
        return self.tables[max(fitting) if fitting else min(self.tables)]

    def encode_ms(self, image_tokens: Sequence[int], threads: int) -> float:
        table = self._table(threads)["encode_ms"]
        total = 0.0
        for tokens, count in Counter(image_tokens).items():
            by_tokens = {k: interp(row, count) for k, row in table.items()}
            total += interp(by_tokens, tokens)
        return total

    def prefill_ms(self, tokens: int, threads: int) -> float:
        return interp(self._table(threads)["prefill_ms"], tokens)

    def decode_ms(self, batch: int, context: float, threads: int) -> float:
        table = self._table(threads)["decode_ms"]
        by_context = {k: interp(row, batch) for k, row in table.items()}
        return interp(by_context, context)

    def transfer_ms(self, nbytes: int) -> float:
        return self.fixed_ms + self.ms_per_byte * nbytes if nbytes else 0.0
