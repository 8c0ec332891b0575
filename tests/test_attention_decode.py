"""The SDPA backend's decode over the paged pool, against plain attention of each row on its own."""
from __future__ import annotations

import math

import pytest
import torch

from runtime.models.attention import attend, get_backend, group_by_length, plan_pass
from runtime.models.forward_batch import ForwardBatch

PAGE, HKV, H, D = 4, 2, 4, 16


def test_rows_of_similar_length_share_a_group_and_outliers_get_their_own():
    assert group_by_length([8, 8, 8, 8]) == [[0, 1, 2, 3]]
    # 64 and 60 pad to 128 pages for 124 of their own (within 1.25x); 3 beside them would pad to 192 for 127
    assert group_by_length([2, 64, 3, 2, 60]) == [[1, 4], [2, 0], [3]]
    assert group_by_length([2, 64, 3, 2, 60], free=2) == [[1, 4], [2, 0, 3]]  # 9 pages for 7: 2 wasted
    assert group_by_length([1]) == [[0]]


def test_the_group_count_is_capped_and_every_row_is_kept():
    pages = [2 ** k for k in range(10)]
    groups = group_by_length(pages, limit=3)
    assert len(groups) == 3
    assert sorted(i for g in groups for i in g) == list(range(10))
    for g in groups:  # longest first within a group, so the first row sets the width
        assert pages[g[0]] == max(pages[i] for i in g)


def paged_batch(lens: list[int], pool_pages: int, gen: torch.Generator) -> ForwardBatch:
    """A decode batch whose sequences own shuffled pages of the pool."""
    perm = torch.randperm(pool_pages, generator=gen).tolist()
    need = [-(-n // PAGE) for n in lens]
    width = max(need)
    tables, at = torch.full((len(lens), width + 1), -1, dtype=torch.long), 0  # one spare column, as the engine's
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[at:at + n])
        at += n
    slots = torch.tensor([int(tables[i, (n - 1) // PAGE]) * PAGE + (n - 1) % PAGE for i, n in enumerate(lens)])
    b = len(lens)
    return ForwardBatch(True, torch.zeros(b, dtype=torch.long), torch.zeros(3, b, dtype=torch.long), [1] * b,
                        list(lens), tables, slots, torch.arange(b))


def reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    out = []
    for i, n in enumerate(batch.seq_lens):
        pos = torch.arange(n)
        idx = batch.block_tables[i, pos // PAGE] * PAGE + pos % PAGE
        k = k_pool[idx].repeat_interleave(H // HKV, dim=1)  # [n, H, D]
        v = v_pool[idx].repeat_interleave(H // HKV, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) / math.sqrt(D), dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


@pytest.mark.parametrize("lens, groups", [([9, 9, 9], 1), ([3, 2500, 17, 2400, 640, 1], 2), ([100], 1),
                                          ([1, 2, 3, 4, 5, 6, 7, 3000], 2)])
def test_decode_over_rows_of_any_lengths_matches_attention_row_by_row(lens, groups):
    gen = torch.Generator().manual_seed(len(lens))
    batch = paged_batch(lens, 2048, gen)
    k_pool, v_pool = (torch.randn(2048 * PAGE, HKV, D, generator=gen) for _ in range(2))
    q = torch.randn(len(lens), H, D, generator=gen)
    backend = get_backend("sdpa")
    plan = plan_pass(backend, batch, PAGE, torch.device("cpu"))
    assert len(plan.extra["groups"]) == groups
    out = attend(backend, q, q, q, k_pool, v_pool, plan)
    torch.testing.assert_close(out, reference(q, k_pool, v_pool, batch), atol=1e-5, rtol=0)
