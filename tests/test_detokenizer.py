import random

import pytest
from transformers import AutoTokenizer

from epdlang.sampling import SamplingParams
from runtime.engine.detokenizer import IncrementalDetokenizer
from runtime.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_tiny_model())


def stream(tok, ids, prompt=(), **params):
    """Feed `ids` one by one; returns (detokenizer, deltas, last step)."""
    params.setdefault("max_new_tokens", len(ids))
    detok = IncrementalDetokenizer(tok, SamplingParams(**params), [tok.eos_token_id], list(prompt))
    deltas, step = [], None
    for token in ids:
        step = detok.append(token)
        deltas.append(step.new_text)
        if step.finished:
            break
    return detok, deltas, step


def test_random_token_sequences_match_a_full_decode(tok):
    rng = random.Random(0)
    for _ in range(150):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 25))]
        prompt = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 8))]
        detok, deltas, step = stream(tok, ids, prompt, ignore_eos=True)
        assert step.finished and step.finish_reason == "length"
        assert "".join(deltas) == detok.text == tok.decode(ids, skip_special_tokens=True)


def test_multibyte_text_streams_without_garbage(tok):
    text = "naïve café — 日本語のテキスト 😀🎉 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # characters really are split across tokens
    detok, deltas, _ = stream(tok, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_decoding_work_per_step_is_bounded(tok):
    calls = []

    class Counting:
        eos_token_id = tok.eos_token_id

        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode("def f(x):\n    return x + 1\n" * 20)
    detok, deltas, _ = stream(Counting(), ids, prompt=tok.encode("some prompt text here"))
    assert "".join(deltas) == tok.decode(ids)
    assert max(calls) <= 8


def test_stop_string_across_tokens_is_trimmed(tok):
    ids = tok.encode("The answer is 42.\n\nQuestion: what next?")
    stop = "\n\nQuestion"
    _, deltas, step = stream(tok, ids, stop=(stop, "never"))
    assert step.finish_reason == "stop" and step.matched_stop == stop
    assert "".join(deltas) == "The answer is 42."
    ends = [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
    start = "The answer is 42.".__len__()
    assert sum(start < e <= start + len(stop) for e in ends) >= 2  # the stop spans several tokens


def test_possible_stop_prefix_is_held_back_then_released(tok):
    text = "Quest for the Quest item"
    ids = tok.encode(text)
    detok, deltas, step = stream(tok, ids, stop=("Question",))
    for i in range(len(ids)):
        shown = "".join(deltas[: i + 1])
        assert not shown.endswith(("Q", "Qu", "Que", "Ques", "Quest")) or i == len(ids) - 1
    assert step.finish_reason == "length" and "".join(deltas) == text == detok.text


def test_eos_and_stop_tokens_finish_without_their_text(tok):
    body = tok.encode("hello world")
    _, deltas, step = stream(tok, body + [tok.eos_token_id] + body, max_new_tokens=50)
    assert (step.finish_reason, step.matched_stop) == ("stop", tok.eos_token_id)
    assert "".join(deltas) == "hello world"
    stop_id = body[-1]
    _, deltas, step = stream(tok, body, stop_token_ids=(stop_id,))
    assert (step.finish_reason, step.matched_stop) == ("stop", stop_id)


def test_ignore_eos_and_special_tokens(tok):
    eos_text = tok.decode([tok.eos_token_id])
    ids = tok.encode("hi") + [tok.eos_token_id] + tok.encode("there")
    _, deltas, step = stream(tok, ids, ignore_eos=True)
    assert step.finish_reason == "length" and "".join(deltas) == "hithere"
    _, deltas, _ = stream(tok, ids, ignore_eos=True, skip_special_tokens=False)
    assert "".join(deltas) == "hi" + eos_text + "there"


def test_min_new_tokens_defers_stops(tok):
    ids = tok.encode("ab ab ab ab")
    assert len(ids) == 4
    _, deltas, step = stream(tok, ids, stop=("ab",), min_new_tokens=2)
    assert step.finish_reason == "stop" and step.matched_stop == "ab"
    assert "".join(deltas) == "ab ab "  # the first two tokens could not stop


def test_grammar_termination_finishes_with_stop(tok):
    detok = IncrementalDetokenizer(tok, SamplingParams(max_new_tokens=10), [tok.eos_token_id])
    ids = tok.encode("123")
    steps = [detok.append(t, grammar_terminated=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert (steps[-1].finished, steps[-1].finish_reason, steps[-1].matched_stop) == (True, "stop", None)
    assert "".join(s.new_text for s in steps) == "123"
