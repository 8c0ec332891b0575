"""SGLang's native `/generate` request, its mapping onto `SamplingParams`, and `meta_info` in SGLang's shape.

Where SGLang is loose, the choices made here:
- `finish_reason` is SGLang's `{"type": "stop", "matched": id_or_str}`, `{"type": "length", "length": n}`
  or `{"type": "abort", "message": ...}` (SGLang itself uses `length`, not `matched`, for length stops).
- `logprob_start_len` -1 (the default) means the last prompt token only, as SGLang's scheduler does.
- Sampling keys the SGLang frontend always sends but that change nothing here (`spaces_between_special_tokens`,
  `no_stop_trim`, `stream_interval`, `custom_params`) are accepted; `stop_regex`, `ebnf`, `structural_tag`
  and `logit_bias` are refused when set. Unknown keys are refused, as SGLang does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from epdlang.errors import InvalidRequest
from epdlang.sampling import SamplingParams
from runtime.messages import TokenLogprob
from runtime.server.openai_protocol import Int64
from runtime.server.serving import Accum

DEFAULT_MAX_NEW_TOKENS = 128
UNSUPPORTED = ("stop_regex", "ebnf", "structural_tag", "logit_bias")


class SglSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    regex: str | None = None
    json_schema: str | dict | None = None
    n: int | None = None
    sampling_seed: Int64 | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stream_interval: int | None = None
    custom_params: dict | None = None
    stop_regex: Any = None
    ebnf: Any = None
    structural_tag: Any = None
    logit_bias: Any = None

    def to_params(self, max_new_tokens: int, logprobs: int | None, prompt_logprobs_start: int | None,
                  max_stop: int) -> SamplingParams:
        set_unsupported = [k for k in UNSUPPORTED if getattr(self, k) not in (None, {}, [])]
        if set_unsupported:
            raise InvalidRequest(f"sampling parameters not supported: {set_unsupported}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > max_stop:
            raise InvalidRequest(f"at most {max_stop} stop strings are allowed")
        schema = json.dumps(self.json_schema) if isinstance(self.json_schema, dict) else self.json_schema
        values = dict(
            max_new_tokens=max_new_tokens, min_new_tokens=self.min_new_tokens, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens, regex=self.regex,
            json_schema=schema, seed=self.sampling_seed, logprobs=logprobs,
            prompt_logprobs_start=prompt_logprobs_start,
        )
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})


class GenerateReqInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    image_data: str | list[str | list[str] | None] | None = None
    sampling_params: SglSampling | list[SglSampling] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    session_id: str | None = None

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def prompts(self) -> list[str | list[int]]:
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequest("give exactly one of text or input_ids")
        value = self.text if self.text is not None else self.input_ids
        if not value:
            raise InvalidRequest("the prompt must not be empty")
        return list(value) if self.is_batch else [value]

    def per_prompt(self, name: str, n: int, default: Any) -> list[Any]:
        """A field given once (for every prompt) or as a list of one value per prompt."""
        value = getattr(self, name)
        if value is None:
            return [default] * n
        if isinstance(value, list) and (self.is_batch or name != "image_data"):
            if len(value) != n:
                raise InvalidRequest(f"{name} has {len(value)} entries for {n} prompts")
            return [default if v is None else v for v in value]
        return [value] * n

    def images(self, n: int) -> list[list[str]]:
        return [[v] if isinstance(v, str) else list(v) for v in self.per_prompt("image_data", n, [])]


class TokenizeReqInput(BaseModel):
    """SGLang's `/tokenize`: one prompt or a list of them; `model` is accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None


@dataclass(frozen=True)
class LogprobOptions:
    enabled: bool
    start: int | None  # first prompt position with an input logprob (None: no input logprobs)
    top_n: int
    with_text: bool
    input_ids: tuple[int, ...]


def finish_reason(acc: Accum) -> dict | None:
    if not acc.finished:
        return None
    if acc.finish_reason == "stop":
        return {"type": "stop", "matched": acc.matched_stop}
    if acc.finish_reason == "length":
        return {"type": "length", "length": acc.completion_tokens}
    return {"type": "abort", "message": acc.error or "aborted"}


def _triple(lp: float | None, token: int, texts: dict[int, str], with_text: bool) -> list:
    return [lp, token, texts.get(token) if with_text else None]


def _tops(lp: TokenLogprob | None, texts: dict[int, str], with_text: bool) -> list | None:
    return None if lp is None else [_triple(v, t, texts, with_text) for t, v in lp.top]


def logprob_ids(acc: Accum, opts: LogprobOptions, sent: int = 0) -> set[int]:
    """Token ids whose text the logprob fields need (output tokens from position `sent` on)."""
    if not (opts.enabled and opts.with_text):
        return set()
    new = acc.logprobs[sent:]
    ids = set(acc.token_ids[sent:]) | set(opts.input_ids[opts.start or 0:])
    return ids | {t for lp in (*new, *acc.prompt_logprobs) if lp for t, _ in lp.top}


def meta_info(acc: Accum, opts: LogprobOptions, texts: dict[int, str], e2e: float, sent: int = 0) -> dict:
    """SGLang's meta_info. In a stream, the output logprob lists hold only the tokens after `sent` (the
    ones earlier chunks did not carry), as SGLang's incremental streaming does, while
    `output_token_logprobs_length` counts every output token so far."""
    info = {"id": acc.rid, "finish_reason": finish_reason(acc), "prompt_tokens": acc.prompt_tokens,
            "completion_tokens": acc.completion_tokens, "cached_tokens": acc.cached_tokens,
            "weight_version": "default", "e2e_latency": round(e2e, 6)}
    if not opts.enabled:
        return info
    w = opts.with_text
    start = opts.start or 0
    prompt = [(lp, opts.input_ids[start + k]) for k, lp in enumerate(acc.prompt_logprobs)]
    new = acc.logprobs[sent:]
    info["input_token_logprobs"] = [_triple(lp and lp.logprob, tok, texts, w) for lp, tok in prompt]
    info["output_token_logprobs"] = [_triple(lp.logprob, lp.token_id, texts, w) for lp in new]
    info["output_token_logprobs_length"] = len(acc.logprobs)
    if opts.top_n > 0:
        info["input_top_logprobs"] = [_tops(lp, texts, w) for lp, _ in prompt]
        info["output_top_logprobs"] = [_tops(lp, texts, w) for lp in new]
    return info


def output(acc: Accum, opts: LogprobOptions, texts: dict[int, str], e2e: float, index: int | None,
           sent: int = 0) -> dict:
    out = {"text": acc.text, "output_ids": list(acc.token_ids), "meta_info": meta_info(acc, opts, texts, e2e, sent)}
    if index is not None:
        out["index"] = index
    return out
