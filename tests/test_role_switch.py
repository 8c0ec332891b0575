"""Role switching: an instance moved to another role under load loses no request, and greedy outputs stay
those of the single-process engine, before, during and after the switch."""
from __future__ import annotations

import asyncio
import logging
import time

from deployment_helpers import ENGINE_ARGS, collect, prepare, run_all, tokens
from epdlang.sampling import SamplingParams
from images import make_image
from runtime.cluster.deployment import Deployment
from runtime.cluster.role_switch import SwitchPolicy
from runtime.engine.core import Engine
from runtime.server.metrics import Metrics

GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=256, ignore_eos=True)  # seconds of decoding on a 2-core CPU
WORDS = ("Apple", "Seven", "Quiet", "Zebra", "Maple", "Tiger", "Ocean", "Pixel", "Raven", "Lemon", "Comet",
         "Badge", "Flint", "Mirth", "Nylon", "Dwarf", "Gravy", "Heron", "Ivory", "Jumbo", "Koala", "Lyric")
# D is hot with two requests decoding (decode batch 1, high 2); E, with no image, is always cold. Window and
# check are short so that 16 requests of 256 tokens hold D hot for many windows even on a fast CPU.
QUEUE_RULE = SwitchPolicy(check_s=0.1, window_s=0.5, cooldown_s=3600.0, high=2.0, low=0.5, decode_batch=1)
COLORS = ("red", "green", "blue", "orange", "purple", "cyan", "yellow", "white", "black", "gray")


def requests(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        image = make_image(COLORS[(i + offset) % len(COLORS)], (112 + 28 * ((i + offset) % 3), 112))
        out.append({"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                             {"type": "text", "text": f"Describe {i + offset}."}]}]})
    return out


def wait_for(pred, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


async def switch_under_load(dep: Deployment, msgs: list, name: str, roles: str) -> list:
    tasks = [asyncio.create_task(collect(dep, m)) for m in msgs]
    await asyncio.sleep(0.3)  # requests are spread over the instances, some mid-decode
    dep.switch_role(name, roles)
    return await asyncio.wait_for(asyncio.gather(*tasks), 180)


def test_a_switch_under_load_loses_no_request_and_keeps_greedy_outputs(tiny_model_dir):
    # wave 2: raw prompts that share no prefix; wave 3: a burst of chats that share the template prefix,
    # which the router's prefix affinity would keep on P0 if it did not weigh load too
    wave1 = requests(8)
    wave2 = [{"prompt": f"{w} is the word number {i}"} for i, w in enumerate(("Apple", "Seven", "Quiet", "Zebra"))]
    wave3 = [{"messages": [{"role": "user", "content": f"Chat {i}."}]} for i in range(24)]  # one template prefix
    engine = Engine(tiny_model_dir, **ENGINE_ARGS)
    expected = [engine.generate(dict(r), GREEDY)[0].token_ids for r in wave1 + wave2 + wave3]
    with Deployment(tiny_model_dir, "2E,P,D", role_switching=True, **ENGINE_ARGS) as dep:
        router = dep.router
        first = asyncio.run(switch_under_load(dep, [prepare(dep, r, GREEDY) for r in wave1], "E1", "P"))
        assert all(isinstance(out, list) and out[-1].finished and not out[-1].error for out in first), first
        assert [tokens(out) for out in first] == expected[:len(wave1)]
        assert wait_for(lambda: router.stats["role_switches"] == 1), dict(router.stats)
        assert router.views["E1"].roles == frozenset("P") and router.views["E1"].draining_to is None
        msgs = [prepare(dep, r, GREEDY) for r in wave2]
        second = run_all(dep, msgs, 180)
        assert [tokens(out) for out in second] == expected[len(wave1):len(wave1) + len(wave2)]
        snap = dep.snapshot_now()
        assert snap["router_role_switches"] == 1
        assert snap["instances"]["E1"]["stats_prefill_tokens"] > 0  # the former encoder now prefills
        assert snap["instances"]["E0"]["stats_images_encoded"] > 0
        assert (snap["instances"]["E1"]["roles"], snap["instances"]["E1"]["launched_roles"]) == ("P", "E")
        before = snap["instances"]["E1"]["stats_prefill_tokens"]
        third = run_all(dep, [prepare(dep, r, GREEDY) for r in wave3], 180)
        assert [tokens(out) for out in third] == expected[len(wave1) + len(wave2):]
        # chat traffic shares the template prefix that P0 holds; the new P still gets its share of a burst
        assert dep.snapshot_now()["instances"]["E1"]["stats_prefill_tokens"] > before


def test_the_queue_rule_moves_an_idle_encoder_to_decode_by_itself(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="runtime.cluster.role_switch")
    wave1 = [{"prompt": f"{w} is the word number {i}"} for i, w in enumerate(WORDS[:16])]
    wave2 = [{"prompt": f"Say {w} again, {i} times"} for i, w in enumerate(WORDS[16:])]
    engine = Engine(tiny_model_dir, **ENGINE_ARGS)
    expected1 = [c.token_ids for c in engine.generate([dict(r) for r in wave1], LONG)]
    expected2 = [c.token_ids for c in engine.generate([dict(r) for r in wave2], GREEDY)]
    with Deployment(tiny_model_dir, "2E,P,D", role_switching=True, switch_policy=QUEUE_RULE, **ENGINE_ARGS) as dep:
        router = dep.router
        first = run_all(dep, [prepare(dep, r, LONG) for r in wave1], 300)
        assert all(isinstance(out, list) and out[-1].finished and not out[-1].error for out in first), first
        assert [tokens(out) for out in first] == expected1
        assert wait_for(lambda: router.stats["role_switches"] == 1, 30), dict(router.stats)
        moved = [v for v in router.views.values() if v.name.startswith("E") and v.roles == frozenset("D")]
        assert len(moved) == 1 and moved[0].draining_to is None, router.views
        name = moved[0].name
        assert any(f"draining {name} (E -> D): D queued" in m and "E idle" in m for m in caplog.messages)
        second = run_all(dep, [prepare(dep, r, GREEDY) for r in wave2], 180)
        assert all(isinstance(out, list) and out[-1].finished and not out[-1].error for out in second), second
        assert [tokens(out) for out in second] == expected2
        snap = dep.snapshot_now()
        assert snap["router_role_switches"] == 1  # the cooldown holds off a second move
        mine = snap["instances"][name]
        assert (mine["roles"], mine["launched_roles"], mine["draining_to"]) == ("D", "E", None)
        assert mine["stats_handoffs_adopted"] > 0 and mine["stats_decode_tokens"] > 0, mine  # it decodes now


def test_a_switch_is_counted_on_metrics():
    metrics = Metrics()
    metrics.update_engine({"router_role_switches": 2})
    assert b"epd_role_switches_total 2.0" in metrics.render()

