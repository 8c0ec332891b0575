"""Incremental detokenization with stop handling, one `IncrementalDetokenizer` per request.

Text is decoded with vLLM's prefix/read offsets: each step decodes only the few tokens since the
last emitted character boundary (plus a short prefix for context), and emits nothing while the tail
is an incomplete UTF-8 sequence. Output that might be the start of a stop string is held back from
streaming until it is resolved; a matched stop string is trimmed from the output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from epdlang.sampling import SamplingParams

_PROMPT_CONTEXT = 5  # prompt tokens decoded as context for the first output tokens, as vLLM does
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class StepResult:
    new_text: str = ""  # text that became final with this token (stream it)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"
    matched_stop: str | int | None = None  # the stop string, or the stop/EOS token id


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas and decides when the request stops.

    `tokenizer` is a Hugging Face tokenizer or a `tokenizers.Tokenizer`; only `decode` is used.
    Stop strings and stop tokens count only after the first `min_new_tokens` tokens (the sampler
    blocks EOS and stop tokens for those).
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: Sequence[int] = (),
                 prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self.stop_ids = frozenset(params.stop_token_ids)
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._text = ""  # decoded output, stop string trimmed once matched
        self._emitted = 0  # characters of _text already returned as new_text
        self.num_tokens = 0
        self.finished = False

    @property
    def text(self) -> str:
        """The full output so far, held-back text included."""
        return self._text

    def append(self, token_id: int, grammar_terminated: bool = False) -> StepResult:
        """Add one sampled token; `grammar_terminated` ends the request with reason "stop"."""
        assert not self.finished, "append() after the request finished"
        self.num_tokens += 1
        stop = self._stop_token(token_id)
        if stop is not None:
            return self._finish("stop", stop)
        self._ids.append(token_id)
        matched = self._extend(self._decode_step())
        if matched is not None:
            return self._finish("stop", matched)
        if grammar_terminated:
            return self._finish("stop", None)
        if self.num_tokens >= self.params.max_new_tokens:
            return self._finish("length", None)
        return StepResult(self._release(len(self._text) - self._held_back()))

    def _stop_token(self, token_id: int) -> int | None:
        if self.num_tokens <= self.params.min_new_tokens:
            return None
        return token_id if token_id in self.eos_ids or token_id in self.stop_ids else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def _decode_step(self) -> str:
        """vLLM's detokenize_incrementally: new text since the read offset, or "" while incomplete."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _flush(self) -> str:
        """At the end, whatever is still pending is decoded as is (replacement characters included)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix):]

    def _extend(self, delta: str) -> str | None:
        """Append `delta`; on a stop string, trim the text at its start and return it."""
        if not delta:
            return None
        start = max(0, len(self._text) - self._longest_stop + 1)
        self._text += delta
        if self.num_tokens <= self.params.min_new_tokens:
            return None
        return self._trim_stop(start)

    def _trim_stop(self, start: int) -> str | None:
        hits = [(self._text.find(s, start), s) for s in self.params.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return None
        at, stop = min(hits)
        self._text = self._text[:at]
        return stop

    @property
    def _longest_stop(self) -> int:
        return max((len(s) for s in self.params.stop), default=0)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:k]):
                    longest = k
                    break
        return min(longest, len(self._text) - self._emitted)

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        new, self._emitted = self._text[self._emitted:upto], upto
        return new

    def _finish(self, reason: str, matched: str | int | None) -> StepResult:
        if not isinstance(matched, str):
            self._extend(self._flush())  # pending bytes become final text (a stop in them is trimmed)
        self.finished = True
        return StepResult(self._release(len(self._text)), True, reason, matched)
