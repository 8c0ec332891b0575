"""The CLIP ViT tower of LLaVA: fixed-size images in, the hidden states of selected layers out."""
from __future__ import annotations

import torch
from torch import nn

from runtime.models.attention import AttentionBackend
from runtime.models.config import ClipVisionConfig
from runtime.models.layers import MergedLinear, activation
from runtime.models.linear import Linear


class ClipEmbeddings(nn.Module):
    """Non-overlapping patch projection, a learned CLS token in front, learned absolute positions."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.grid_side ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels `[N, C, S, S]` -> `[N, 1 + (S / patch)**2, hidden]`."""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight


class ClipAttention(nn.Module):
    """Full (non-causal) attention within each image; q/k/v fused into one matmul at load time."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv_proj = MergedLinear(cfg.hidden_size, [cfg.hidden_size] * 3, bias=True)
        self.out_proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], backend: AttentionBackend) -> torch.Tensor:
        """x `[N * L, hidden]`, images packed back to back at `cu_seqlens`."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).view(t, 3, self.heads, -1).unbind(1)
        return self.out_proj(backend.varlen(q, k, v, cu_seqlens).reshape(t, -1))


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int], backend: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, backend)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_layers))


class ClipVisionTower(nn.Module):
    """CLIP's vision transformer. Parameter names follow the checkpoint (`pre_layrnorm` included).

    Hidden state i is the input of layer i (0: the embeddings after `pre_layrnorm`; `num_layers`: the
    last layer's output), as in transformers' `hidden_states`. Only the layers up to the deepest
    selected state run. `post_layernorm` is loaded for a strict checkpoint match but LLaVA never uses it.
    """

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = ClipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feature_layers = [_resolve(i, cfg.num_layers) for i in cfg.feature_layers]

    def forward(self, pixels: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """pixels `[N, C, S, S]` -> the selected hidden states concatenated: `[N, L, hidden * len(layers)]`."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        n, length, dim = x.shape
        cu_seqlens = [i * length for i in range(n + 1)]
        x = x.reshape(n * length, dim)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(self.feature_layers)]):
            x = layer(x, cu_seqlens, backend)
            states[i + 1] = x
        return torch.cat([states[i] for i in self.feature_layers], dim=-1).view(n, length, -1)


def _resolve(index: int, num_layers: int) -> int:
    """A hidden-state index (negative counts from the end of the `num_layers + 1` states) as a non-negative one."""
    if not -(num_layers + 1) <= index <= num_layers:
        raise ValueError(f"vision_feature_layer {index} is out of range for a {num_layers}-layer tower")
    return index % (num_layers + 1)
