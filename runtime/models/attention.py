"""Attention backends over the paged KV pool, behind one small interface.

A backend first `plan`s a forward pass: it turns the batch's block tables into gather indices and
masks once, and every layer reuses that plan. `prefill`/`decode` then attend new queries to the
pool (the new tokens' K/V are already written there); `varlen` is block-diagonal, non-causal
attention over packed segments (the vision tower's images and windows).

A mixed pass (`ForwardBatch.num_decode` leading one-token sequences, then prefill chunks) gets a
`MixedPlan`: the decode rows attend through the backend's decode path, the rest through its prefill path,
so decode tokens share the pass's linear layers with the prefill.

Shapes: q `[T, H, D]`, k/v `[T, Hkv, D]`, pool k/v `[slots, Hkv, D]`; outputs are `[T, H, D]`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from runtime.models.forward_batch import ForwardBatch


@dataclass
class AttnPlan:
    """Per-forward indices shared by all layers. Tensors are on the model's device."""

    is_decode: bool
    block_tables: torch.Tensor  # [B, max_pages] on the model's device, -1 past a sequence's pages
    page_size: int
    mask: torch.Tensor | None  # [B, 1, Lq, Lk] bool, True = attend; None when nothing is masked
    q_dest: torch.Tensor | None  # [T] row of each query in the padded [B * Lq] layout (prefill)
    max_q: int
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    cu_q: list[int]
    extra: dict  # backend-specific

    @cached_property
    def kv_index(self) -> torch.Tensor:
        """[B, Lk] flat pool slot of every KV position (garbage past a sequence's end); built on first use,
        since page-wise decode never reads it."""
        return sequence_slots(self.block_tables, self.page_size, max(self.seq_lens))


@dataclass
class MixedPlan:
    """Plans for the two parts of a mixed pass: `num_decode` one-token rows first, then the prefill rows."""

    decode: AttnPlan
    prefill: AttnPlan
    num_decode: int


