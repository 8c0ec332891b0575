"""Typed messages between the front end, the scheduler and (later) instances."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epdlang.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image. `content_hash` keys the encoder cache and the radix tree."""

    content_hash: str  # hex sha256 of the decoded RGB pixels plus size
    pixel_values: "torch.Tensor"  # as the checkpoint's image processor returns it (layout: model.pixel_shape())
    grid_thw: tuple[int, int, int]  # the patch grid: frames, rows, columns
    num_tokens: int  # placeholder tokens in the prompt (Qwen2-VL: t * h * w // merge**2; LLaVA: fixed)


@dataclass(frozen=True)
class GenerateRequest:
    rid: str
    input_ids: tuple[int, ...]  # image placeholders already expanded
    images: tuple[ImageInput, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first; ties follow arrival order
    session_id: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) alternatives, best first


@dataclass(frozen=True)
class RequestOutput:
    """A delta for one request: new tokens since the last output, or the final state."""

    rid: str
    new_token_ids: tuple[int, ...] = ()
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    error: str | None = None

    def then(self, later: "RequestOutput") -> "RequestOutput":
        """This delta followed by `later` (the next delta of the same request) as one delta."""
        return RequestOutput(
            rid=self.rid, new_token_ids=self.new_token_ids + later.new_token_ids,
            new_text=self.new_text + later.new_text, finished=later.finished, finish_reason=later.finish_reason,
            matched_stop=later.matched_stop, prompt_tokens=later.prompt_tokens,
            completion_tokens=later.completion_tokens, cached_tokens=later.cached_tokens,
            logprobs=self.logprobs + later.logprobs, prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
            error=later.error)
