"""The shapes task: scenes and their answers, the trainer's probe targets and checkpoint, and answer accuracy
in `epd bench --dataset shapes`. (No trained model ships yet: docs/shapes_model.md.)"""
from __future__ import annotations

import json
import random

import pytest

from benchmarks.serving.accuracy import accuracy
from benchmarks.serving.metrics import RequestResult
from benchmarks.serving.workloads import WorkloadConfig, build_workload
from runtime.shapes.probe import token_targets
from runtime.shapes.scene import (
    JSON_SCHEMA,
    Question,
    Scene,
    Shape,
    as_json,
    describe,
    held_out,
    is_correct,
    questions,
    random_scene,
)


def test_scenes_are_well_formed():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng)
        xs = [s.center_x for s in scene.shapes]
        assert xs == sorted(xs) and 1 <= len(xs) <= 3
        for s in scene.shapes:
            assert 0 <= s.x and s.x + s.size <= scene.width and 0 <= s.y and s.y + s.size <= scene.height
        kinds = [s.kind for s in scene.shapes]
        for q in questions(scene):
            if q.kind == "color":  # asked only when that shape is there once
                assert kinds.count(q.text.split()[-1].rstrip("?")) == 1


def test_answers_and_grading():
    scene = Scene(320, 224, "white", (Shape("circle", "red", 10, 10, 60), Shape("square", "blue", 120, 80, 60)))
    assert describe(scene) == "A red circle and a blue square on a white background."
    assert json.loads(as_json(scene)) == {"shapes": [{"shape": "circle", "color": "red"},
                                                     {"shape": "square", "color": "blue"}]}
    answers = {q.text: q.answer for q in questions(scene)}
    assert answers["What color is the circle?"] == "red" and answers["What shape is blue?"] == "square"
    assert answers["How many shapes are there?"] == "2" and answers["Is there a triangle?"] == "no"
    assert is_correct(Question("color", "", "red"), " Red.") and not is_correct(Question("count", "", "2"), "3")
    assert is_correct(Question("json", "", as_json(scene)), json.dumps(json.loads(as_json(scene)), indent=2))
    assert not is_correct(Question("json", "", as_json(scene)), "{not json")
    kinds = [q.kind for _, q in held_out(5, 60)]
    assert all(kinds.count(k) == 10 for k in set(kinds))


def test_probe_targets_follow_the_merge_windows(processor):
    scene = Scene(224, 168, "black", (Shape("circle", "blue", 30, 63, 64),))
    img = processor.process_image(scene.image())
    targets = token_targets(scene, img.grid_thw, image=2)
    assert targets.shape == (img.num_tokens, 5) and set(targets[:, 4].tolist()) == {2}
    rows, cols = img.grid_thw[1] // 2, img.grid_thw[2] // 2
    rank = targets[:, 2].reshape(rows, cols)
    assert rank[3, 2] == 1 and rank[0, 0] == 0 and rank[:, 5:].sum() == 0  # the circle spans x 30-94, y 63-127
    assert set(targets[:, 3].tolist()) == {0}  # one shape


@pytest.mark.timeout(300)
def test_trainer_writes_a_checkpoint_our_engine_and_transformers_agree_on(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from epdlang.sampling import SamplingParams
    from reference import reference_greedy
    from runtime.engine.core import Engine
    from runtime.preprocess import Processor
    from runtime.shapes.train import TrainConfig, train

    train(tmp_path / "m", TrainConfig(steps=2, vision_steps=2, batch=2, save_every=2, eval_n=0, focus=("json",)))
    processor = Processor(tmp_path / "m")
    scene = random_scene(random.Random(3))
    messages = [{"role": "user", "content": [{"type": "image", "image": scene.image()},
                                             {"type": "text", "text": "Describe the image."}]}]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "m", dtype="float32").eval()
    want = reference_greedy(hf, processor, processor.prepare(messages), 8)
    [out] = Engine(tmp_path / "m", kv_cache_bytes=16 << 20).generate({"messages": messages},
                                                                     SamplingParams(max_new_tokens=8))
    assert list(out.token_ids) == want


def test_bench_shapes_workload_knows_its_answers():
    reqs = build_workload(WorkloadConfig("shapes", 12))
    assert {r.question_kind for r in reqs} == {"color", "shape", "count", "exists", "describe", "json"}
    assert all(r.expected for r in reqs)
    json_reqs = [r for r in reqs if r.question_kind == "json"]
    assert all(r.response_format["json_schema"]["schema"] == JSON_SCHEMA for r in json_reqs)
    results = [RequestResult(True, text=r.expected if i % 2 == 0 else "wrong") for i, r in enumerate(reqs)]
    results[0] = RequestResult(False, text=reqs[0].expected)  # a failed request counts as wrong
    acc = accuracy(reqs, results)
    assert sum(v["total"] for v in acc.values()) == 12
    assert sum(v["right"] for v in acc.values()) == 5


def test_probe_reads_a_shapes_kind_from_the_mean_of_its_tokens():
    import torch

    from runtime.shapes.probe import Probe

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.visual = torch.nn.Module()
    model.model.visual.merger = torch.nn.Identity()
    probe = Probe(model, 8)
    tokens = torch.randn(5, 8)
    # colour, kind, rank, count, image: image 0 has a shape (rank 1) over tokens 0-1; image 1 has two
    targets = torch.tensor([[1, 2, 1, 0, 0], [1, 2, 1, 0, 0], [0, 0, 0, 0, 0], [3, 1, 1, 1, 1], [2, 3, 2, 1, 1]])
    model.model.visual.merger(tokens)  # the hook captures the merged tokens
    losses = probe.losses(targets)
    pooled = torch.stack([tokens[:2].mean(0), tokens[3], tokens[4]])
    want = torch.nn.functional.cross_entropy(probe.heads[1](pooled), torch.tensor([2, 1, 3]))
    assert torch.allclose(losses["shape"], want) and probe.tokens is None
    assert torch.allclose(losses["color"], torch.nn.functional.cross_entropy(
        probe.heads[0](tokens[[0, 1, 3, 4]]), torch.tensor([1, 1, 3, 2])))
