"""The router's role switching with the planner's model: the move the planner's capacity bound names for the
requests of the last window, made only after it is named on `sustain` checks in a row; the cached-profile
lookup of `epd serve --role-switching`."""
from __future__ import annotations

import types

import torch

from runtime.cluster.role_switch import RoleSwitcher, SwitchPolicy
from runtime.cluster.router_policy import InstanceView
from runtime.cluster.topology import parse_topology
from runtime.config import Slo
from runtime.messages import GenerateRequest, ImageInput
from runtime.planner.cli import device_profile_path, load_json
from runtime.planner.costs import ProfileCosts
from runtime.planner.search import Planner, Resources
from runtime.planner.switching import PlannedMoves, planned_moves, shape_of
from runtime.planner.workload import Shape

POLICY = SwitchPolicy(sustain=3)


def chooser(gpus: int) -> PlannedMoves:
    costs = ProfileCosts(load_json(device_profile_path("h100-qwen2-vl-7b")), "gpu")
    return PlannedMoves(Planner([], costs, Slo(3000.0, 100.0), Resources(gpus=gpus)))


def encode_heavy(n: int) -> list[GenerateRequest]:
    pixels = torch.zeros(4, 8)
    image = [ImageInput(f"h{i}", pixels, (1, 64, 64), 1024) for i in range(4)]
    return [GenerateRequest(f"e{i}", (1,) * 4200, tuple(image), types.SimpleNamespace(max_new_tokens=2))
            for i in range(n)]


def decode_heavy(n: int) -> list[GenerateRequest]:
    return [GenerateRequest(f"d{i}", (1,) * 64, (), types.SimpleNamespace(max_new_tokens=1024)) for i in range(n)]


def shapes(msgs: list[GenerateRequest]) -> list[Shape]:
    return [shape_of(m) for m in msgs]


def switcher_over(specs: list[str], recent: list[GenerateRequest]) -> RoleSwitcher:
    views = {f"{s}{i}": InstanceView(f"{s}{i}", frozenset(s)) for i, s in enumerate(specs)}
    switcher = RoleSwitcher(types.SimpleNamespace(views=views), POLICY, chooser(len(specs)))
    for msg in recent:
        switcher.note(msg)
    return switcher


def test_the_planner_moves_a_decoder_to_prefill_when_image_prompts_pile_up():
    # On the H100 profile a 4-image, 4200-token prompt costs P more than E (the 7B LM over 4200 tokens
    # against the 675M tower), and two-token outputs leave the decoders idle.
    move = chooser(4).best_move([frozenset("E"), frozenset("P"), frozenset("D"), frozenset("D")],
                                shapes(encode_heavy(40)), POLICY)
    assert move is not None and move[0] in (2, 3) and move[1] == frozenset("P"), move
    assert "planner" in move[2]


def test_the_planner_moves_an_encoder_to_decode_for_long_outputs_and_never_the_last_of_a_role():
    roles = [frozenset("E"), frozenset("E"), frozenset("P"), frozenset("D")]
    move = chooser(4).best_move(roles, shapes(decode_heavy(40)), POLICY)
    assert move is not None and move[0] in (0, 1) and move[1] == frozenset("D"), move
    assert chooser(3).best_move(roles[1:], shapes(decode_heavy(40)), POLICY) is None  # E is the last encoder


def test_a_move_is_made_only_once_named_on_sustain_checks_in_a_row():
    switcher = switcher_over(["E", "P", "D", "D"], encode_heavy(40))
    assert all(isinstance(s, Shape) for _, s in switcher.arrivals)  # the window keeps sizes, not pixels
    assert [switcher.planned() for _ in range(POLICY.sustain - 1)] == [None] * (POLICY.sustain - 1)
    name, roles, why = switcher.planned()
    assert name in ("D2", "D3") and roles == frozenset("P") and "capacity" in why
    assert switcher.planned() is None  # the streak starts again


def test_no_requests_in_the_window_means_no_move():
    switcher = switcher_over(["E", "P", "D", "D"], [])
    assert all(switcher.planned() is None for _ in range(2 * POLICY.sustain))


def test_serve_uses_the_planner_only_with_a_cached_profile(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    assert planned_moves(tiny_model_dir, parse_topology("E,P,D")) is None


def test_the_queue_rule_decides_when_the_router_ticks_later_than_its_checks(monkeypatch):
    # Checks every 0.1 s over a 0.5 s window, but the router's loop ticks every 0.14 s: the samples must still
    # cover the whole window (they once spanned 0.42 s of it at most, and the rule never fired).
    policy = SwitchPolicy(check_s=0.1, window_s=0.5, high=2.0, low=0.5, decode_batch=1)
    views = {name: InstanceView(name, frozenset(name[0])) for name in ("E0", "E1", "P2", "D3")}
    switcher = RoleSwitcher(types.SimpleNamespace(views=views), policy)
    clock, made = [0.0], []
    monkeypatch.setattr("runtime.cluster.role_switch.time.monotonic", lambda: clock[0])
    monkeypatch.setattr(switcher, "pressures", lambda: {"E": 0.0, "P": 0.0, "D": 16.0})
    monkeypatch.setattr(switcher, "begin", lambda *move: made.append(move))
    for i in range(1, 12):
        clock[0] = 0.14 * i
        switcher.tick()
    assert made and made[0][0] in ("E0", "E1") and made[0][1] == frozenset("D"), made
