"""Grammar-constrained decoding (regex, JSON schema, any JSON object) with llguidance.

`GrammarCompiler` wraps one tokenizer for llguidance (expensive, so once per tokenizer) and turns a
request's constraint into a `GrammarMatcher`, rejecting invalid ones with `InvalidRequest` before the
request is admitted. The sampler masks a whole batch at once with `apply_grammar_masks`.

`llguidance.hf` (transformers) and `llguidance.torch` (torch._dynamo, ~1 s) are imported on first
use, so importing this module (and the sampler) stays cheap when no request is constrained.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import llguidance
import torch
from llguidance import LLMatcher

from epdlang.errors import InvalidRequest
from epdlang.sampling import SamplingParams

_ANY_JSON_OBJECT = '{"type": "object"}'


class GrammarMatcher:
    """One request's grammar state: which tokens may come next, and whether it is done."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size

    def fill_mask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed-token bits into row `row` of an int32 CPU bitmask [B, ceil(V / 32)]."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and terminated from then on) if the grammar rejects it."""
        return self.matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        """No further token is allowed (the grammar finished, or it rejected a token)."""
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarCompiler:
    """Compiles constraints for one tokenizer. `vocab_size` is the model's logits width (it may be
    larger than the tokenizer's; the extra ids are never allowed). `eos_ids` are the ids the grammar
    allows once it is complete (default: the tokenizer's EOS).

    JSON is compact by default (no whitespace between tokens, as `json.dumps(separators=(",", ":"))`
    writes it): with llguidance's flexible whitespace a model may pad with spaces and newlines until
    max_tokens runs out. `json_whitespace_flexible=True` allows any whitespace; a schema's own
    `"x-guidance"` options (llguidance's JSON options) override either default per request."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 eos_ids: Sequence[int] | None = None, json_whitespace_flexible: bool = False) -> None:
        import llguidance.hf

        eos = list(eos_ids) if eos_ids else None
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = self.ll_tokenizer.vocab_size
        self.json_defaults = {"whitespace_flexible": json_whitespace_flexible}
        self._template = functools.lru_cache(maxsize=256)(self._build)

    def compile(self, regex: str | None = None, json_schema: str | dict | None = None,
                json_object: bool = False) -> GrammarMatcher:
        """A fresh matcher for exactly one of the constraints; InvalidRequest if it is invalid."""
        if sum((regex is not None, json_schema is not None, json_object)) != 1:
            raise InvalidRequest("give exactly one of regex, json_schema, json_object")
        if regex is not None:
            return self._matcher("regex", regex)
        if isinstance(json_schema, dict):
            json_schema = json.dumps(json_schema)
        return self._matcher("json_schema", json_schema if json_schema is not None else _ANY_JSON_OBJECT)

    def compile_params(self, params: SamplingParams) -> GrammarMatcher | None:
        """The matcher for `params.regex` / `params.json_schema`, or None if it has neither."""
        if params.regex is not None:
            return self.compile(regex=params.regex)
        if params.json_schema is not None:
            return self.compile(json_schema=params.json_schema)
        return None

    def _matcher(self, kind: str, text: str) -> GrammarMatcher:
        return GrammarMatcher(self._template(kind, text).deep_copy(), self.vocab_size)

    def _build(self, kind: str, text: str) -> LLMatcher:
        """Compiled once per distinct constraint; each request gets a deep copy."""
        try:
            if kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(text, defaults=self.json_defaults)
            else:
                grammar = llguidance.grammar_from(kind, text)
        except ValueError as e:
            raise InvalidRequest(f"invalid {kind}: {e}") from None
        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid {kind}: {matcher.get_error()}")
        return matcher


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def apply_grammar_masks(logits: torch.Tensor, matchers: Sequence[tuple[GrammarMatcher, int]]) -> None:
    """Set to -inf, in place, every logit the grammar of its row forbids.

    `matchers` pairs each constrained row of `logits` [B, V] with its matcher. The masks are
    computed in parallel by llguidance's executor and applied with one batched op.
    """
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

    rows = [row for _, row in matchers]
    bitmask = allocate_token_bitmask(len(rows), matchers[0][0].vocab_size)
    fill_next_token_bitmask_par(_executor(), [(m.matcher, k) for k, (m, _) in enumerate(matchers)], bitmask)
    masked = logits[rows]
    _apply_bitmask(masked, bitmask.to(logits.device, non_blocking=True))
    logits[rows] = masked


def _apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    from llguidance.torch import apply_token_bitmask_inplace

    # llguidance's kernel is torch.compile'd: worth it on GPU, but on CPU the first call compiles
    # C++ for many seconds, so run the same code eagerly there.
    if logits.is_cuda:
        apply_token_bitmask_inplace(logits, bitmask)
        return
    with torch.compiler.set_stance("force_eager"):
        apply_token_bitmask_inplace(logits, bitmask)
