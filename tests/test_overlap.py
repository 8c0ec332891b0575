"""`--overlap-encode auto`: the vision tower runs beside the LM's passes while the two stages are balanced, and
inside the engine step once one of them dominates; outputs never depend on the choice."""
from __future__ import annotations

import threading

import pytest

from epdlang.sampling import SamplingParams
from images import make_image
from runtime.engine.core import Engine
from runtime.engine.overlap import LM_BESIDE, TOWER_BESIDE, OverlapChooser

GREEDY = SamplingParams(max_new_tokens=6)


def test_fixed_modes_ignore_the_work():
    on, off = OverlapChooser(True), OverlapChooser(False)
    for chooser in (on, off):
        chooser.record("tower", 10.0)
        chooser.record("lm", 0.1)
    assert all(on.beside() for _ in range(5)) and not any(off.beside() for _ in range(5))


def test_the_first_passes_of_a_burst_do_not_move_the_tower_inside():
    chooser = OverlapChooser("auto", half_life_s=1e9, prior_s=1.0)
    assert chooser.beside()
    for _ in range(4):
        chooser.record("tower", 0.1)  # a burst arrives: four encodes before any LM pass
    assert chooser.beside()
    chooser.record("tower", 2.0)  # seconds of tower work against none of the LM's: inside
    assert not chooser.beside()


def test_an_idle_server_keeps_the_prior_for_the_next_burst():
    clock = [0.0]
    chooser = OverlapChooser("auto", half_life_s=10.0, prior_s=1.0, now=lambda: clock[0])
    clock[0] += 600.0  # ten minutes between start-up and the first request
    for _ in range(4):
        clock[0] += 0.1
        chooser.record("tower", 0.1)
    assert chooser.beside() and abs(chooser.shares()["tower"] - 1.4 / 2.4) < 0.05
    clock[0] += 600.0  # the burst's LM work ran, then the server sat idle again
    chooser.record("lm", 1.4)
    assert chooser.shares()["lm"] > 0.5  # the idle ten minutes did not wipe out what came before


def test_the_thresholds_are_where_a_slowed_stage_outlasts_both_in_turn():
    # Inside takes E + L; beside max(sT * E, sL * L): beside while neither slowed stage outlasts E + L.
    t_limit, lm_limit = 1 / TOWER_BESIDE, 1 / LM_BESIDE
    for tower_share, beside in ((0.50, True), (t_limit - 0.01, True), (t_limit + 0.01, False), (0.70, False),
                                (1 - lm_limit - 0.01, False), (1 - lm_limit + 0.01, True), (0.2, False)):
        chooser = OverlapChooser("auto", half_life_s=1e9, prior_s=0.0)
        chooser.record("tower", tower_share)
        chooser.record("lm", 1 - tower_share)
        overlapped = max(TOWER_BESIDE * tower_share, LM_BESIDE * (1 - tower_share))
        assert chooser.beside() is beside is (overlapped <= 1.0), tower_share


def test_the_choice_follows_the_workload_as_old_passes_decay():
    clock = [0.0]
    chooser = OverlapChooser("auto", half_life_s=0.02, prior_s=0.0, now=lambda: clock[0])
    chooser.record("tower", 0.7)  # 448² images on the tiny model: the tower dominates
    chooser.record("lm", 0.3)
    assert not chooser.beside()
    clock[0] += 0.2  # ten half-lives: the old passes weigh 1/1024
    chooser.record("tower", 0.5)  # now balanced
    chooser.record("lm", 0.5)
    assert chooser.beside()


def test_auto_serves_the_same_tokens_and_moves_the_tower_inside_when_it_dominates(tiny_model_dir):
    ref = Engine(tiny_model_dir, num_threads=2, overlap_encode=False)
    eng = Engine(tiny_model_dir, num_threads=2, overlap_encode="auto")
    where: list[str] = []
    encode = eng.runner.encode
    eng.runner.encode = lambda *a: where.append(threading.current_thread().name) or encode(*a)
    colours = ("red", "blue", "green", "purple", "orange", "gray")  # distinct images: no encoder-cache hits
    asks = [{"messages": [{"role": "user", "content": [{"type": "image", "image": make_image(c, (112, 112))},
                                                       {"type": "text", "text": "What is it?"}]}]} for c in colours]
    text = {"prompt": "a long story " * 8, "sampling_params": SamplingParams(max_new_tokens=120)}
    rids = [eng.add_request(**text)]
    outs: dict[str, list[int]] = {}
    for _ in range(3):  # the text request decodes: each encode below has LM work beside it
        for out in eng.step():
            outs.setdefault(out.rid, []).extend(out.new_token_ids)
    for i, ask in enumerate(asks):
        if i == 3:  # the tower's recent passes now look dominant: the next encodes run inside the step
            eng.overlap.record("tower", 100.0)
        rids.append(eng.add_request(**ask, sampling_params=GREEDY))
        for _ in range(3):
            for out in eng.step():
                outs.setdefault(out.rid, []).extend(out.new_token_ids)
    for _ in range(500):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            outs.setdefault(out.rid, []).extend(out.new_token_ids)
    assert not eng.has_unfinished()
    expected = ref.generate([text] + [a | {"sampling_params": GREEDY} for a in asks])
    assert [outs[r] for r in rids] == [list(c.token_ids) for c in expected]
    assert where[0].startswith("encoder") and where[-1] == "MainThread" and not eng.overlap.current, where
    eng.check_integrity()


def test_serve_flags_pick_the_mode():
    from runtime.cli import build_parser
    from runtime.config import EngineConfig
    from runtime.server.cli import config_from_args

    def mode(*flags: str):
        args = build_parser().parse_args(["serve", "tiny-random", *flags])
        return EngineConfig().replace(**{k: v for k, v in config_from_args(args).engine_overrides.items()
                                         if v is not None and k in EngineConfig.__dataclass_fields__}).overlap_encode

    assert mode() == "auto" and mode("--overlap-encode", "on") is True
    assert mode("--overlap-encode", "off") is False and mode("--no-overlap-encode") is False
    with pytest.raises(SystemExit):  # contradictory flags are refused, not silently resolved
        build_parser().parse_args(["serve", "tiny-random", "--overlap-encode", "on", "--no-overlap-encode"])
