"""Our engine against transformers on the tiny checkpoint: greedy tokens identical, prefill logits close."""
from __future__ import annotations

import pytest
import torch

from epdlang.sampling import SamplingParams
from prompts import parity_prompts
from reference import reference_greedy, reference_inputs
from runtime.engine.core import Engine

MAX_NEW = 12
PROMPTS = parity_prompts()


@pytest.fixture(scope="module")
def expected(hf_model, processor) -> dict[str, list[int]]:
    return {name: reference_greedy(hf_model, processor, processor.prepare(**spec), MAX_NEW)
            for name, spec in PROMPTS.items()}


def _run(engine: Engine, names: list[str], **params) -> dict[str, list[int]]:
    sp = SamplingParams(max_new_tokens=MAX_NEW, **params)
    outs = engine.generate([PROMPTS[n] for n in names], sp)
    engine.check_integrity()
    return {n: list(o.token_ids) for n, o in zip(names, outs)}


def test_one_at_a_time_matches_transformers(tiny_model_dir, expected):
    engine = Engine(tiny_model_dir, enable_prefix_cache=False)
    for name in PROMPTS:
        assert _run(engine, [name])[name] == expected[name], name
    assert len({tuple(v) for v in expected.values()}) == len(expected), "prompts must give distinct outputs"


@pytest.mark.parametrize("overrides", [
    {},
    {"prefill_token_budget": 48},  # chunked prefill across many steps
    {"page_size": 1, "prefill_token_budget": 100},
    {"page_size": 7, "schedule_policy": "prefill-first"},
])
def test_ragged_batch_matches_transformers(tiny_model_dir, expected, overrides):
    engine = Engine(tiny_model_dir, **overrides)
    assert _run(engine, list(PROMPTS)) == expected


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_backend": "sdpa_padded"},
    {"mixed_batches": False},
    {"mixed_token_budget": 8},
])
def test_arrivals_during_decode_match_transformers(tiny_model_dir, expected, overrides):
    """A request arriving every second step prefills while earlier ones decode: with `mixed_batches`
    (the default) both share one forward pass, and the tokens stay transformers'. While any request
    decodes, a step prefills at most `mixed_token_budget` tokens; alone, up to the prefill budget."""
    engine = Engine(tiny_model_dir, enable_prefix_cache=False, prefill_token_budget=64, **overrides)
    steps = _record_steps(engine)
    sp, rids, acc = SamplingParams(max_new_tokens=MAX_NEW), {}, {}
    queue = list(PROMPTS)
    for step in range(2000):
        if queue and step % 2 == 0:
            name = queue.pop(0)
            rids[engine.add_request(sampling_params=sp, **PROMPTS[name])] = name
        for out in engine.step():
            acc[out.rid] = acc.get(out.rid, []) + list(out.new_token_ids)
        if not queue and not engine.has_unfinished():
            break
    engine.check_integrity()
    assert {rids[r]: ids for r, ids in acc.items()} == expected
    mixed = engine.stage_seconds.get("mixed", 0.0) > 0
    assert mixed == overrides.get("mixed_batches", True)
    assert engine.stats["decode_tokens"] == sum(len(ids) - 1 for ids in expected.values())
    beside_decode = max(tokens for rows, tokens in steps if rows)
    assert beside_decode == (8 if "mixed_token_budget" in overrides else 64)
    assert max(tokens for rows, tokens in steps if not rows) > 8  # the first prompt, alone, in one step


def _record_steps(engine: Engine) -> list[tuple[int, int]]:
    """(decode rows, prefill tokens) of every step the scheduler plans."""
    steps, schedule = [], engine.scheduler.schedule

    def recorded(*args, **kwargs):
        plan = schedule(*args, **kwargs)
        steps.append((len(plan.decode), sum(c.end - c.start for c in plan.prefill)))
        return plan

    engine.scheduler.schedule = recorded
    return steps


def test_prefill_logits_match_transformers(tiny_model_dir, hf_model, processor):
    engine = Engine(tiny_model_dir)
    for name in ("image_224", "two_images", "long_text"):
        prepared = processor.prepare(**PROMPTS[name])
        with torch.inference_mode():
            ref = hf_model(**reference_inputs(processor, prepared)).logits[0].float().log_softmax(-1)
        [out] = engine.generate(PROMPTS[name], SamplingParams(max_new_tokens=1, prompt_logprobs_start=0,
                                                              logprobs=0))
        ids = prepared.input_ids
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        ours = torch.tensor([lp.logprob for lp in out.prompt_logprobs[1:]])
        theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert abs(out.logprobs[0].logprob - ref[-1].max().item()) < 1e-4
