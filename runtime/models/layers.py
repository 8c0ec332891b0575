"""Small building blocks shared by the language model and the vision tower."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.linear import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), with one temporary instead of three (the same roundings: products commute)."""
    if x.requires_grad:
        return x * torch.sigmoid(1.702 * x)
    return (x * 1.702).sigmoid_().mul_(x)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back before the weight (as the reference does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MergedLinear(Linear):
    """Several checkpoint projections stacked along the output axis (q/k/v, gate/up): one matmul.

    `shard_sizes` tells the weight loader where each checkpoint tensor goes.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = list(shard_sizes)


class SwiGLU(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(dim, [hidden, hidden], bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[T, H, D]`, cos/sin `[T, D]`: `x * cos + rotate_half(x) * sin`, written half by half into one
    output (fewer passes over memory; each element gets the same two products and one sum)."""
    if x.requires_grad:
        return x * cos[:, None] + rotate_half(x) * sin[:, None]
    h = x.shape[-1] // 2
    out = x * cos[:, None]
    out[..., :h] -= x[..., h:] * sin[:, None, :h]
    out[..., h:] += x[..., :h] * sin[:, None, h:]
    return out
