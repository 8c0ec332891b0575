"""Typed, frozen views of a Hugging Face Qwen2-VL / Qwen2.5-VL / LLaVA-1.5 config.json.

Qwen: both layouts are read: transformers 5 nests the LM under `text_config`; older checkpoints keep
the LM fields at the top level with `rope_scaling: {type: mrope, ...}`.
LLaVA: a CLIP ViT `vision_config` and a Llama `text_config`; fields a config.json leaves out take
transformers' defaults (CLIPVisionConfig / LlamaConfig, or LLaVA-1.5's CLIP-L/336 without a vision_config).
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
    qkv_bias: bool = True  # Qwen2: q/k/v have a bias, o does not; Llama: `attention_bias` for all four
    o_bias: bool = False
    mlp_bias: bool = False


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
class ClipVisionConfig:
    """LLaVA's vision side: a CLIP ViT tower, which of its hidden states to use, and the MLP projector."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int  # square input side in pixels; every image is resized/cropped to it
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]  # hidden-state indices (0 = embeddings, may be negative), concatenated
    feature_select: str  # "default": drop the CLS token; "full": keep it
    projector_act: str
    projector_bias: bool
    out_dim: int  # LM hidden size the projector maps to

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid_side ** 2 + (self.feature_select == "full")


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
    vision: VisionConfig | ClipVisionConfig
    rope_kind: str = "mrope"  # "mrope": Qwen2-VL's (t, h, w) positions; "default": 1-D, all three rows equal
    tokens_per_image: int | None = None  # None: dynamic resolution (Qwen); else every image's fixed count
    patch_size: int = 14  # vision patch side in pixels


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


def _eos(raw: dict, extra_eos: tuple[int, ...], default: int | None = None) -> tuple[int, ...]:
    t = raw.get("text_config") or {}
    eos = _as_tuple(raw.get("eos_token_id", t.get("eos_token_id", default)))
    return tuple(dict.fromkeys(eos + tuple(extra_eos)))


def model_config_from_hf(raw: dict, dtype: torch.dtype, extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    """Build the ModelConfig (dispatching on `architectures[0]`); `extra_eos` comes from generation_config.json."""
    arch = (raw.get("architectures") or ["Qwen2VLForConditionalGeneration"])[0]
    if arch == "LlavaForConditionalGeneration":
        return llava_config_from_hf(raw, dtype, extra_eos)
    text = text_config_from_hf(raw)
    vision = vision_config_from_hf(raw, arch.startswith("Qwen2_5"), text.hidden_size)
    eos = _eos(raw, extra_eos)
    return ModelConfig(
        architecture=arch, num_layers=text.num_layers, num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads, head_dim=text.head_dim, hidden_size=text.hidden_size,
        vocab_size=text.vocab_size, image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
        spatial_merge_size=vision.spatial_merge_size, max_position_embeddings=text.max_position_embeddings,
        eos_token_ids=eos, dtype=dtype, text=text, vision=vision, rope_kind="mrope", tokens_per_image=None,
        patch_size=vision.patch_size,
    )


# LLaVA-1.5's tower when a config.json has no vision_config (transformers' LlavaConfig default: CLIP-L/336)
LLAVA_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=336, patch_size=14)
CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32)


def _square(x: int | list[int], what: str) -> int:
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise NotImplementedError(f"non-square {what} {list(x)} is not supported")
        x = x[0]
    return int(x)


def llama_text_config_from_hf(raw: dict) -> TextConfig:
    """LLaVA's `text_config` (a Llama), with LlamaConfig's defaults for absent fields."""
    t = raw.get("text_config") or {}
    if t.get("model_type", "llama") != "llama":
        raise NotImplementedError(f"LLaVA text model {t['model_type']!r} is not supported (only llama)")
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"Llama rope type {rope_type!r} is not supported")
    hidden, heads = t.get("hidden_size", 4096), t.get("num_attention_heads", 32)
    head_dim = t.get("head_dim") or hidden // heads
    attn_bias = bool(t.get("attention_bias", False))
    return TextConfig(
        num_layers=t.get("num_hidden_layers", 32), hidden_size=hidden,
        intermediate_size=t.get("intermediate_size", 11008), num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads, head_dim=head_dim,
        vocab_size=t.get("vocab_size", raw.get("vocab_size", 32000)), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        hidden_act=t.get("hidden_act", "silu"),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        mrope_section=(head_dim // 2, 0, 0),  # every frequency follows row 0: plain 1-D RoPE
        max_position_embeddings=t.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False)),
        qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=bool(t.get("mlp_bias", False)),
    )


def clip_vision_config_from_hf(raw: dict, lm_hidden: int) -> ClipVisionConfig:
    v = raw.get("vision_config")
    if v is not None and v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise NotImplementedError(f"LLaVA vision model {v['model_type']!r} is not supported (only clip_vision_model)")
    v = {**(CLIP_DEFAULTS if v is not None else LLAVA_VISION_DEFAULTS), **(v or {})}
    select = raw.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise NotImplementedError(f"vision_feature_select_strategy {select!r} is not supported")
    return ClipVisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], image_size=_square(v["image_size"], "image_size"),
        patch_size=_square(v["patch_size"], "patch_size"), num_channels=v.get("num_channels", 3),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"),
        feature_layers=_as_tuple(raw.get("vision_feature_layer", -2)), feature_select=select,
        projector_act=raw.get("projector_hidden_act", "gelu"),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)), out_dim=lm_hidden,
    )


def llava_config_from_hf(raw: dict, dtype: torch.dtype, extra_eos: tuple[int, ...] = ()) -> ModelConfig:
    """LLaVA-1.5: no video, no vision-start token, no patch merging; a fixed token count per image."""
    text = llama_text_config_from_hf(raw)
    vision = clip_vision_config_from_hf(raw, text.hidden_size)
    return ModelConfig(
        architecture="LlavaForConditionalGeneration", num_layers=text.num_layers, num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads, head_dim=text.head_dim, hidden_size=text.hidden_size,
        vocab_size=text.vocab_size, image_token_id=raw.get("image_token_id", raw.get("image_token_index", 32000)),
        video_token_id=-1, vision_start_token_id=-1, spatial_merge_size=1,
        max_position_embeddings=text.max_position_embeddings, eos_token_ids=_eos(raw, extra_eos, default=2),
        dtype=dtype, text=text, vision=vision, rope_kind="default", tokens_per_image=vision.tokens_per_image,
        patch_size=vision.patch_size,
    )
