"""Linear-layer backends: how the LM's projections multiply inputs of few rows.

MKL's fp32 GEMM, which `F.linear` uses on CPU, is slow for the few-row inputs of batched decode:
16 rows cost about 4x one row, although both stream the same weight from memory. oneDNN with a
prepacked weight keeps close to one-row cost there (about 2x faster at 16 rows on a 1024-wide LM),
and is no faster for prefill-sized inputs. So `Linear` keeps its plain weight for many rows and, when
a backend packed one, uses the packed copy for at most `SMALL_ROWS` rows (the cost is one extra copy
of the LM's projection weights).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SMALL_ROWS = 32  # at 64 rows oneDNN is slower than MKL on narrow (256-wide) layers


class Linear(nn.Linear):
    """`nn.Linear` that multiplies inputs of 2 to `SMALL_ROWS` rows with `packed`, when set (one row is a
    matrix-vector product, which MKL already does at memory speed)."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and 1 < x.shape[0] <= SMALL_ROWS:
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
    return backend
