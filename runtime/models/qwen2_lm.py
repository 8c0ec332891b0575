"""The Qwen2 decoder (shared by Qwen2-VL and Qwen2.5-VL) over a paged KV pool.

LLaVA's Llama LM is the same decoder: only the projection biases differ (TextConfig flags), and its
1-D RoPE is M-RoPE with every frequency on one axis (`mrope_section = (head_dim // 2, 0, 0)`).
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.models.attention import AttentionBackend, AttnPlan, MixedPlan, attend, plan_pass
from runtime.models.config import TextConfig
from runtime.models.forward_batch import ForwardBatch, KVPool
from runtime.models.layers import MergedLinear, RMSNorm, SwiGLU, apply_rope
from runtime.models.linear import Linear
from runtime.models.rope import MRope


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [q, kv, kv], bias=cfg.qkv_bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, kv: KVPool,
                out_slots: torch.Tensor, backend: AttentionBackend, plan: AttnPlan | MixedPlan) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.shard_sizes, dim=-1)
        q = apply_rope(q.view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(t, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.kv_heads, self.head_dim)
        k_pool, v_pool = kv.k[layer], kv.v[layer]
        k_pool.index_copy_(0, out_slots, k.to(k_pool.dtype))
        v_pool.index_copy_(0, out_slots, v.to(v_pool.dtype))
        o = attend(backend, q, k, v, k_pool, v_pool, plan)
        return self.o_proj(o.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, *attn_args) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2LM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head. Parameter names follow the checkpoint."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: MRope | None = None  # built by `setup` once weights are on their device

    def setup(self, device: torch.device) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = MRope(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section, device)

    def embed(self, input_ids: torch.Tensor, image_token_id: int, image_embeds: torch.Tensor | None,
              image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image embeddings written, in order, at `image_rows` (default: image tokens)."""
        x = self.embed_tokens(input_ids)
        if image_rows is None:
            image_rows = (input_ids == image_token_id).nonzero().squeeze(1)
        rows = image_rows.to(x.device)
        n_embeds = 0 if image_embeds is None else image_embeds.shape[0]
        if len(rows) != n_embeds:
            raise ValueError(f"{len(rows)} image tokens in the batch but {n_embeds} image embeddings")
        if n_embeds:
            x[rows] = image_embeds.to(device=x.device, dtype=x.dtype)
        return x

    def forward(self, batch: ForwardBatch, kv: KVPool, image_token_id: int, backend: AttentionBackend) -> torch.Tensor:
        """fp32 logits `[K, vocab]` for the rows `batch.logits_indices`."""
        device = self.embed_tokens.weight.device
        input_ids = batch.input_ids.to(device)
        x = self.embed(input_ids, image_token_id, batch.image_embeds, batch.image_rows)
        cos, sin = self.rope.cos_sin(batch.positions.to(device), x.dtype)
        plan = plan_pass(backend, batch, kv.page_size, device)
        out_slots = batch.out_slots.to(device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, kv, out_slots, backend, plan)
        x = self.norm(x[batch.logits_indices.to(device)])
        return self.lm_head(x).float()
