"""While the vision tower runs beside them, a few decode rows wait for it instead of stepping alone."""
from __future__ import annotations

import time

from epdlang.sampling import SamplingParams
from images import make_image
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
