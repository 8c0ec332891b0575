"""Per-request state inside one instance's scheduler."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.messages import GenerateRequest, TokenLogprob

_arrival = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # needs (more) prefill
    RUNNING = "running"  # prompt fully in KV, decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    msg: GenerateRequest
    positions: torch.Tensor  # [3, prompt_len] M-RoPE positions of the prompt
    rope_delta: int
    detok: Any  # IncrementalDetokenizer
    sampling_state: Any  # sampler.SamplingState
    arrival: int = field(default_factory=lambda: next(_arrival))
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # block table: page of positions [j*ps, (j+1)*ps)
    num_shared_pages: int = 0  # leading pages owned by the prefix cache (locked), not by this request
    prefix_node: Any = None
    prompt_keys: list | None = None  # radix-cache keys of the prompt (image tokens keyed by content hash)
    num_computed: int = 0  # tokens whose KV is in the pool
    cached_tokens: int = 0
    image_embeds: list[torch.Tensor | None] = field(default_factory=list)
    _mm_embeds: torch.Tensor | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    prompt_logprobs_sent: bool = False  # complete once the first token is out; sent with that delta
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    error: str | None = None

    @property
    def rid(self) -> str:
        return self.msg.rid

    @property
    def prompt_len(self) -> int:
        return len(self.msg.input_ids)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def priority_key(self) -> tuple[int, int]:
        """Smaller runs first and is preempted last."""
        return (self.msg.priority, self.arrival)

    def token_ids(self, start: int, end: int) -> list[int]:
        ids = self.msg.input_ids
        if end <= len(ids):
            return list(ids[start:end])
        return list(ids[start:]) + self.output_ids[max(0, start - len(ids)): end - len(ids)]

    def position_slice(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions for tokens [start, end); past the prompt all three axes are index + delta."""
        p = self.prompt_len
        head = self.positions[:, start:min(end, p)]
        if end <= p:
            return head
        tail = torch.arange(max(start, p), end, dtype=torch.long) + self.rope_delta
        return torch.cat([head, tail.expand(3, -1)], dim=1)

    @property
    def prompt_logprobs_covered(self) -> int | None:
        """Prompt positions below this have their logprob entry (None when none were asked for)."""
        start = self.msg.sampling.prompt_logprobs_start
        return None if start is None else start + len(self.prompt_logprobs)

    @property
    def images_ready(self) -> bool:
        return all(e is not None for e in self.image_embeds)

    def mm_embeds(self) -> torch.Tensor | None:
        """Every image's embeddings in prompt order, concatenated once all are encoded."""
        if self._mm_embeds is None and self.image_embeds and self.images_ready:
            self._mm_embeds = torch.cat(self.image_embeds)
        return self._mm_embeds
