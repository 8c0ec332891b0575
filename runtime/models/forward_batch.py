"""What one model forward pass receives: a ragged batch over a paged KV pool."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class KVPool:
    """Preallocated paged KV storage for every layer.

    Slot `s` of page `p` lives at flat index `p * page_size + s`. Page ids are handed out by the
    page allocator; this class only owns the tensors.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def bytes_per_page(self) -> int:
        per_slot = self.k[0, 0].numel() * self.k.element_size() * 2 * self.num_layers
        return per_slot * self.page_size


@dataclass
class ForwardBatch:
    """A ragged batch. Sequence i owns rows [cu_q[i], cu_q[i+1]) of the flattened token axis.

    Its new tokens sit at KV positions [seq_lens[i] - extend_lens[i], seq_lens[i]); earlier positions
    are already in the pool (cached prefix or earlier chunks/steps). `block_tables[i, j]` is the page
    holding positions [j * page_size, (j + 1) * page_size) of sequence i (-1 past the end).
    """

    is_decode: bool
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64, M-RoPE (t, h, w) positions
    extend_lens: list[int]  # new tokens per sequence this pass (1 for decode)
    seq_lens: list[int]  # KV length per sequence after this pass
    block_tables: torch.Tensor  # [B, max_pages] int64
    out_slots: torch.Tensor  # [T] int64 flat pool slot where each new token's K/V goes
    logits_indices: torch.Tensor  # [K] int64 rows of T whose logits are returned
    image_embeds: torch.Tensor | None = None  # [N, hidden], written in order at `image_rows`
    image_rows: torch.Tensor | None = None  # [N] rows taking image_embeds; None: every image-pad row.
    # Explicit rows matter because a model may *generate* the image-pad token; that one is plain text.
    num_decode: int = 0  # in a prefill pass: the leading sequences that add one token each (a mixed pass)

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)
