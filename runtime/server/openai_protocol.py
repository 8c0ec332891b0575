"""OpenAI request models (validated strictly from JSON), their mapping onto `SamplingParams`, and the
response / stream-chunk bodies."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from epdlang.errors import InvalidRequest
from epdlang.sampling import SamplingParams
from runtime.messages import TokenLogprob
from runtime.server.serving import Accum

# Ints travel to the engine as msgpack, which holds [-2**63, 2**64): wider ones are refused here, with room left
# for the sample index the server adds to a seed when n > 1.
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ImageURL(_Model):
    url: str
    detail: str | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict:
        """The message for the chat template; image parts keep their URL string under `image_url`."""
        role = "system" if self.role == "developer" else self.role
        if not isinstance(self.content, list):
            return {"role": role, "content": self.content}
        parts = []
        for i, p in enumerate(self.content):
            if p.type == "text":
                if p.text is None:
                    raise InvalidRequest(f"content part {i} needs 'text'")
                parts.append({"type": "text", "text": p.text})
            else:
                url = p.image_url.url if isinstance(p.image_url, ImageURL) else p.image_url
                if not url:
                    raise InvalidRequest("an image_url part needs 'image_url.url'")
                parts.append({"type": "image_url", "image_url": url})
        return {"role": role, "content": parts}


class JsonSchemaSpec(_Model):
    name: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    """Fields both endpoints share. Non-OpenAI extensions: top_k, min_p, repetition_penalty,
    min_tokens, stop_token_ids, ignore_eos, skip_special_tokens, regex, session_id."""

    model: str
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    regex: str | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    session_id: str | None = None
    user: str | None = None
    x_guidance: dict | None = Field(None, alias="x-guidance")  # llguidance JSON options for this request

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_new_tokens: int, logprobs: int | None, max_stop: int) -> SamplingParams:
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > max_stop:
            raise InvalidRequest(f"at most {max_stop} stop strings are allowed")
        values = dict(
            max_new_tokens=max_new_tokens, min_new_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs, regex=self.regex,
            json_schema=self._json_schema(),
        )
        return SamplingParams(**{k: v for k, v in values.items() if v is not None})

    def _json_schema(self) -> str | None:
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            schema: dict | bool = {"type": "object"}
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequest("response_format json_schema needs json_schema.schema")
        else:
            schema = fmt.json_schema.schema_
        if self.x_guidance:
            schema = {} if schema is True else schema
            if not isinstance(schema, dict):
                raise InvalidRequest("x-guidance needs an object schema")
            schema = schema | {"x-guidance": schema.get("x-guidance", {}) | self.x_guidance}
        return json.dumps(schema)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None

    def top_n(self) -> int | None:
        if self.tools:
            raise InvalidRequest("tools are not supported")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        if self.echo or self.suffix:
            raise InvalidRequest("echo and suffix are not supported")
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequest("prompt must not be empty")
        return [p] if isinstance(p[0], int) else list(p)


# ---- responses -----------------------------------------------------------------------------------

def usage(results: list[Accum], n: int) -> dict:
    """Prompt tokens count once per prompt (every n-th result starts a prompt), outputs all count."""
    firsts = results[::n]
    prompt, cached = sum(r.prompt_tokens for r in firsts), sum(r.cached_tokens for r in firsts)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(lps: list[TokenLogprob] | tuple, texts: dict[int, str]) -> dict:
    content = []
    for lp in lps:
        entry = _entry(texts[lp.token_id], lp.logprob)
        entry["top_logprobs"] = [_entry(texts[t], v) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(lps: list[TokenLogprob] | tuple, texts: dict[int, str], offset: int = 0) -> dict:
    tokens = [texts[lp.token_id] for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{texts[t]: v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def token_ids_of(lps: list[TokenLogprob] | tuple) -> set[int]:
    return {lp.token_id for lp in lps} | {t for lp in lps for t, _ in lp.top}


def chat_choice(i: int, r: Accum, logprobs: dict | None) -> dict:
    return {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs,
            "finish_reason": r.finish_reason, "matched_stop": r.matched_stop}


def completion_choice(i: int, r: Accum, logprobs: dict | None) -> dict:
    return {"index": i, "text": r.text, "logprobs": logprobs, "finish_reason": r.finish_reason,
            "matched_stop": r.matched_stop}


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage_}
