"""Model registry and checkpoint loading.

`load_model(path)` reads a Hugging Face checkpoint directory (config.json + safetensors, single or
sharded) into our own implementation, loading only the parts an instance needs: the vision tower
for encoders, the language model for prefill/decode.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime.models.config import ModelConfig, model_config_from_hf
from runtime.models.linear import pack_linears
from runtime.models.llava import LlavaForConditionalGeneration
from runtime.models.qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from runtime.models.weights import iter_weights, load_weights

MODEL_REGISTRY: dict[str, type] = {
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
}  # each class names its checkpoint key layout in `checkpoint_prefixes`


def read_config(path: str | Path, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """The ModelConfig of a checkpoint directory, without touching weights."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    gen_file = path / "generation_config.json"
    gen_eos = json.loads(gen_file.read_text()).get("eos_token_id") if gen_file.exists() else None
    extra = tuple(gen_eos) if isinstance(gen_eos, list) else (() if gen_eos is None else (gen_eos,))
    return model_config_from_hf(raw, dtype, extra)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               load_vision: bool = True, load_lm: bool = True, attn_backend: str = "auto",
               linear_backend: str = "auto"):
    """Build the registered model for the checkpoint's architecture and load the requested parts."""
    if not (load_vision or load_lm):
        raise ValueError("load at least one of the vision tower and the language model")
    config = read_config(path, dtype)
    if config.architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {config.architecture!r}; known: {sorted(MODEL_REGISTRY)}")
    cls = MODEL_REGISTRY[config.architecture]
    model = cls(config, load_vision, load_lm, device, attn_backend)
    wanted = ("visual.",) * load_vision + ("lm.",) * load_lm
    skip = ("lm.lm_head.weight",) if config.text.tie_word_embeddings else ()
    load_weights(model, iter_weights(Path(path), wanted, cls.checkpoint_prefixes), skip)
    for part in (model.visual, model.lm):
        if part is not None:
            pack_linears(part, linear_backend)
    return model.eval()


__all__ = ["MODEL_REGISTRY", "ModelConfig", "load_model", "read_config"]
