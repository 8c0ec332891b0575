"""Builds ForwardBatches over a KVPool for tests: pages per sequence, block tables, slots."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.engine.page_allocator import PageAllocator
from runtime.models.forward_batch import ForwardBatch, KVPool


@dataclass
class Sequence:
    """A sequence's KV pages and how many of its positions are already in the pool."""

    pages: list[int] = field(default_factory=list)
    kv_len: int = 0


@dataclass
class Step:
    """New tokens of one sequence for one pass, with their M-RoPE positions `[3, n]`."""

    seq_id: int
    token_ids: list[int]
    positions: torch.Tensor


class PagedSequences:
    """Tracks page lists of sequences and turns a list of `Step`s into a ForwardBatch."""

    def __init__(self, kv: KVPool, alloc: Callable[[int], list[int]] | None = None) -> None:
        self.page_size = kv.page_size
        self.alloc = alloc or PageAllocator(kv.num_pages).alloc
        self.seqs: dict[int, Sequence] = {}

    def slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Flat pool slots of positions [start, end), allocating pages as needed."""
        need = -(-end // self.page_size) - len(seq.pages)
        if need > 0:
            seq.pages.extend(self.alloc(need))
        pos = torch.arange(start, end)
        pages = torch.tensor(seq.pages, dtype=torch.long)[pos // self.page_size]
        return pages * self.page_size + pos % self.page_size

    def build(self, steps: list[Step], is_decode: bool = False, image_embeds: torch.Tensor | None = None,
              all_logits: bool = False) -> ForwardBatch:
        """A batch over `steps`; logits for each step's last token, or for every row if `all_logits`."""
        slots, ext, lens, rows = [], [], [], []
        for st in steps:
            seq = self.seqs.setdefault(st.seq_id, Sequence())
            n, start = len(st.token_ids), seq.kv_len
            slots.append(self.slots(seq, start, start + n))
            offset = sum(ext)
            rows.extend(range(offset, offset + n) if all_logits else [offset + n - 1])
            seq.kv_len += n
            ext.append(n)
            lens.append(seq.kv_len)
        return ForwardBatch(
            is_decode=is_decode,
            input_ids=torch.tensor([t for st in steps for t in st.token_ids], dtype=torch.long),
            positions=torch.cat([st.positions for st in steps], dim=1).long(),
            extend_lens=ext, seq_lens=lens,
            block_tables=self.block_tables([st.seq_id for st in steps]),
            out_slots=torch.cat(slots), logits_indices=torch.tensor(rows, dtype=torch.long),
            image_embeds=image_embeds,
        )

    def block_tables(self, seq_ids: list[int]) -> torch.Tensor:
        width = max(len(self.seqs[i].pages) for i in seq_ids)
        table = torch.full((len(seq_ids), width), -1, dtype=torch.long)
        for row, i in enumerate(seq_ids):
            pages = self.seqs[i].pages
            table[row, :len(pages)] = torch.tensor(pages, dtype=torch.long)
        return table


def new_pool(model, num_pages: int = 64, page_size: int = 1, dtype=None) -> KVPool:
    """An empty KV pool shaped for `model`."""
    c = model.config
    return KVPool(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim, dtype or c.dtype)


def shuffled_pages(num_pages: int, seed: int = 0) -> Callable[[int], list[int]]:
    """An allocator over shuffled page ids, so block tables are never contiguous."""
    free = list(range(num_pages))
    random.Random(seed).shuffle(free)
    return lambda n: [free.pop() for _ in range(n)]


def text_ids(n: int, seed: int, vocab: int = 280) -> list[int]:
    """`n` seeded random ids below `vocab` (the test checkpoints' special ids sit above it)."""
    rng = random.Random(seed)
    return [rng.randrange(0, vocab) for _ in range(n)]
