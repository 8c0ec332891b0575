import torch
from transformers import RepetitionPenaltyLogitsProcessor

from epdlang.sampling import SamplingParams
from runtime.engine.sampler import SamplingState, _process, prompt_logprobs, sample

V = 64


def states(*params: SamplingParams, **kw) -> list[SamplingState]:
    return [SamplingState(p, **kw) for p in params]


def logits_for(probs: list[float], vocab: int = V) -> torch.Tensor:
    """Logits whose softmax puts `probs` on the first tokens and the rest (~0) elsewhere."""
    x = torch.full((vocab,), -1e4)
    x[: len(probs)] = torch.tensor(probs).log()
    return x


def test_greedy_is_argmax_of_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, V)
    params = [SamplingParams(), SamplingParams(temperature=0.8, seed=1), SamplingParams(top_k=1, temperature=0.5),
              SamplingParams(), SamplingParams(temperature=1.3)]
    out = sample(logits, states(*params))
    expected = logits.argmax(-1).tolist()
    for i in (0, 2, 3):
        assert out.token_ids[i] == expected[i]


def test_top_k_one_equals_greedy_and_top_k_two_keeps_two():
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    assert sample(logits, states(*[SamplingParams(top_k=1, temperature=2.0)] * 4)).token_ids == \
        sample(logits, states(*[SamplingParams()] * 4)).token_ids
    top2 = set(logits[0].topk(2).indices.tolist())
    st = SamplingState(SamplingParams(top_k=2, temperature=5.0, seed=3))
    drawn = {sample(logits[:1], [st]).token_ids[0] for _ in range(200)}
    assert drawn == top2


def test_seeded_sampling_is_reproducible_and_batch_independent():
    torch.manual_seed(2)
    steps = [torch.randn(3, V) for _ in range(20)]
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = SamplingState(p)
    tokens_alone = [sample(x[1:2], [alone]).token_ids[0] for x in steps]
    batch = states(SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.7, seed=5))
    tokens_batched = [sample(x, batch).token_ids[1] for x in steps]
    assert tokens_alone == tokens_batched
    again = SamplingState(p)
    assert [sample(x[1:2], [again]).token_ids[0] for x in steps] == tokens_alone
    other = SamplingState(p.replace(seed=43))
    assert [sample(x[1:2], [other]).token_ids[0] for x in steps] != tokens_alone


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 300) -> torch.Tensor:
    st = SamplingState(params)
    return torch.bincount(torch.tensor([sample(logits[None], [st]).token_ids[0] for _ in range(n)]),
                          minlength=logits.shape[0])


def test_top_p_excludes_the_tail():
    counts = draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0), logits_for([0.5, 0.3, 0.15, 0.05]))
    assert counts[2:].sum() == 0
    assert 0.5 < counts[0] / 300 < 0.75  # renormalized: 0.5 / 0.8 = 0.625


def test_min_p_excludes_tokens_below_the_scaled_floor():
    counts = draws(SamplingParams(temperature=1.0, min_p=0.2, seed=0), logits_for([0.5, 0.3, 0.15, 0.05]))
    assert counts[3:].sum() == 0  # floor 0.2 * 0.5 = 0.1
    assert (counts[:3] > 0).all()


def test_unrestricted_sampling_follows_the_distribution():
    counts = draws(SamplingParams(temperature=1.0, seed=0), logits_for([0.5, 0.3, 0.15, 0.05]), n=400)
    assert counts[4:].sum() == 0
    assert abs(counts[0] / 400 - 0.5) < 0.1 and counts[3] > 0


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(3)
    logits = torch.randn(1, V)
    prompt, output = [1, 2, 3, 5], [5, 7, 7]
    st = SamplingState(SamplingParams(repetition_penalty=1.7), prompt_ids=prompt, output_ids=list(output))
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(_process(logits, [st]), expected)


def test_frequency_and_presence_penalties_use_output_counts_only():
    torch.manual_seed(4)
    logits = torch.randn(2, V)
    st = SamplingState(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt_ids=[9],
                       output_ids=[4, 4, 4, 6])
    plain = SamplingState(SamplingParams())
    expected = logits[0].clone()
    expected[4] -= 0.5 * 3 + 0.25
    expected[6] -= 0.5 * 1 + 0.25
    processed = _process(logits, [st, plain])
    torch.testing.assert_close(processed[0], expected)
    torch.testing.assert_close(processed[1], logits[1])


def test_penalty_counts_follow_sampled_tokens():
    logits = torch.zeros(1, V)
    logits[0, 3] = 1.0
    st = SamplingState(SamplingParams(presence_penalty=2.0))
    assert [sample(logits, [st]).token_ids[0] for _ in range(2)] == [3, 0]


def test_min_new_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11], logits[0, 12] = 9.0, 8.0, 7.0
    st = SamplingState(SamplingParams(min_new_tokens=3, stop_token_ids=(11,)), eos_ids=(10,))
    assert [sample(logits, [st]).token_ids[0] for _ in range(4)] == [12, 12, 12, 10]
    ignoring = SamplingState(SamplingParams(min_new_tokens=1, ignore_eos=True), eos_ids=(10,))
    assert sample(logits, [ignoring]).token_ids == [10]


def test_logprobs_are_raw_log_softmax_with_sorted_top_n():
    torch.manual_seed(5)
    logits = torch.randn(3, V)
    params = [SamplingParams(logprobs=3, temperature=0.5, seed=1, repetition_penalty=2.0),
              SamplingParams(), SamplingParams(logprobs=0)]
    out = sample(logits, states(*params, prompt_ids=[0, 1]))
    ref = logits.log_softmax(-1)
    assert out.logprobs[1] is None
    first, third = out.logprobs[0], out.logprobs[2]
    assert first.token_id == out.token_ids[0]
    assert abs(first.logprob - ref[0, first.token_id].item()) < 1e-5
    assert [t for t, _ in first.top] == ref[0].topk(3).indices.tolist()
    values = [v for _, v in first.top]
    assert values == sorted(values, reverse=True)
    torch.testing.assert_close(torch.tensor(values), ref[0].topk(3).values)
    assert third.top == () and abs(third.logprob - ref[2].max().item()) < 1e-5


def test_prompt_logprobs_score_each_target():
    torch.manual_seed(6)
    logits = torch.randn(4, V)
    targets = [3, 1, 4, 1]
    out = prompt_logprobs(logits, targets, top_n=2)
    ref = logits.log_softmax(-1)
    assert [e.token_id for e in out] == targets
    for j, entry in enumerate(out):
        assert abs(entry.logprob - ref[j, targets[j]].item()) < 1e-5
        assert [t for t, _ in entry.top] == ref[j].topk(2).indices.tolist()
    assert prompt_logprobs(logits[:0], [], top_n=2) == []
