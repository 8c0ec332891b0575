"""While the vision tower runs beside them, a few decode rows wait for it instead of stepping alone."""
from __future__ import annotations

import os
import select
import time

from epdlang.sampling import SamplingParams
from images import make_image
from runtime.cluster.role_engine import RoleEngine
from runtime.cluster.transfer import make_transfer
from runtime.cluster.wire import EncodeJob, WireImage
from runtime.engine.core import Engine

LONG = SamplingParams(max_new_tokens=60, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _run(model_dir, wait_ms: float) -> tuple[int, list[list[int]]]:
    """Decode passes that started while an encode ran, and every request's output tokens."""
    eng = Engine(model_dir, num_threads=2, overlap_encode=True, decode_wait_ms=wait_ms)
    encodes: list[tuple[float, float]] = []
    decode_starts: list[float] = []
    encode, run_lm = eng.runner.encode, eng._run_lm

    def timed_encode(*args):
        t0 = time.perf_counter()
        try:
            return encode(*args)
        finally:
            encodes.append((t0, time.perf_counter()))

    def timed_lm(chunks, is_decode):
        if is_decode:
            decode_starts.append(time.perf_counter())
        return run_lm(chunks, is_decode)

    eng.runner.encode, eng._run_lm = timed_encode, timed_lm
    text = eng.add_request(prompt="a long story " * 4, sampling_params=LONG)
    outputs: dict[str, list[int]] = {text: []}
    for _ in range(3):  # the text request alone is decoding when the image arrives
        for out in eng.step():
            outputs[out.rid] += out.new_token_ids
    image = make_image("teal", (448, 448))
    chat = eng.add_request(messages=[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}], sampling_params=SHORT)
    outputs[chat] = []
    for _ in range(400):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            outputs[out.rid] += out.new_token_ids
    assert not eng.has_unfinished() and len(encodes) == 1
    start, end = encodes[0]
    beside = sum(1 for t in decode_starts if start < t < end)
    return beside, [outputs[text], outputs[chat]]


def test_one_running_request_waits_for_the_tower_and_its_tokens_do_not_change(tiny_model_dir):
    waited, waited_out = _run(tiny_model_dir, wait_ms=60_000)
    stepped, stepped_out = _run(tiny_model_dir, wait_ms=0)
    assert waited_out == stepped_out and [len(o) for o in waited_out] == [60, 6]
    # the step that starts the encode runs its decode rows right after handing the tower to its thread
    assert waited <= 1, f"{waited} decode-only steps ran while the tower was busy"
    assert stepped >= 3, f"without the wait, decode steps run beside the tower ({stepped} did)"


def test_held_rows_of_an_instance_sleep_while_its_encode_jobs_run_instead_of_spinning(tiny_model_dir):
    """An ED instance's tower runs the router's jobs on a thread of its own; rows held for it must let the
    instance loop sleep (`wait_s` > 0, woken by the job's pipe), not step empty passes that take its core."""
    def run(with_job: bool) -> tuple[int, list[int]]:
        eng = RoleEngine(tiny_model_dir, frozenset("ED"), make_transfer("zmq", "hold"), num_threads=2,
                         decode_wait_ms=60_000)
        rid = eng.add_request(prompt="a long story " * 4, sampling_params=LONG)
        tokens: list[int] = []
        for _ in range(3):
            tokens += [t for out in eng.step() for t in out.new_token_ids]
        if with_job:
            image = eng.processor.process_image(make_image("teal", (448, 448)))
            wire_image = WireImage(image.content_hash, image.grid_thw, image.num_tokens)
            eng.queue_encode(EncodeJob(wire_image), image.pixel_values)
        steps = 0
        while eng.encode_jobs_open and steps < 100:
            tokens += [t for out in eng.step() for t in out.new_token_ids]
            steps += 1
            assert eng.wait_s is None or eng.wait_s > 0, "held rows asked to step again at once"
            if select.select([eng.wake_r], [], [], 5.0 if eng.wait_s is None else eng.wait_s)[0]:
                os.read(eng.wake_r, 4096)
        for _ in range(200):
            if not eng.has_unfinished():
                break
            tokens += [t for out in eng.step() for t in out.new_token_ids if out.rid == rid]
        assert not eng.has_unfinished() and eng.stats["images_encoded"] == int(with_job)
        return steps, tokens

    steps, held = run(with_job=True)
    _, alone = run(with_job=False)
    assert 1 <= steps <= 3, f"the loop stepped {steps} times while the tower ran"
    assert held == alone and len(held) == 60
