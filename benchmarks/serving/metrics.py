"""Latency metrics, SLO attainment and goodput, computed from per-request timestamps.

Definitions (the same as `vllm bench serve` where they overlap):
- TTFT: request start to the first streamed content chunk.
- TPOT: (E2E - TTFT) / (output_tokens - 1), one value per request with at least 2 output tokens.
- ITL: gaps between consecutive content chunks, pooled over all requests.
- E2E: request start to the end of the stream.
A request meets the SLO when it succeeded, TTFT <= T and the p90 of its own inter-token gaps <= P
(a request with a single output token has no gaps and passes on TTFT alone).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.config import Slo

PERCENTILES = (50.0, 90.0, 99.0)
GOODPUT_ATTAINMENT = 0.9


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it; times in seconds, `start` relative to the run start."""

    success: bool
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: tuple[float, ...] = ()
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    finish_reason: str = ""
    text: str = ""  # the streamed answer

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    output_tokens: int
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    slo: Slo | None
    slo_attainment: float | None


def percentiles(values: Sequence[float], ps: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """`{"mean": .., "p50": .., ...}` with numpy's linear interpolation; NaN when `values` is empty."""
    if len(values) == 0:
        return {"mean": float("nan"), **{f"p{p:g}": float("nan") for p in ps}}
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean())}
    out.update({f"p{p:g}": float(np.percentile(arr, p)) for p in ps})
    return out


def _ms(values: Sequence[float]) -> dict[str, float]:
    return percentiles([v * 1000.0 for v in values])


def meets_slo(r: RequestResult, slo: Slo) -> bool:
    if not r.success or r.ttft * 1000.0 > slo.ttft_ms:
        return False
    if not r.itl:
        return True
    return float(np.percentile(np.asarray(r.itl) * 1000.0, 90)) <= slo.tpot_ms


def attainment(results: Sequence[RequestResult], slo: Slo) -> float:
    """Fraction of all requests (failures count as misses) that meet the SLO."""
    if not results:
        return 0.0
    return sum(meets_slo(r, slo) for r in results) / len(results)


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None) -> Summary:
    ok = [r for r in results if r.success]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    return Summary(
        completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        request_throughput=len(ok) / dur, output_throughput=output / dur,
        total_token_throughput=(prompt + output) / dur, prompt_tokens=prompt, output_tokens=output,
        ttft_ms=_ms([r.ttft for r in ok]), tpot_ms=_ms([t for r in ok if (t := r.tpot) is not None]),
        itl_ms=_ms([g for r in ok for g in r.itl]), e2e_ms=_ms([r.e2e for r in ok]),
        slo=slo, slo_attainment=None if slo is None else attainment(results, slo))


def goodput(points: Sequence[tuple[float, float]], threshold: float = GOODPUT_ATTAINMENT) -> float:
    """Highest request rate whose attainment is >= `threshold`, from (rate, attainment) points.

    Walks the rates upwards to the first failing rate and interpolates linearly between it and the
    last passing rate before it. No passing rate: 0. No failing rate: the highest rate measured
    (a lower bound; sweep further to find the knee).
    """
    last_pass: tuple[float, float] | None = None
    for rate, att in sorted(points):
        if att >= threshold:
            last_pass = (rate, att)
            continue
        if last_pass is None:
            return 0.0
        (r0, a0), (r1, a1) = last_pass, (rate, att)
        return r0 + (a0 - threshold) / (a0 - a1) * (r1 - r0)
    return last_pass[0] if last_pass else 0.0
