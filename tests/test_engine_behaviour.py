"""Engine behaviour on the real tiny model: caches, preemption, abort and bad input."""
from __future__ import annotations

import pytest

from epdlang.errors import ImageError, InvalidRequest, InvalidSamplingParams, PromptTooLong
from epdlang.sampling import SamplingParams
from images import make_image
from prompts import parity_prompts
from runtime.engine.core import Engine
from runtime.engine.scheduler import StepPlan

GREEDY = SamplingParams(max_new_tokens=10)


def _ask(image, question: str) -> dict:
    return {"messages": [{"role": "system", "content": "You look at pictures."},
                         {"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]}]}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir)


@pytest.fixture(scope="module")
def no_cache(tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir, enable_prefix_cache=False, encoder_cache_bytes=0)


def test_repeat_hits_prefix_cache_with_same_output(engine, no_cache):
    image = make_image("teal", (336, 336))
    [ref] = no_cache.generate(_ask(image, "What colour is it?"), GREEDY)
    [first] = engine.generate(_ask(image, "What colour is it?"), GREEDY)
    [second] = engine.generate(_ask(image, "What colour is it?"), GREEDY)
    assert first.token_ids == second.token_ids == ref.token_ids
    assert first.cached_tokens == 0
    page = engine.config.page_size
    assert second.cached_tokens == (second.prompt_tokens - 1) // page * page
    engine.check_integrity()


def test_same_image_new_question_skips_encode(engine, no_cache):
    image = make_image("navy", (224, 224))
    engine.generate(_ask(image, "Is it dark?"), GREEDY)
    encoded, hits = engine.stats["images_encoded"], engine.encoder_cache.hits
    [out] = engine.generate(_ask(image, "Which shapes are drawn?"), GREEDY)
    assert engine.stats["images_encoded"] == encoded and engine.encoder_cache.hits == hits + 1
    assert out.cached_tokens > 0  # the system prompt and the image pages are shared too
    [ref] = no_cache.generate(_ask(image, "Which shapes are drawn?"), GREEDY)
    assert out.token_ids == ref.token_ids
    engine.check_integrity()


def test_different_image_same_place_misses(engine):
    [a] = engine.generate(_ask(make_image("red"), "Name it."), GREEDY)
    [b] = engine.generate(_ask(make_image("blue"), "Name it."), GREEDY)
    image_start = 20  # the system prompt and the chat header come before the image
    assert b.cached_tokens < image_start + 16
    assert a.token_ids != b.token_ids


def test_small_kv_pool_preempts_and_matches(tiny_model_dir, no_cache):
    specs = list(parity_prompts().values())[:6]
    params = SamplingParams(max_new_tokens=24)
    expected = [o.token_ids for o in no_cache.generate(specs, params)]
    tight = Engine(tiny_model_dir, page_size=16, num_pages=22)
    outs = tight.generate(specs, params)
    assert [o.token_ids for o in outs] == expected
    assert tight.scheduler.num_preemptions > 0
    tight.check_integrity()
    assert tight.kv.used_pages() == tight.kv.cache.cached_pages


def test_request_that_can_never_fit_is_rejected(tiny_model_dir):
    tight = Engine(tiny_model_dir, page_size=16, num_pages=8)
    with pytest.raises(PromptTooLong, match="KV"):
        tight.add_request(**parity_prompts()["long_text"])
    with pytest.raises(PromptTooLong, match="context"):
        Engine(tiny_model_dir, max_model_len=64).add_request(**parity_prompts()["image_224"])


def test_abort_frees_pages_at_every_stage(engine):
    baseline = engine.kv.used_pages() - engine.kv.cache.cached_pages
    rid_wait = engine.add_request(**_ask(make_image("pink"), "Waiting?"), sampling_params=GREEDY)
    rid_run = engine.add_request(prompt="import os\n", sampling_params=SamplingParams(max_new_tokens=50))
    engine.step()
    engine.step()
    assert engine.abort(rid_run) and engine.abort(rid_wait)
    outs = {o.rid: o for o in engine.step()}
    assert outs[rid_run].finish_reason == outs[rid_wait].finish_reason == "abort"
    assert engine.kv.used_pages() - engine.kv.cache.cached_pages == baseline
    assert not engine.has_unfinished()
    engine.check_integrity()


def test_n_copies_share_prefix_pages(engine):
    spec = _ask(make_image("olive", (224, 224)), "Tell me a story.")
    engine.generate(spec, SamplingParams(max_new_tokens=1))
    outs = engine.generate([spec] * 3, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    page = engine.config.page_size
    assert all(o.cached_tokens == (o.prompt_tokens - 1) // page * page > 64 for o in outs)
    assert len({o.token_ids for o in outs}) == 1  # one seed for all copies: identical samples
    engine.check_integrity()


@pytest.mark.parametrize("bad, error", [
    ({"prompt": ""}, InvalidRequest),
    ({"messages": []}, InvalidRequest),
    ({"input_ids": [1, 2, 10**9]}, InvalidRequest),
    ({"input_ids": [-5, 3]}, InvalidRequest),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}]}, ImageError),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "/no/such/file.png"}]}]}, ImageError),
])
def test_bad_input_raises_typed_error_and_others_continue(engine, no_cache, bad, error):
    good = parity_prompts()["image_224"]
    [ref] = no_cache.generate(good, GREEDY)
    rid = engine.add_request(**good, sampling_params=GREEDY)
    outs = [o for o in engine.step() if o.rid == rid]
    with pytest.raises(error):
        engine.add_request(**bad, sampling_params=GREEDY)
    for _ in range(100):
        outs += [o for o in engine.step() if o.rid == rid]
        if outs and outs[-1].finished:
            break
    assert tuple(t for o in outs for t in o.new_token_ids) == ref.token_ids
    engine.check_integrity()


