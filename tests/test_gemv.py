"""One-row matmuls split over threads (runtime/models/gemv.py): the same bits however the rows are cut, and
the caller's thread count put back."""
from __future__ import annotations

import pytest
import torch

from runtime.models.gemv import split_gemv, split_over, split_parts
from runtime.models.linear import Linear, pack_linears


@pytest.mark.parametrize("bias", [False, True])
def test_every_split_gives_the_one_thread_gemv_bits(bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1031, 700, generator=g)  # rows that do not divide evenly
    b = torch.randn(1031, generator=g) if bias else None
    x = torch.randn(1, 700, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = (torch.mv(weight, x[0]) if b is None else torch.addmv(b, weight, x[0])).unsqueeze(0)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(expected, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-4)
    for parts in (1, 2, 3, 4):
        with split_over(parts):
            assert split_parts() == parts and torch.get_num_threads() == 1
            got = split_gemv(x, weight, b)
        assert torch.equal(got, expected), parts
        assert split_parts() == 1 and torch.get_num_threads() == threads


def test_a_large_linear_splits_one_row_and_leaves_more_rows_alone():
    layer = Linear(1024, 1024, bias=True)
    small = Linear(256, 256, bias=False)
    pack_linears(torch.nn.ModuleList([layer, small]), "onednn")
    assert layer.split_one_row and not small.split_one_row
    one, four = torch.randn(1, 1024), torch.randn(4, 1024)
    with split_over(2):
        assert torch.equal(layer(one), split_gemv(one, layer.weight, layer.bias))
        assert torch.allclose(layer(four), torch.nn.functional.linear(four, layer.weight, layer.bias), atol=1e-4)
    pack_linears(layer, "torch")
    assert not layer.split_one_row