def plan_pass(backend: "AttentionBackend", batch: ForwardBatch, page_size: int,
              device: torch.device) -> AttnPlan | MixedPlan:
    """The backend's plan for `batch`; a mixed batch gets one plan per part."""
    n = batch.num_decode
    if batch.is_decode or n == 0:
        return backend.plan(batch, page_size, device)
    if n == batch.batch_size:
        return backend.plan(dataclasses.replace(batch, is_decode=True, num_decode=0), page_size, device)

    def part(rows: slice, is_decode: bool) -> ForwardBatch:
        lens = batch.seq_lens[rows]
        cols = -(-max(lens) // page_size)  # the table is as wide as the longest row of the whole batch
        return dataclasses.replace(batch, is_decode=is_decode, num_decode=0, extend_lens=batch.extend_lens[rows],
                                   seq_lens=lens, block_tables=batch.block_tables[rows, :cols])

    return MixedPlan(backend.plan(part(slice(0, n), True), page_size, device),
                     backend.plan(part(slice(n, None), False), page_size, device), n)


def attend(backend: "AttentionBackend", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
           v_pool: torch.Tensor, plan: AttnPlan | MixedPlan) -> torch.Tensor:
    """Attention for one layer of a pass planned by `plan_pass` (the new K/V are already in the pool)."""
    if isinstance(plan, MixedPlan):
        n = plan.num_decode
        return torch.cat([backend.decode(q[:n], k_pool, v_pool, plan.decode),
                          backend.prefill(q[n:], k[n:], v[n:], k_pool, v_pool, plan.prefill)])
    if plan.is_decode:
        return backend.decode(q, k_pool, v_pool, plan)
    return backend.prefill(q, k, v, k_pool, v_pool, plan)


def sequence_slots(block_tables: torch.Tensor, page_size: int, max_len: int) -> torch.Tensor:
    """Flat pool slot of positions [0, max_len) of every sequence: `[B, max_len]` (garbage past a sequence's end)."""
    pos = torch.arange(max_len, device=block_tables.device)
    page_col = (pos // page_size).clamp_max(block_tables.shape[1] - 1)
    pages = block_tables[:, page_col].clamp_min(0)
    return pages * page_size + pos % page_size


def _offsets(lens: list[int]) -> list[int]:
    """[0, l0, l0 + l1, ...]"""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _base_plan(batch: ForwardBatch, page_size: int, device: torch.device) -> AttnPlan:
    ext, lens = batch.extend_lens, batch.seq_lens
    if batch.is_decode and any(e != 1 for e in ext):
        raise ValueError("a decode batch has exactly one new token per sequence")
    prefix = [s - e for s, e in zip(lens, ext)]
    return AttnPlan(batch.is_decode, batch.block_tables.to(device), page_size, None, None, max(ext), prefix, ext,
                    lens, _offsets(ext), {})


class AttentionBackend:
    """Interface: plan once per forward, then call per layer."""

    name = "base"
    decode_cost_by = "mean"  # a decode step's attention work grows with the mean context, or the "max" (padded)

    def plan(self, batch: ForwardBatch, page_size: int, device: torch.device) -> AttnPlan:
        raise NotImplementedError

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                v_pool: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        raise NotImplementedError

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        raise NotImplementedError


def gather(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pool rows `[slots, Hkv, D]` at `index [B, L]` as `[B, Hkv, L, D]` (a view of one contiguous gather).

    `index_select` on the flat index runs at memcpy speed; advanced indexing is ~1.7x slower on CPU.
    """
    b, n = index.shape
    return pool.index_select(0, index.reshape(-1)).view(b, n, *pool.shape[1:]).transpose(1, 2)


def gather_pages(pool: torch.Tensor, pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """Whole pages `[B, P]` of the pool as `[B, Hkv, P * page_size, D]`: one block copy per page, not per slot."""
    b, n = pages.shape
    paged = pool.view(-1, page_size * pool.shape[1] * pool.shape[2])
    return paged.index_select(0, pages.reshape(-1)).view(b, n * page_size, *pool.shape[1:]).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA on `[B, H, L, D]`; grouped-query heads are shared without materialising repeats."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


class SdpaBackend(AttentionBackend):
    """torch SDPA. Decode is one padded, masked call per group of rows of similar context (`_decode_groups`).
    Prefill is one SDPA call per sequence
    (`ragged`, the default: no padding waste, and prompts without a cached prefix use the fresh
    K/V and the causal kernel) or one padded, masked call for the whole batch (`padded`)."""

    name = "sdpa"

    def __init__(self, prefill_mode: str = "ragged") -> None:
        if prefill_mode not in ("ragged", "padded"):
            raise ValueError(f"unknown prefill_mode {prefill_mode!r}")
        self.prefill_mode = prefill_mode

    def plan(self, batch: ForwardBatch, page_size: int, device: torch.device) -> AttnPlan:
        plan = _base_plan(batch, page_size, device)
        prefix, ext, lens, max_q = plan.prefix_lens, plan.extend_lens, plan.seq_lens, plan.max_q
        if batch.is_decode:
            plan.extra["groups"] = _decode_groups(plan, device)
        elif self.prefill_mode == "padded":
            plan.mask = _padded_mask(prefix, ext, lens, max_q, device)
            plan.q_dest = _padded_rows(ext, max_q, device)
        else:
            plan.extra["seq_masks"] = [_prefix_mask(p, e, device) if p else None for p, e in zip(prefix, ext)]
        return plan

    def decode(self, q, k_pool, v_pool, plan):
        groups = plan.extra["groups"]
        if len(groups) == 1:
            return _decode_group(q, k_pool, v_pool, groups[0], plan.page_size)
        out = torch.empty_like(q)
        for g in groups:
            out.index_copy_(0, g.rows, _decode_group(q.index_select(0, g.rows), k_pool, v_pool, g, plan.page_size))
        return out

    def prefill(self, q, k, v, k_pool, v_pool, plan):
        if self.prefill_mode == "padded":
            return self._prefill_padded(q, k_pool, v_pool, plan)
        out = torch.empty_like(q)
        for i, mask in enumerate(plan.extra["seq_masks"]):
            lo, hi = plan.cu_q[i], plan.cu_q[i + 1]
            if mask is None:  # no cached prefix: the fresh K/V are the whole sequence
                ks, vs = k[lo:hi], v[lo:hi]
            else:
                idx = plan.kv_index[i, :plan.seq_lens[i]]
                ks, vs = k_pool.index_select(0, idx), v_pool.index_select(0, idx)
            o = _sdpa(q[lo:hi].transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                      attn_mask=mask, is_causal=mask is None)
            out[lo:hi] = o[0].transpose(0, 1)
        return out

    def _prefill_padded(self, q, k_pool, v_pool, plan):
        t, h, d = q.shape
        b = len(plan.extend_lens)
        qp = q.new_zeros(b * plan.max_q, h, d).index_copy_(0, plan.q_dest, q)
        qp = qp.view(b, plan.max_q, h, d).transpose(1, 2)
        k, v = gather(k_pool, plan.kv_index), gather(v_pool, plan.kv_index)
        out = _sdpa(qp, k, v, attn_mask=plan.mask).transpose(1, 2).reshape(b * plan.max_q, h, d)
        return out.index_select(0, plan.q_dest)

    def varlen(self, q, k, v, cu_seqlens):
        lens = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        n, longest = len(lens), max(lens)
        if n > 1 and n * longest == q.shape[0]:  # equal segments (same-size images): a view, no gather
            qs, ks, vs = (x.view(n, longest, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            return _sdpa(qs, ks, vs).transpose(1, 2).reshape(q.shape)
        if n == 1 or n * longest > 1.25 * q.shape[0]:  # ragged: padding would waste too much
            parts = [_sdpa(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1)
                     for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
            return torch.cat(parts)
        rows, mask = _segment_rows(lens, longest, q.device)
        qs, ks, vs = (x.index_select(0, rows).view(n, longest, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = _sdpa(qs, ks, vs, attn_mask=mask).transpose(1, 2).reshape(n * longest, *q.shape[1:])
        return out.index_select(0, _padded_rows(lens, longest, q.device))


def _prefix_mask(prefix: int, ext: int, device: torch.device) -> torch.Tensor:
    """`[ext, prefix + ext]`: query i (at position prefix + i) sees positions <= prefix + i."""
    kpos = torch.arange(prefix + ext, device=device)
    return kpos[None, :] <= (prefix + torch.arange(ext, device=device))[:, None]


def _padded_mask(prefix: list[int], ext: list[int], lens: list[int], max_q: int,
                 device: torch.device, width: int | None = None) -> torch.Tensor:
    """`[B, 1, max_q, width or max_len]`; padded query rows see position 0 so that no softmax row is empty."""
    p = torch.tensor(prefix, device=device)[:, None, None]
    e = torch.tensor(ext, device=device)[:, None, None]
    qi = torch.arange(max_q, device=device)[None, :, None]
    kpos = torch.arange(width or max(lens), device=device)[None, None, :]
    mask = (kpos <= p + qi) | ((qi >= e) & (kpos == 0))
    return mask[:, None]


def _padded_rows(lens: list[int], width: int, device: torch.device) -> torch.Tensor:
    """Row of every packed token in a `[len(lens) * width]` padded layout."""
    lens_t = torch.tensor(lens, device=device)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)
    starts = torch.cumsum(lens_t, 0) - lens_t
    return seg * width + torch.arange(int(lens_t.sum()), device=device) - starts[seg]


def _segment_rows(lens: list[int], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather rows padding packed segments to `width` (pad rows read row 0), and the key mask."""
    lens_t = torch.tensor(lens, device=device)
    col = torch.arange(width, device=device)[None, :]
    starts = (torch.cumsum(lens_t, 0) - lens_t)[:, None]
    valid = col < lens_t[:, None]
    rows = torch.where(valid, starts + col, torch.zeros_like(col)).reshape(-1)
    return rows, None if bool(valid.all()) else valid[:, None, None, :]


@dataclass
class DecodeGroup:
    """Decode rows padded to one width: `rows` of the batch (None: all, in order), their `pages`
    `[n, width]` (padding reads page 0) and the key mask `[n, 1, 1, width * page_size]`."""

    rows: torch.Tensor | None
    pages: torch.Tensor
    mask: torch.Tensor


DECODE_PAD_SLACK = 1.25  # a group's padded pages may exceed its rows' own pages by this factor,
DECODE_PAD_FREE = 2048  # or by this many tokens: below it, another group's calls cost more than the copy
MAX_DECODE_GROUPS = 4  # each group costs two gathers and one SDPA call per layer


def group_by_length(pages: list[int], slack: float = DECODE_PAD_SLACK, free: int = 0,
                    limit: int = MAX_DECODE_GROUPS) -> list[list[int]]:
    """Row indices in at most `limit` groups, longest first. A row joins the current group while padding
    the group to its longest row wastes at most `slack` x its rows' pages or `free` pages (the last
    group takes whatever is left)."""
    order = sorted(range(len(pages)), key=lambda i: -pages[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        g = groups[-1] if groups else None
        area, used = (pages[g[0]] * (len(g) + 1), total + pages[i]) if g else (0, 0)
        if g is not None and (len(groups) == limit or area <= slack * used or area - used <= free):
            g.append(i)
            total = used
        else:
            groups.append([i])
            total = pages[i]
    return groups


def _decode_groups(plan: AttnPlan, device: torch.device) -> list[DecodeGroup]:
    """One padded SDPA call over a batch whose contexts differ widely would cost batch x longest context;
    grouped, a step costs about the sum of its contexts."""
    ps, lens = plan.page_size, plan.seq_lens
    groups = group_by_length([-(-n // ps) for n in lens], free=DECODE_PAD_FREE // ps)
    if len(groups) == 1:
        groups = [list(range(len(lens)))]  # the batch's own order: no reordering of q or the output
    out = []
    for g in groups:
        width = -(-max(lens[i] for i in g) // ps)
        rows = None if len(groups) == 1 else torch.tensor(g, device=device)
        table = plan.block_tables if rows is None else plan.block_tables.index_select(0, rows)
        sub = [lens[i] for i in g]
        mask = _padded_mask([n - 1 for n in sub], [1] * len(g), sub, 1, device, width=width * ps)
        out.append(DecodeGroup(rows, table[:, :width].clamp_min(0), mask))
    return out


def _decode_group(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, g: DecodeGroup,
                  page_size: int) -> torch.Tensor:
    b, h, d = q.shape
    k, v = gather_pages(k_pool, g.pages, page_size), gather_pages(v_pool, g.pages, page_size)  # [n, Hkv, Lk, D]
    # The query heads sharing a KV head become that head's query rows: no GQA expansion, and
    # the CPU kernel gets several rows per (sequence, head) instead of one.
    out = _sdpa(q.view(b, k.shape[1], -1, d), k, v, attn_mask=g.mask)
    return out.reshape(b, h, d)


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2 on CUDA: varlen kernels over gathered K/V; decode reads the paged pool directly
    when the page size is one flash-attn supports (a multiple of 256)."""

    name = "flash_attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        self._varlen, self._kvcache = flash_attn_varlen_func, flash_attn_with_kvcache

    def plan(self, batch: ForwardBatch, page_size: int, device: torch.device) -> AttnPlan:
        plan = _base_plan(batch, page_size, device)
        lens = torch.tensor(plan.seq_lens, device=device)
        valid = torch.arange(plan.kv_index.shape[1], device=device)[None, :] < lens[:, None]
        plan.extra.update(
            flat_kv=plan.kv_index[valid],
            cu_q=torch.tensor(plan.cu_q, dtype=torch.int32, device=device),
            cu_k=torch.tensor(_offsets(plan.seq_lens), dtype=torch.int32, device=device),
            seq_lens=lens.to(torch.int32),
            page_size=page_size,
            block_tables=batch.block_tables.to(device=device, dtype=torch.int32),
        )
        return plan

    def prefill(self, q, k, v, k_pool, v_pool, plan):
        return self._gathered(q, k_pool, v_pool, plan)

    def decode(self, q, k_pool, v_pool, plan):
        ps = plan.extra["page_size"]
        if ps % 256:
            return self._gathered(q, k_pool, v_pool, plan)
        shape = (-1, ps, *k_pool.shape[1:])
        out = self._kvcache(q[:, None], k_pool.view(shape), v_pool.view(shape),
                            cache_seqlens=plan.extra["seq_lens"], block_table=plan.extra["block_tables"],
                            causal=True)
        return out[:, 0]

    def _gathered(self, q, k_pool, v_pool, plan):
        idx, x = plan.extra["flat_kv"], plan.extra
        k, v = k_pool.index_select(0, idx), v_pool.index_select(0, idx)
        return self._varlen(q, k, v, x["cu_q"], x["cu_k"], plan.max_q, max(plan.seq_lens), causal=True)

    def varlen(self, q, k, v, cu_seqlens):
        cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        return self._varlen(q, k, v, cu, cu, longest, longest, causal=False)


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "sdpa": SdpaBackend,
    "sdpa_padded": lambda: SdpaBackend("padded"),
    "flash_attn": FlashAttnBackend,
}


def flash_attn_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None)


def get_backend(name: str = "auto", device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """Backend by name; "auto" picks flash_attn for fp16/bf16 on CUDA when the package is installed, else sdpa."""
    if name == "auto":
        name = "flash_attn" if flash_attn_available(device, dtype) else "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()