def test_contradictory_sampling_params_rejected():
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(max_new_tokens=4, min_new_tokens=8)
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(regex="a+", json_schema="{}")


def test_generated_image_pad_token_is_plain_text(engine, processor):
    """A random model may emit <|image_pad|>: decode and recompute must embed it as text, not an image."""
    rid = engine.add_request(**_ask(make_image("gold"), "Go."), sampling_params=SamplingParams(max_new_tokens=6))
    while engine.scheduler.waiting:
        engine.step()
    req = engine.reqs[rid]
    req.output_ids[-1] = processor.image_token_id  # as if sampled
    engine.step()  # decode it
    engine.scheduler._preempt(req, StepPlan())  # recompute it
    outs = []
    for _ in range(50):
        outs += [o for o in engine.step() if o.rid == rid]
        if outs and outs[-1].finished:
            break
    assert outs[-1].finish_reason == "length" and outs[-1].error is None
    engine.check_integrity()


def test_encoder_and_lm_threads_split_the_cores_only_while_both_work(tiny_model_dir, red_image, blue_image):
    import threading

    import torch

    eng = Engine(tiny_model_dir, num_threads=2, overlap_encode=True)
    seen: list[tuple[str, bool, int]] = []  # (thread, other stage busy, threads it then uses)
    share = eng.threads.apply
    eng.threads.apply = lambda busy: share(busy) or seen.append(
        (threading.current_thread().name, busy, torch.get_num_threads()))
    text = eng.add_request(prompt="a long story " * 8, sampling_params=SamplingParams(max_new_tokens=40))
    for _ in range(3):
        eng.step()  # the text request alone: prefill, then decode with both threads
    eng.add_request(**_ask(red_image, "What is it?"), sampling_params=GREEDY)
    eng.add_request(**_ask(blue_image, "What is it?"), sampling_params=GREEDY)
    for _ in range(300):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished() and text not in eng.reqs
    main, encoder = [s for s in seen if s[0] == "MainThread"], [s for s in seen if s[0] != "MainThread"]
    assert (False, 2) in [s[1:] for s in main] and (True, 1) in [s[1:] for s in main]  # LM beside an encode
    assert (False, 2) in [s[1:] for s in encoder]  # the first encode runs beside decode only: every thread
    assert all(n == (1 if busy else 2) for _, busy, n in seen)


def test_an_encode_with_no_lm_work_beside_it_runs_on_the_loop_thread(tiny_model_dir, red_image, blue_image):
    import threading

    eng = Engine(tiny_model_dir, num_threads=2, overlap_encode=True)
    threads: list[str] = []
    encode = eng.runner.encode
    eng.runner.encode = lambda *a: threads.append(threading.current_thread().name) or encode(*a)
    [alone] = eng.generate([_ask(red_image, "What is it?")], GREEDY)
    assert threads == ["MainThread"]
    eng.add_request(prompt="a long story " * 8, sampling_params=SamplingParams(max_new_tokens=40))
    for _ in range(3):
        eng.step()  # prefill, then decode: the next encode has LM work beside it
    eng.add_request(**_ask(blue_image, "What is it?"), sampling_params=GREEDY)
    for _ in range(300):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished()
    assert threads[1:] == ["encoder_0"]
    [again] = eng.generate([_ask(red_image, "What is it?")], GREEDY)  # encoder cache: no third encode
    assert again.token_ids == alone.token_ids and len(threads) == 2


def test_without_overlap_every_stage_keeps_all_threads(tiny_model_dir, red_image):
    """A pass of one row runs at one torch thread with its large matmuls split over both (models/gemv.py)."""
    import torch

    from runtime.models.gemv import split_parts

    eng = Engine(tiny_model_dir, num_threads=2, overlap_encode=False)
    seen: list[tuple[int, int, int]] = []  # (rows, torch threads, one-row split) per pass
    encode, run = eng.runner.encode, eng.runner.run
    eng.runner.encode = lambda *a: seen.append((2, torch.get_num_threads(), split_parts())) or encode(*a)
    eng.runner.run = lambda chunks, dec: seen.append(
        (min(2, sum(c.num_tokens for c in chunks)), torch.get_num_threads(), split_parts())) or run(chunks, dec)
    eng.generate([_ask(red_image, "What is it?"), {"prompt": "a long story " * 8}], GREEDY)
    assert len(seen) > 3 and set(seen) == {(2, 2, 1), (1, 1, 2)}  # the last tokens of the longer answer: one row
    seen.clear()
    eng.set_num_threads(1)  # as `epd plan` profiles each thread count: a step must not restore 2
    eng.generate([_ask(red_image, "What is it, then?"), {"prompt": "a short story " * 8}], GREEDY)
    assert len(seen) > 3 and {threads for _, threads, _ in seen} == {1} and {p for *_, p in seen} == {1}
    torch.set_num_threads(2)
