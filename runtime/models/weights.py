"""Reading safetensors checkpoints into our modules.

Checkpoint keys are mapped to one canonical layout (`lm.*`, `visual.*`) whichever transformers
version saved them, and only the tensors of the requested parts are read from disk.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from runtime.models.layers import MergedLinear

# checkpoint projection -> (our fused projection, shard index)
FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
Prefixes = tuple[tuple[str, str], ...]  # (checkpoint prefix, canonical prefix); first match wins

QWEN2_VL_PREFIXES: Prefixes = (
    ("model.language_model.", "lm."), ("model.visual.", "visual."), ("visual.", "visual."),
    ("lm_head.", "lm.lm_head."), ("model.", "lm."), ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm.lm_head."),
)
PREFIXES = QWEN2_VL_PREFIXES  # the default table
# LLaVA: transformers 5 in memory (`model.*`, `lm_head.*`) and llava-hf on disk (`language_model.*`,
# `vision_tower.vision_model.*`, `multi_modal_projector.*`; transformers 5 saves the tower without `vision_model.`).
# The CLIP tower and the projector both live under `visual.`, so an encoder-only load reads just them.
_TOWER, _PROJECTOR = "visual.vision_tower.", "visual.multi_modal_projector."
LLAVA_PREFIXES: Prefixes = (
    ("model.language_model.", "lm."), ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm.lm_head."), ("lm_head.", "lm.lm_head."),
    ("model.vision_tower.vision_model.", _TOWER), ("model.vision_tower.", _TOWER),
    ("vision_tower.vision_model.", _TOWER), ("vision_tower.", _TOWER),
    ("model.multi_modal_projector.", _PROJECTOR), ("multi_modal_projector.", _PROJECTOR),
)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def canonical_name(key: str, prefixes: Prefixes = PREFIXES) -> str | None:
    for src, dst in prefixes:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    files = [single] if single.exists() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {path}")
    return files


def iter_weights(path: Path, wanted_prefixes: tuple[str, ...],
                 prefixes: Prefixes = PREFIXES) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) for every checkpoint tensor under one of `wanted_prefixes`."""
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = canonical_name(key, prefixes)
                if name is not None and name.startswith(wanted_prefixes):
                    yield name, f.get_tensor(key)


def _target(name: str, params: dict[str, nn.Parameter]) -> tuple[str, int | None]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        fused, shard = FUSED[parts[-2]]
        fused_name = ".".join(parts[:-2] + [fused, parts[-1]])
        if fused_name in params:
            return fused_name, shard
    return name, None


def load_weights(module: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], skip: tuple[str, ...] = ()) -> None:
    """Copy checkpoint tensors into `module`'s (already allocated) parameters, converting dtype.

    Raises if a checkpoint tensor has no home or a parameter was never filled. Names in `skip`
    (e.g. a tied LM head) are ignored.
    """
    params = dict(module.named_parameters())
    shard_sizes = {f"{m}.{p}": mod.shard_sizes for m, mod in module.named_modules()
                   if isinstance(mod, MergedLinear) for p, _ in mod.named_parameters(recurse=False)}
    expected = {(n, s) for n in params for s in (range(len(shard_sizes[n])) if n in shard_sizes else [None])}
    loaded, unexpected = set(), []
    for name, tensor in weights:
        if name in skip or name.endswith(IGNORED_SUFFIXES):
            continue
        target, shard = _target(name, params)
        if target not in params:
            unexpected.append(name)
            continue
        _copy(params[target].data, tensor, shard_sizes.get(target), shard, name)
        loaded.add((target, shard))
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if unexpected or missing:
        raise KeyError(f"checkpoint mismatch: unexpected {unexpected[:8]}, missing {missing[:8]}")


def _copy(param: torch.Tensor, tensor: torch.Tensor, sizes: list[int] | None, shard: int | None, name: str) -> None:
    if shard is not None:
        param = param.narrow(0, sum(sizes[:shard]), sizes[shard])
    if tensor.numel() != param.numel():
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
    param.copy_(tensor.reshape(param.shape))


def materialize(module: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    """Replace every (meta) parameter with uninitialised storage of `dtype` on `device`, without grads."""
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False))
