"""Stage costs for the simulator, read from a profile: piecewise-linear between measured points.

A profile (measured here, see profile.py, or a device profile derived from published figures) holds,
per thread count, tables of ms: `encode_ms[image tokens][batch]`, `prefill_ms[tokens]`,
`decode_ms[context][batch]`, and per data plane `transfer = fixed_ms + ms_per_byte * bytes`.
Between points costs are interpolated linearly; past the last point they are extended along the last
segment; below the first they keep the first value (a fixed overhead dominates small batches).
"""
from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

Curve = tuple[tuple[float, ...], tuple[float, ...]]


def curve(points: dict[str, float]) -> Curve:
    pairs = sorted((float(k), float(v)) for k, v in points.items())
    return tuple(x for x, _ in pairs), tuple(y for _, y in pairs)


def at(c: Curve, x: float) -> float:
    xs, ys = c
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if x > xs[0] else 1.0)
    if x <= xs[0]:
        return ys[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    if x > xs[-1]:
        slope = max(0.0, slope)
    return ys[i - 1] + slope * (x - xs[i - 1])


def interp(points: dict[str, float], x: float) -> float:
    return at(curve(points), x)


class ProfileCosts:
    def __init__(self, profile: dict[str, Any], data_plane: str = "shm") -> None:
        self.profile = profile
        self.tables = {int(t): self._curves(v) for t, v in profile["threads"].items()}
        plane = profile.get("transfer", {}).get(data_plane, {"fixed_ms": 0.0, "ms_per_byte": 0.0})
        self.fixed_ms, self.ms_per_byte = float(plane["fixed_ms"]), float(plane["ms_per_byte"])
        self.kv_bytes_per_token = int(profile["kv_bytes_per_token"])
        self.embed_bytes_per_token = int(profile["embed_bytes_per_token"])
        self.stream_ms_per_token = float(profile.get("stream_ms_per_token", 0.0))
        self.client_ms_per_token = float(profile.get("client_ms_per_token", 0.0))
        self.decode_context = str(profile.get("decode_context", "mean"))  # "max": padded to the longest
        self.decode_ms = lru_cache(maxsize=1 << 16)(self._decode_ms)

    @staticmethod
    def _curves(table: dict[str, Any]) -> dict[str, Any]:
        return {"encode": {float(k): curve(row) for k, row in table.get("encode_ms", {}).items()},
                "prefill": curve(table["prefill_ms"]),
                "decode": {float(k): curve(row) for k, row in table["decode_ms"].items()}}

    def _table(self, threads: int) -> dict[str, Any]:
        fitting = [t for t in self.tables if t <= threads]
        return self.tables[max(fitting) if fitting else min(self.tables)]

    @staticmethod
    def _across(rows: dict[float, Curve], x: float, key: float) -> float:
        """Interpolate each row at `x`, then across the rows' keys at `key`."""
        keys = sorted(rows)
        return at((tuple(keys), tuple(at(rows[k], x) for k in keys)), key)

    def encode_ms(self, image_tokens: Sequence[int], threads: int) -> float:
        rows = self._table(threads)["encode"]
        return sum(self._across(rows, count, tokens) for tokens, count in Counter(image_tokens).items())

    def prefill_ms(self, tokens: int, threads: int) -> float:
        return at(self._table(threads)["prefill"], tokens)

    def _decode_ms(self, batch: int, context: float, threads: int) -> float:
        return self._across(self._table(threads)["decode"], batch, context)

    def transfer_ms(self, nbytes: int) -> float:
        return self.fixed_ms + self.ms_per_byte * nbytes if nbytes else 0.0
