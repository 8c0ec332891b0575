"""Typed, frozen views of a Hugging Face Qwen2-VL / Qwen2.5-VL config.json.

Both layouts are read: transformers 5 nests the LM under `text_config`; older checkpoints keep the
LM fields at the top level with `rope_scaling: {type: mrope, ...}`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextConfig:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    rope_theta: float
    mrope_section: tuple[int, ...]
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_dim: int  # LM hidden size the merger projects to
    rope_theta: float
    qwen2_5: bool  # RMSNorm + SwiGLU blocks and windowed attention
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a loaded model."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    text: TextConfig
    vision: VisionConfig


def _as_tuple(x: int | list[int] | None) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (int(x),)


def text_config_from_hf(raw: dict) -> TextConfig:
    t = {**raw, **(raw.get("text_config") or {})}
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise NotImplementedError(f"rope type {rope_type!r} is not supported")
    if t.get("use_sliding_window"):
        raise NotImplementedError("sliding-window attention is not supported")
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    tied = bool(raw.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
    return TextConfig(
        num_layers=t["num_hidden_layers"], hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads, head_dim=head_dim,
        vocab_size=t["vocab_size"], rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        hidden_act=t.get("hidden_act", "silu"),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=t.get("max_position_embeddings", 32768), tie_word_embeddings=tied,
    )


def vision_config_from_hf(raw: dict, qwen2_5: bool, lm_hidden: int) -> VisionConfig:
    v = raw.get("vision_config") or {}
    rope = v.get("rope_parameters") or {}
    common = dict(
        depth=v["depth"], num_heads=v["num_heads"], in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    if qwen2_5:
        return VisionConfig(
            **common, embed_dim=v["hidden_size"], mlp_dim=v["intermediate_size"],
            hidden_act=v.get("hidden_act", "silu"), out_dim=v.get("out_hidden_size", lm_hidden), qwen2_5=True,
            window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        )
    embed = v["embed_dim"]
    return VisionConfig(
        **common, embed_dim=embed, mlp_dim=int(embed * v.get("mlp_ratio", 4)),
        hidden_act=v.get("hidden_act", "quick_gelu"), out_dim=v.get("hidden_size", lm_hidden), qwen2_5=False,
    )


def model_config_from_hf(raw: dict, dtype: torch.dtype, extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    """Build the ModelConfig; `extra_eos` comes from generation_config.json when there is one."""
    arch = (raw.get("architectures") or ["Qwen2VLForConditionalGeneration"])[0]
    text = text_config_from_hf(raw)
    vision = vision_config_from_hf(raw, arch.startswith("Qwen2_5"), text.hidden_size)
    t = raw.get("text_config") or {}
    eos = _as_tuple(raw.get("eos_token_id", t.get("eos_token_id")))
    eos = tuple(dict.fromkeys(eos + tuple(extra_eos)))
    return ModelConfig(
        architecture=arch, num_layers=text.num_layers, num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads, head_dim=text.head_dim, hidden_size=text.hidden_size,
        vocab_size=text.vocab_size, image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
        spatial_merge_size=vision.spatial_merge_size, max_position_embeddings=text.max_position_embeddings,
        eos_token_ids=eos, dtype=dtype, text=text, vision=vision,
    )
