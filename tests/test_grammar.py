import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from epdlang.errors import InvalidRequest
from epdlang.sampling import SamplingParams
from runtime.engine.grammar import GrammarCompiler, apply_grammar_masks
from runtime.engine.sampler import SamplingState, sample
from runtime.tiny_model import ensure_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "maximum": 999}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ensure_tiny_model())


@pytest.fixture(scope="module")
def vocab(tok):
    return (len(tok) + 127) // 128 * 128  # a model's padded logits width


@pytest.fixture(scope="module")
def compiler(tok, vocab):
    return GrammarCompiler(tok, vocab_size=vocab)


def generate(tok, vocab, state, seed=0, limit=400) -> str:
    """Sample under the grammar with random logits until the grammar (or EOS) ends it.

    EOS gets a boost so that unbounded patterns end soon once the grammar allows it.
    """
    gen = torch.Generator().manual_seed(seed)
    for _ in range(limit):
        logits = torch.randn(1, vocab, generator=gen) * 4
        logits[0, tok.eos_token_id] += 10.0
        token = sample(logits, [state]).token_ids[0]
        if token == tok.eos_token_id or state.grammar_terminated:
            break
    assert state.grammar_terminated or state.output_ids[-1] == tok.eos_token_id
    return tok.decode([t for t in state.output_ids if t != tok.eos_token_id])


def test_regex_constrained_sampling(tok, vocab, compiler):
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, regex=r"[0-9]{3}-[a-z]+")
        state = SamplingState(params, eos_ids=(tok.eos_token_id,), grammar=compiler.compile_params(params))
        assert re.fullmatch(r"[0-9]{3}-[a-z]+", generate(tok, vocab, state, seed))


def test_json_schema_constrained_sampling(tok, vocab, compiler):
    for seed in range(2):
        state = SamplingState(SamplingParams(temperature=1.0, seed=seed),  # unseeded draws follow test order
                              grammar=compiler.compile(json_schema=json.dumps(SCHEMA)))
        value = json.loads(generate(tok, vocab, state, seed))
        assert set(value) == {"name", "age"}
        assert isinstance(value["name"], str) and len(value["name"]) <= 12
        assert isinstance(value["age"], int) and value["age"] <= 999


def whitespace_allowed_after_brace(tok, vocab, matcher) -> bool:
    """Whether any token that is pure whitespace may follow the opening `{`."""
    assert matcher.accept(tok("{", add_special_tokens=False)["input_ids"][0])
    logits = torch.zeros(1, vocab)
    apply_grammar_masks(logits, [(matcher, 0)])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    return any(tok.decode([t]).isspace() for t in allowed if t < len(tok))


def test_json_is_compact_unless_flexible(tok, vocab, compiler):
    compact = json.dumps(SCHEMA)
    flexible = json.dumps(SCHEMA | {"x-guidance": {"whitespace_flexible": True}})
    assert not whitespace_allowed_after_brace(tok, vocab, compiler.compile(json_schema=compact))
    assert not whitespace_allowed_after_brace(tok, vocab, compiler.compile(json_object=True))
    assert whitespace_allowed_after_brace(tok, vocab, compiler.compile(json_schema=flexible))  # per request
    loose = GrammarCompiler(tok, vocab_size=vocab, json_whitespace_flexible=True)
    assert whitespace_allowed_after_brace(tok, vocab, loose.compile(json_schema=compact))
    strict = json.dumps(SCHEMA | {"x-guidance": {"whitespace_flexible": False}})
    assert not whitespace_allowed_after_brace(tok, vocab, loose.compile(json_schema=strict))
    state = SamplingState(SamplingParams(temperature=1.0, seed=5), grammar=compiler.compile(json_schema=compact))
    text = generate(tok, vocab, state, 5)
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


def test_json_object_and_greedy(tok, vocab, compiler):
    state = SamplingState(SamplingParams(), grammar=compiler.compile(json_object=True))
    assert isinstance(json.loads(generate(tok, vocab, state)), dict)


def test_masks_only_touch_constrained_rows(tok, compiler, vocab):
    logits = torch.randn(3, vocab)
    masked = logits.clone()
    apply_grammar_masks(masked, [(compiler.compile(regex="[0-9]+"), 1)])
    torch.testing.assert_close(masked[[0, 2]], logits[[0, 2]])
    allowed = torch.isfinite(masked[1]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).isdigit() for t in allowed)
    torch.testing.assert_close(masked[1, allowed], logits[1, allowed])


@pytest.mark.parametrize("kwargs", [
    {"regex": "[0-9"},
    {"regex": "(?<=a)b"},
    {"json_schema": "{not json"},
    {"json_schema": '{"type": "objec"}'},
    {},
    {"regex": "a", "json_object": True},
])
def test_invalid_constraints_raise_invalid_request(compiler, kwargs):
    with pytest.raises(InvalidRequest):
        compiler.compile(**kwargs)


def test_invalid_regex_message_comes_from_llguidance(compiler):
    with pytest.raises(InvalidRequest, match="unclosed character class"):
        compiler.compile(regex="[0-9")


def test_single_row_fill_mask_agrees_with_batched_masks(compiler, vocab):
    matcher = compiler.compile(regex="[0-9]+")
    bitmask = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    matcher.fill_mask(bitmask, 1)
    logits = torch.zeros(1, vocab)
    apply_grammar_masks(logits, [(matcher, 0)])
    bits = (bitmask[1, :, None] >> torch.arange(32)) & 1
    assert bits.flatten()[:vocab].bool().tolist() == torch.isfinite(logits[0]).tolist()
    assert not bitmask[0].any()


def test_serve_flag_makes_json_whitespace_flexible(tiny_model_dir):
    from runtime.cli import build_parser
    from runtime.engine.core import Engine
    from runtime.server.cli import config_from_args

    for argv, flexible in ((["serve", str(tiny_model_dir)], False),
                           (["serve", str(tiny_model_dir), "--json-whitespace-flexible"], True)):
        overrides = config_from_args(build_parser().parse_args(argv)).engine_overrides
        engine = Engine(tiny_model_dir, kv_cache_bytes=8 << 20, **overrides)
        assert engine.grammar_compiler().json_defaults == {"whitespace_flexible": flexible}
