"""The Qwen2-VL / Qwen2.5-VL vision tower: patches in, one embedding per merged patch group out."""
from __future__ import annotations

import torch
from torch import nn

from runtime.models.attention import AttentionBackend
from runtime.models.config import VisionConfig
from runtime.models.layers import RMSNorm, SwiGLU, activation, apply_rope
from runtime.models.linear import Linear
from runtime.models.rope import vision_patch_positions, vision_rope, window_order

NORM_EPS = 1e-6


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, NORM_EPS) if cfg.qwen2_5 else nn.LayerNorm(dim, eps=NORM_EPS)


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over pre-cut patches is a matmul on flattened patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = Linear(cfg.patch_dim, cfg.embed_dim, bias=False)  # loaded from the conv weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.reshape(-1, self.proj.in_features).to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int],
                backend: AttentionBackend) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)
        q = apply_rope(q.float(), cos, sin).to(x.dtype)  # rotated in fp32 as the reference does
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        return self.proj(backend.varlen(q, k, v, cu_seqlens).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = Linear(cfg.mlp_dim, cfg.embed_dim)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg, cfg.embed_dim), _norm(cfg, cfg.embed_dim)
        self.attn = VisionAttention(cfg)
        if cfg.qwen2_5:
            self.mlp = SwiGLU(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act, bias=True)
        else:
            self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, backend):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, backend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge x merge group of patches and projects it to the LM width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.group_dim = cfg.embed_dim * cfg.spatial_merge_size ** 2
        self.ln_q = _norm(cfg, cfg.embed_dim)
        self.mlp = nn.Sequential(
            Linear(self.group_dim, self.group_dim), nn.GELU(), Linear(self.group_dim, cfg.out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.group_dim))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor, backend: AttentionBackend) -> list[torch.Tensor]:
        """pixels `[num_patches, patch_dim]`, grid_thw `[N, 3]` -> one `[tokens_i, out_dim]` per image."""
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        device = self.patch_embed.proj.weight.device
        x = self.patch_embed(pixels.to(device))
        pos = vision_patch_positions(grids, cfg.spatial_merge_size).to(device)
        cos, sin = vision_rope(pos, cfg.head_dim, cfg.rope_theta)
        frames = _cumsum([h * w for t, h, w in grids for _ in range(t)])
        window_cu, order = frames, None
        if cfg.qwen2_5:
            order, window_cu = window_order(grids, cfg.spatial_merge_size, _merged_window(cfg))
            order = order.to(device)
            x, cos, sin = (_permute_units(a, order, unit) for a in (x, cos, sin))
        for i, block in enumerate(self.blocks):
            full = not cfg.qwen2_5 or i in cfg.fullatt_block_indexes
            x = block(x, cos, sin, frames if full else window_cu, backend)
        out = self.merger(x)
        if order is not None:
            out = out[torch.argsort(order)]
        return list(out.split([t * h * w // unit for t, h, w in grids]))


def _merged_window(cfg: VisionConfig) -> int:
    return cfg.window_size // cfg.spatial_merge_size // cfg.patch_size


def _permute_units(x: torch.Tensor, order: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder rows in groups of `unit` (one merged patch group) by `order`."""
    return x.reshape(-1, unit, x.shape[-1])[order].reshape(x.shape)


def _cumsum(xs: list[int]) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out
