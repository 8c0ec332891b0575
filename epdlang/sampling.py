"""The one `SamplingParams`: used by the DSL, the engine, the sampler and the HTTP server."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from epdlang.errors import InvalidSamplingParams


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no output logprobs; n >= 0: chosen token plus n alternatives
    prompt_logprobs_start: int | None = None  # first prompt position whose logprob is returned
    skip_special_tokens: bool = True
    regex: str | None = None
    json_schema: str | None = None
    n: int = 1

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value or ()))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
            (self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be <= max_new_tokens"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or >= 1"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs_start is None or self.prompt_logprobs_start >= 0,
             "prompt_logprobs_start must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0"),
            (not (self.regex and self.json_schema), "regex and json_schema are mutually exclusive"),
            (1 <= self.n <= 64, "n must be in [1, 64]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidSamplingParams(message)

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        unknown = set(values) - cls.field_names()
        if unknown:
            raise InvalidSamplingParams(f"unknown sampling parameters: {sorted(unknown)}")
        return cls(**values)
