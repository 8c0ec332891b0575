"""Same tokens on every topology: each role set runs in its own processes, and the greedy (and seeded)
outputs equal the single-process `runtime.Engine`'s, request for request (the deployment's compact uint8
pixels against the engine's float32 ones)."""
from __future__ import annotations

import pytest

from deployment_helpers import ENGINE_ARGS, alive, prepare, run_all, tokens
from epdlang.sampling import SamplingParams
from images import make_image
from runtime.cluster.deployment import Deployment
from runtime.cluster.transfer import list_segments
from runtime.engine.core import Engine

TOPOLOGIES = ["EPD", "E,PD", "EP,D", "ED,P", "E,P,D", "2E,P,D"]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": p} if not isinstance(p, str)
                                         else {"type": "text", "text": p} for p in parts]}]


def cases() -> dict[str, tuple[dict, SamplingParams]]:
    three = [make_image(c, (112, 112)) for c in ("red", "green", "blue")]
    return {
        "text": ({"prompt": "The quick brown fox"}, GREEDY),
        "one_image": ({"messages": _user(make_image("orange", (168, 112)), "What is this?")}, GREEDY),
        "three_images": ({"messages": _user(*three, "Compare them.")}, GREEDY),
        "same_image_twice": ({"messages": _user(three[0], three[0], "Same?")}, GREEDY),
        "long_output": ({"messages": _user(make_image("purple", (112, 112)), "Tell a story.")},
                        SamplingParams(max_new_tokens=40, ignore_eos=True)),
        "stop_string": ({"prompt": "Count: 1 2 3"}, SamplingParams(max_new_tokens=30, stop=("e",))),
        "regex": ({"messages": _user(make_image("cyan", (112, 112)), "Name a color.")},
                  SamplingParams(max_new_tokens=20, regex="[a-z]{3,9}")),
        "seeded": ({"messages": _user(make_image("yellow", (112, 112)), "Go.")},
                   SamplingParams(max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)),
        "penalties": ({"prompt": "a a a a"},
                      SamplingParams(max_new_tokens=16, repetition_penalty=1.3, presence_penalty=0.5)),
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict[str, tuple[int, ...]]:
    engine = Engine(tiny_model_dir, **ENGINE_ARGS)
    out = {}
    for name, (request, params) in cases().items():
        out[name] = engine.generate(dict(request), params)[0].token_ids
    return out


@pytest.mark.parametrize("spec,transfer", [(t, "shm") for t in TOPOLOGIES] + [("E,P,D", "zmq")])
def test_tokens_equal_engine_on_every_topology(spec, transfer, tiny_model_dir, reference):
    """`zmq` is the across-hosts data plane: tensors ride as raw frames beside the control messages."""
    with Deployment(tiny_model_dir, spec, transfer=transfer, **ENGINE_ARGS) as dep:
        prefix, pids = dep.segment_prefix, list(dep.pids().values())
        assert len(pids) == len(dep.topology.instances)
        named = cases()
        msgs = [prepare(dep, request, params, rid=name) for name, (request, params) in named.items()]
        # the instances get an eighth of the pixel bytes (uint8, one frame) and expand them to the same bits
        assert {str(im.pixel_values.dtype) for m in msgs for im in m.images} == {"torch.uint8"}
        results = run_all(dep, msgs)
        for name, outs in zip(named, results):
            assert not isinstance(outs, BaseException), f"{name}: {outs}"
            assert outs[-1].finished and outs[-1].error is None, name
            assert tokens(outs) == reference[name], f"{spec} {name}"
        again = run_all(dep, msgs[:3])  # once more, now with warm caches everywhere
        assert [tokens(o) for o in again] == [reference[n] for n in list(named)[:3]]
        snap = dep.snapshot_now()
        if "," in spec and "PD" not in spec:
            assert snap["stats_handoffs_sent"] == snap["stats_handoffs_adopted"] > 0
    assert not any(alive(pid) for pid in pids)
    assert list_segments(prefix) == []


def test_two_encoders_split_one_requests_images(tiny_model_dir):
    """The 2E case: one request with three new images gets them encoded on both E instances."""
    images = [make_image(c, (140, 140)) for c in ("navy", "olive", "teal")]
    with Deployment(tiny_model_dir, "2E,P,D", **ENGINE_ARGS) as dep:
        msg = prepare(dep, {"messages": _user(*images, "Which is darkest?")}, GREEDY)
        [outs] = run_all(dep, [msg])
        assert outs[-1].finished and outs[-1].error is None
        per = dep.snapshot_now()["instances"]
        encoded = {name: per[name].get("stats_images_encoded", 0) for name in ("E0", "E1")}
        assert sorted(encoded.values()) == [1, 2], encoded
        [again] = run_all(dep, [prepare(dep, {"messages": _user(*images, "Which is darkest?")}, GREEDY)])
        assert tokens(again) == tokens(outs)
        per = dep.snapshot_now()["instances"]
        assert sum(per[n].get("stats_images_encoded", 0) for n in ("E0", "E1")) == 3  # cached: no re-encode
        assert again[-1].cached_tokens > 0  # the P instance reused the prompt's KV


def test_encoder_cache_off_still_ships_embeddings(tiny_model_dir, reference):
    """E ships what it just encoded even when its cache cannot hold it (here: disabled)."""
    args = ENGINE_ARGS | {"encoder_cache_bytes": 0}
    with Deployment(tiny_model_dir, "E,P,D", **args) as dep:
        named = {k: v for k, v in cases().items() if k in ("one_image", "three_images")}
        results = run_all(dep, [prepare(dep, r, p, rid=n) for n, (r, p) in named.items()])
        assert [tokens(o) for o in results] == [reference[n] for n in named]
