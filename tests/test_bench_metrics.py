"""Unit tests of the `epd bench` metric code on synthetic timestamps with known answers."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving.arrivals import arrival_times  # noqa: E402
from benchmarks.serving.client import _Stream  # noqa: E402
from benchmarks.serving.metrics import RequestResult, Slo, attainment, goodput, meets_slo, percentiles, summarize  # noqa: E402


def req(ttft: float, itl: tuple[float, ...], start: float = 0.0, prompt: int = 10) -> RequestResult:
    e2e = ttft + sum(itl)
    return RequestResult(True, start, ttft, e2e, itl, prompt, len(itl) + 1)


def test_percentiles_linear_interpolation() -> None:
    p = percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert p["mean"] == pytest.approx(5.5)
    assert p["p50"] == pytest.approx(5.5)
    assert p["p90"] == pytest.approx(9.1)
    assert p["p99"] == pytest.approx(9.91)
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_tpot_and_itl() -> None:
    r = req(0.5, (0.1, 0.2, 0.3))  # 4 tokens, decode time 0.6 s over 3 gaps
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx(0.2)
    assert req(0.5, ()).tpot is None  # one token: no TPOT
    s = summarize([r, req(0.3, (0.1,))], duration_s=2.0)
    assert s.itl_ms["p50"] == pytest.approx(150.0)  # pooled gaps 100, 100, 200, 300 ms
    assert s.tpot_ms["mean"] == pytest.approx(150.0)  # per-request TPOTs 200 and 100 ms
    assert s.ttft_ms["p50"] == pytest.approx(400.0)


def test_throughput_counts_only_successes() -> None:
    ok = [req(0.1, (0.1,) * 9) for _ in range(4)]  # 10 output + 10 prompt tokens each
    s = summarize([*ok, RequestResult(False, error="boom")], duration_s=2.0)
    assert (s.completed, s.failed) == (4, 1)
    assert s.request_throughput == pytest.approx(2.0)
    assert s.output_throughput == pytest.approx(20.0)
    assert s.total_token_throughput == pytest.approx(40.0)


def test_slo_uses_ttft_and_the_requests_own_p90_gap() -> None:
    slo = Slo(ttft_ms=500, tpot_ms=100)
    assert meets_slo(req(0.5, (0.05,) * 10), slo)
    assert not meets_slo(req(0.51, (0.05,) * 10), slo)  # TTFT over
    # p90 of 20 gaps with one slow gap interpolates between two fast ones: passes.
    assert meets_slo(req(0.1, (0.05,) * 19 + (1.0,)), slo)
    # p90 of 10 gaps with one slow gap: 0.05 + 0.1 * 0.95 = 145 ms > 100 ms: fails.
    assert not meets_slo(req(0.1, (0.05,) * 9 + (1.0,)), slo)
    assert meets_slo(req(0.1, ()), slo)  # a single token passes on TTFT alone
    assert not meets_slo(RequestResult(False), slo)


def test_attainment_counts_failures_as_misses() -> None:
    slo = Slo(ttft_ms=200, tpot_ms=50)
    results = [req(0.1, (0.01,)), req(0.1, (0.01,)), req(0.3, (0.01,)), RequestResult(False)]
    assert attainment(results, slo) == pytest.approx(0.5)
    assert summarize(results, 1.0, slo).slo_attainment == pytest.approx(0.5)


def test_goodput_interpolates_between_last_pass_and_first_fail() -> None:
    pts = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.75), (8.0, 0.2)]
    # 2 + (0.95 - 0.9) / (0.95 - 0.75) * (4 - 2) = 2.5
    assert goodput(pts) == pytest.approx(2.5)
    assert goodput(list(reversed(pts))) == pytest.approx(2.5)  # order of the sweep does not matter
    assert goodput([(1.0, 0.99), (2.0, 0.9)]) == pytest.approx(2.0)  # all pass: highest rate
    assert goodput([(1.0, 0.5), (2.0, 0.1)]) == 0.0  # none pass
    assert goodput([(1.0, 1.0), (2.0, 0.9), (3.0, 0.8)]) == pytest.approx(2.0)  # exactly 90% passes


def test_arrivals_poisson_bursty_and_all_at_once() -> None:
    assert arrival_times(5, math.inf) == [0.0] * 5
    a = arrival_times(2000, rate=10.0, seed=1)
    assert a == arrival_times(2000, rate=10.0, seed=1)  # seeded
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert a[-1] / 1999 == pytest.approx(0.1, rel=0.1)  # mean gap 1 / rate
    gaps = [y - x for x, y in zip(a, a[1:])]
    bursty = arrival_times(2000, rate=10.0, burstiness=0.25, seed=1)
    bgaps = [y - x for x, y in zip(bursty, bursty[1:])]
    assert bursty[-1] / 1999 == pytest.approx(0.1, rel=0.2)  # same mean rate, more variance
    var = lambda g: sum((x - sum(g) / len(g)) ** 2 for x in g) / len(g)  # noqa: E731
    assert var(bgaps) > 2 * var(gaps)


def test_stream_parsing_timestamps_content_chunks_and_usage() -> None:
    st = _Stream(start=10.0, chunks=[])
    st.feed(b'{"choices":[{"delta":{"role":"assistant"}}]}', 10.1)  # role-only chunk: not a token
    st.feed(b'{"choices":[{"delta":{"content":"a"}}]}', 10.3)
    st.feed(b'{"choices":[{"delta":{"content":"b"}}]}', 10.4)
    st.feed(b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}', 10.45)
    r = st.result(t0=9.0, end=10.5)
    assert r.success and r.start == pytest.approx(1.0)
    assert r.ttft == pytest.approx(0.3) and r.e2e == pytest.approx(0.5)
    assert r.itl == pytest.approx((0.1,)) and (r.prompt_tokens, r.output_tokens) == (7, 2)
    bad = _Stream(start=0.0, chunks=[])
    bad.feed(b'{"error":{"message":"overloaded"}}', 0.1)
    assert not bad.result(0.0, 0.2).success
    cut = _Stream(start=0.0, chunks=[])
    cut.feed(b'{"choices":[{"delta":{"content":"a"},"finish_reason":"error"}]}', 0.1)
    assert cut.result(0.0, 0.2).finish_reason == "error" and not cut.result(0.0, 0.2).success
