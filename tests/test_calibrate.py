"""Start-up calibration picks budgets from measured step times (real model, extreme targets)."""
from __future__ import annotations

import pytest

from runtime.engine import calibrate
from runtime.engine.core import Engine

DECODE_BATCHES, PREFILL_TOKENS = (1, 4, 16), (32, 64, 128)


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    """Measure a small grid so the test stays fast; the selection logic is the same."""
    monkeypatch.setattr(calibrate, "DECODE_BATCHES", DECODE_BATCHES)
    monkeypatch.setattr(calibrate, "PREFILL_TOKENS", PREFILL_TOKENS)
    monkeypatch.setattr(calibrate, "ENCODE_TOKENS", (16, 64))
    monkeypatch.setattr(calibrate, "CONTEXT", 64)


def test_generous_target_gives_largest_budgets(tiny_model_dir):
    engine = Engine(tiny_model_dir, tpot_target_ms=1e6, num_pages=4200)
    assert engine.budgets.max_running == DECODE_BATCHES[-1]
    assert engine.budgets.prefill_token_budget == PREFILL_TOKENS[-1]
    assert engine.scheduler.prefill_budget == PREFILL_TOKENS[-1]
    assert engine.kv.allocator.num_free == 4200  # measuring left no pages behind


def test_impossible_target_gives_smallest_budgets(tiny_model_dir):
    engine = Engine(tiny_model_dir, tpot_target_ms=1e-3, num_pages=4200)
    assert (engine.budgets.max_running, engine.budgets.prefill_token_budget) == (1, PREFILL_TOKENS[0])
    assert engine.scheduler.max_running == 1
    [out] = engine.generate({"prompt": "x = 1"}, None)  # still serves
    assert out.finish_reason in ("stop", "length")


def test_serve_flags_set_the_budgets_or_a_tpot_target(tiny_model_dir):
    from runtime.cli import build_parser
    from runtime.server.cli import config_from_args

    def engine(*flags: str) -> Engine:
        args = build_parser().parse_args(["serve", str(tiny_model_dir), *flags])
        return Engine(tiny_model_dir, num_pages=4200, **config_from_args(args).engine_overrides)

    fixed = engine("--max-num-seqs", "7", "--max-num-batched-tokens", "96", "--encode-token-budget", "512",
                   "--mixed-token-budget", "32")
    assert (fixed.scheduler.max_running, fixed.scheduler.prefill_budget, fixed.scheduler.encode_budget) == (7, 96, 512)
    assert fixed.scheduler.mixed_budget == 32 and engine().scheduler.mixed_budget is None
    for flag in ("--mixed-token-budget", "--max-num-batched-tokens", "--encode-token-budget"):
        with pytest.raises(SystemExit, match=f"{flag} must be at least 1, got 0"):
            engine(flag, "0")
    assert fixed.config.mixed_batches and not engine("--no-mixed-batches").config.mixed_batches
    assert fixed.config.enable_prefix_cache and not engine("--no-prefix-cache").config.enable_prefix_cache
    tight = engine("--tpot-target-ms", "0.001")
    assert tight.scheduler.max_running == DECODE_BATCHES[0] and tight.scheduler.prefill_budget == PREFILL_TOKENS[0]
