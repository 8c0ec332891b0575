"""What `Engine.generate` returns: one request's deltas merged into its finished result."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.messages import RequestOutput


@dataclass(frozen=True)
class Completion:
    """The finished result of one request, accumulated from its deltas."""

    rid: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    logprobs: tuple = ()
    prompt_logprobs: tuple = ()
    matched_stop: str | int | None = None
    error: str | None = None


def merge_deltas(rid: str, deltas: list[RequestOutput]) -> Completion:
    last = deltas[-1] if deltas else RequestOutput(rid=rid, finish_reason="abort", finished=True)
    return Completion(
        rid=rid, text="".join(d.new_text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.new_token_ids),
        finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens,
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs), ()),
        matched_stop=last.matched_stop, error=last.error)
