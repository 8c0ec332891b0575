"""Batched sampling over fp32 logits `[B, V]`, one `SamplingParams` per row.

Everything over the vocabulary is a batched tensor op; Python work is O(batch). Order of processing:
penalties -> min_new_tokens EOS/stop masking -> grammar mask -> (greedy: argmax) or
temperature -> top-k -> top-p -> min-p -> draw.

Logprobs are those of the *raw* model distribution (log_softmax of the logits as the model returned
them, before penalties, masks and temperature), which is vLLM's default: they say what the model
believes, independent of how the token was picked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from epdlang.sampling import SamplingParams
from runtime.engine.grammar import GrammarMatcher, apply_grammar_masks
from runtime.messages import TokenLogprob


@dataclass(eq=False)
class SamplingState:
    """What the sampler keeps per request. `sample()` appends each chosen token to it."""

    params: SamplingParams
    eos_ids: tuple[int, ...] = ()
    prompt_ids: Sequence[int] = ()
    grammar: GrammarMatcher | None = None
    output_ids: list[int] = field(default_factory=list)
    _generator: torch.Generator | None = field(default=None, repr=False)
    _counts: torch.Tensor | None = field(default=None, repr=False)  # [V] output token counts
    _in_prompt: torch.Tensor | None = field(default=None, repr=False)  # [V] bool

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0

    @property
    def blocked_ids(self) -> tuple[int, ...]:
        """Token ids that may not be chosen yet: EOS and stop tokens before min_new_tokens."""
        if len(self.output_ids) >= self.params.min_new_tokens:
            return ()
        eos = () if self.params.ignore_eos else self.eos_ids
        return tuple(eos) + self.params.stop_token_ids

    @property
    def grammar_terminated(self) -> bool:
        """The grammar accepts no further token: the request should finish with reason "stop"."""
        return self.grammar is not None and self.grammar.is_terminated()

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.params.seed)
        return self._generator

    def penalty_tensors(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(output counts [V] float, prompt-or-output presence [V] bool), built once then updated."""
        if self._counts is None:
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            if self.output_ids:
                ids = torch.tensor(self.output_ids, device=device)
                self._counts.index_add_(0, ids, torch.ones(len(ids), device=device))
            self._in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._in_prompt[torch.tensor(list(self.prompt_ids), dtype=torch.long, device=device)] = True
        return self._counts, self._in_prompt | (self._counts > 0)

    def record(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        if self._counts is not None:
            self._counts[token_id] += 1
        if self.grammar is not None:
            self.grammar.accept(token_id)


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleOutput:
    """Choose one token per row of `logits` ([B, V] fp32) and record it into each state.

    Greedy rows (temperature 0 or top_k 1) take the exact argmax of the processed logits, which is
    the raw argmax when no penalty, min_new_tokens or grammar applies. Seeded rows draw with their
    own generator, so their tokens do not depend on the rest of the batch. After this call,
    `state.grammar_terminated` says whether a grammar-constrained request is done.
    """
    assert logits.dim() == 2 and logits.shape[0] == len(states)
    raw_logprobs = _raw_logprobs(logits, states)
    x = _process(logits, states)
    token_ids = _choose(x, states)
    logprobs = _gather_logprobs(raw_logprobs, token_ids, states)
    for state, tok in zip(states, token_ids):
        state.record(tok)
    return SampleOutput(token_ids, logprobs)


def _process(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Penalties and masks; returns `logits` itself when nothing applies (no copy)."""
    penalized = [i for i, s in enumerate(states) if s.has_penalties]
    blocked = [(i, t) for i, s in enumerate(states) for t in s.blocked_ids if t < logits.shape[1]]
    constrained = [i for i, s in enumerate(states) if s.grammar is not None]
    if not (penalized or blocked or constrained):
        return logits
    x = logits.clone()
    if penalized:
        x[penalized] = _apply_penalties(x[penalized], [states[i] for i in penalized])
    if blocked:
        rows, cols = zip(*blocked)
        x[list(rows), list(cols)] = float("-inf")
    if constrained:
        apply_grammar_masks(x, [(states[i].grammar, i) for i in constrained])
    return x


def _apply_penalties(x: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Repetition (HF: over prompt + output), then frequency/presence (OpenAI: over output)."""
    vocab, device = x.shape[1], x.device
    counts, seen = zip(*(s.penalty_tensors(vocab, device) for s in states))
    counts, seen = torch.stack(counts), torch.stack(seen)
    rep = _column([s.params.repetition_penalty for s in states], x)
    penalized = torch.where(x < 0, x * rep, x / rep)
    x = torch.where(seen, penalized, x)
    freq = _column([s.params.frequency_penalty for s in states], x)
    presence = _column([s.params.presence_penalty for s in states], x)
    return x - freq * counts - presence * (counts > 0).to(x.dtype)


def _choose(x: torch.Tensor, states: Sequence[SamplingState]) -> list[int]:
    choice = x.argmax(dim=-1)
    sampled = [i for i, s in enumerate(states) if not s.params.greedy]
    if sampled:
        probs = _warp([states[i].params for i in sampled], x[sampled])
        choice[sampled] = _draw(probs, [states[i] for i in sampled])
    return choice.tolist()


def _warp(params: Sequence[SamplingParams], x: torch.Tensor) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p; returns probabilities [b, V]."""
    x = x / _column([p.temperature for p in params], x)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        x = _top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
    probs = x.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        floor = probs.amax(dim=-1, keepdim=True) * _column([p.min_p for p in params], x)
        probs = probs.masked_fill(probs < floor, 0.0)
    return probs


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Masks to -inf what falls outside each row's top-k, then outside its top-p nucleus."""
    vocab = x.shape[1]
    ascending, order = x.sort(dim=-1)
    k = torch.tensor([vocab if k <= 0 else min(k, vocab) for k in top_k], device=x.device)
    kth = ascending.gather(1, (vocab - k).unsqueeze(1))
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1.0 - _column(top_p, x)
    outside[:, -1] = False  # the most likely token always survives
    ascending = ascending.masked_fill(outside, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, ascending)


def _draw(probs: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """argmax(p / q) with q ~ Exp(1) is a draw from p (the exponential race, as vLLM does it).

    q is drawn per row from the request's own generator when it has a seed, so seeded rows are
    reproducible whatever else is in the batch; unseeded rows share one batched draw.
    """
    q = torch.empty_like(probs)
    unseeded = []
    for i, state in enumerate(states):
        gen = state.generator(probs.device)
        if gen is None:
            unseeded.append(i)
        else:
            q[i].exponential_(generator=gen)
    if unseeded:
        q[unseeded] = torch.empty_like(q[unseeded]).exponential_()
    return (probs / q).argmax(dim=-1)


def _raw_logprobs(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor | None:
    if all(s.params.logprobs is None for s in states):
        return None
    return logits.log_softmax(dim=-1)


def _gather_logprobs(logprobs: torch.Tensor | None, token_ids: list[int],
                     states: Sequence[SamplingState]) -> list[TokenLogprob | None]:
    if logprobs is None:
        return [None] * len(states)
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device).unsqueeze(1))
    top_n = [s.params.logprobs or 0 for s in states]
    return _to_token_logprobs(logprobs, token_ids, chosen.squeeze(1).tolist(), top_n,
                              [s.params.logprobs is not None for s in states])


def _to_token_logprobs(logprobs: torch.Tensor, token_ids: list[int], chosen: list[float],
                       top_n: list[int], wanted: list[bool]) -> list[TokenLogprob | None]:
    """One `TokenLogprob` per row, with its top-n alternatives best first (one topk for all rows)."""
    width = max(top_n, default=0)
    top_vals, top_ids = ([], []) if width == 0 else (t.tolist() for t in logprobs.topk(width, dim=-1))
    out: list[TokenLogprob | None] = []
    for row, (tok, lp, n, want) in enumerate(zip(token_ids, chosen, top_n, wanted)):
        top = tuple(zip(top_ids[row][:n], top_vals[row][:n])) if n else ()
        out.append(TokenLogprob(tok, lp, top) if want else None)
    return out


def prompt_logprobs(logits: torch.Tensor, target_ids: Sequence[int],
                    top_n: int = 0) -> list[TokenLogprob | None]:
    """Logprob of each prompt token given its prefix: `logits[j]` ([L, V]) scores `target_ids[j]`.

    For prompt positions [a, b) pass the model outputs at positions [a - 1, b - 1) and
    `prompt_ids[a:b]`; position 0 has no prefix, so its entry (None) is the caller's to add.
    """
    assert logits.shape[0] == len(target_ids)
    if not target_ids:
        return []
    logprobs = logits.float().log_softmax(dim=-1)
    targets = list(target_ids)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device).unsqueeze(1))
    return _to_token_logprobs(logprobs, targets, chosen.squeeze(1).tolist(),
                              [top_n] * len(targets), [True] * len(targets))


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)
