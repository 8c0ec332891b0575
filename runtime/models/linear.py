"""Linear-layer backends: which GEMM multiplies a layer's multi-row inputs on CPU.

`F.linear` (MKL's fp32 GEMM) packs the weight on every call, which dominates at few rows: 16 rows cost
about 4x one row, although both stream the same weight. oneDNN with a weight packed once at load time
avoids that. Where it wins depends on the layer's width (Intel Xeon with AVX-512, 2 threads):
- 16 rows: 2x faster on every width;
- 64-256 rows on 1024-wide layers (a 110-token prefill of the small model): 20-35% faster; at 1024 rows equal;
- on 256-wide layers from 64 rows on: no faster, and on another Xeon slower.
So a layer with both sides at least `WIDE` uses the packed copy for every input of 2 rows or more, and a
narrower one only up to `SMALL_ROWS`. One row uses the packed copy when the weight holds more than
`WIDE`² values: on a 2-core AMD EPYC (AVX2), MKL's one-row GEMV streamed a 1024x5632 weight at 18 GB/s and
oneDNN at 46 GB/s (1.2 against 0.47 ms; 8064x1024: 2.1 against 1.1 ms; both in cache), while below about a
megabyte oneDNN's call overhead loses (256x256: 12 against 35 us). From `gemv.MIN_VALUES` values up, where
a model's weights no longer fit the cache together, one row is split by output rows over threads instead
(`runtime/models/gemv.py`).
The rule is fixed, not timed at start-up, so every process of a deployment computes the same bits. The
cost is one extra copy of the packed layers' weights. Results differ from `F.linear` by rounding only.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.gemv import MIN_VALUES, split_gemv

SMALL_ROWS = 32
WIDE = 512


class Linear(nn.Linear):
    """`nn.Linear` that multiplies inputs of `packed_min_rows` to `packed_rows` rows with `packed`, when a
    backend set it."""

    packed: torch.Tensor | None = None
    packed_rows: int = 0
    packed_min_rows: int = 2
    split_one_row: bool = False  # one-row inputs go to `split_gemv`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_one_row and x.dim() == 2 and x.shape[0] == 1:
            return split_gemv(x, self.weight, self.bias)
        if self.packed is not None and x.dim() == 2 and self.packed_min_rows <= x.shape[0] <= self.packed_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


LINEAR_BACKENDS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "torch": None,  # F.linear for every input
    "onednn": _onednn_pack,
}


def onednn_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_linears(module: nn.Module, backend: str = "auto") -> str:
    """Prepare every `Linear` under `module` for `backend` (after its weights are loaded); the name used."""
    weight = next(module.parameters())
    if backend == "auto":
        backend = "onednn" if onednn_available(weight.device, weight.dtype) else "torch"
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; choose from {sorted(LINEAR_BACKENDS)}")
    pack = LINEAR_BACKENDS[backend]
    for layer in module.modules():
        if isinstance(layer, Linear):
            layer.packed = None if pack is None else pack(layer.weight)
            layer.packed_rows = 1 << 62 if min(layer.weight.shape) >= WIDE else SMALL_ROWS
            layer.packed_min_rows = 1 if layer.weight.numel() > WIDE * WIDE else 2
            layer.split_one_row = pack is not None and layer.weight.numel() >= MIN_VALUES
    return backend
