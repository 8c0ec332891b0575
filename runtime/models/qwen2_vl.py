"""Qwen2-VL and Qwen2.5-VL: the model object the engine talks to."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from runtime.models.attention import get_backend
from runtime.models.config import ModelConfig
from runtime.models.forward_batch import ForwardBatch, KVPool
from runtime.models.qwen2_lm import Qwen2LM
from runtime.models.qwen2_vision import VisionTower
from runtime.models.rope import rope_positions
from runtime.models.weights import QWEN2_VL_PREFIXES, Prefixes, materialize


class Qwen2VLForConditionalGeneration(nn.Module):
    """Vision tower and/or language model, whichever parts this instance was built with.

    Built with meta parameters, then `materialize`d on the target device; the loader fills them.
    """

    checkpoint_prefixes: ClassVar[Prefixes] = QWEN2_VL_PREFIXES

    def __init__(self, config: ModelConfig, with_vision: bool = True, with_lm: bool = True,
                 device: torch.device | str = "cpu", attn_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        with torch.device("meta"):
            self.visual = VisionTower(config.vision) if with_vision else None
            self.lm = Qwen2LM(config.text) if with_lm else None
        materialize(self, config.dtype, device)
        if self.lm is not None:
            self.lm.setup(torch.device(device))
        self.backend = get_backend(attn_backend, device, config.dtype)
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower over several images at once: one `[tokens_i, hidden]` tensor per image."""
        if self.visual is None:
            raise RuntimeError("this instance was loaded without the vision tower")
        return self.visual(pixel_values, torch.as_tensor(grid_thw).reshape(-1, 3), self.backend)

    def rope_positions(self, input_ids: Sequence[int] | torch.Tensor,
                       image_grid_thw: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, int]:
        """M-RoPE positions `[3, L]` for a whole prompt and the decode delta (position = index + delta)."""
        return rope_positions(input_ids, image_grid_thw, self.config.image_token_id, self.config.spatial_merge_size)

    def pixel_shape(self) -> tuple[None, None]:
        """The layout of one image's `pixel_values` (None: any size): `[patches, patch_dim]`."""
        return (None, None)

    def dummy_image(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero patches and grid of one square image of about `num_tokens` merged tokens, for timing `encode`."""
        merge = self.config.spatial_merge_size
        side = max(1, int(num_tokens ** 0.5))  # merged tokens per side; the tower sees merge x merge patches each
        pixels = torch.zeros(merge * merge * side * side, self.config.vision.patch_dim, dtype=self.dtype)
        return pixels, torch.tensor([[1, merge * side, merge * side]])

    @torch.inference_mode()
    def prefill(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        """Ragged prefill (each sequence may continue cached KV); fp32 logits of `batch.logits_indices`."""
        return self._lm(batch, kv)

    @torch.inference_mode()
    def decode(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        """One new token per sequence; fp32 logits `[B, vocab]` for the rows in `batch.logits_indices`."""
        return self._lm(batch, kv)

    def _lm(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        if self.lm is None:
            raise RuntimeError("this instance was loaded without the language model")
        return self.lm(batch, kv, self.config.image_token_id, self.backend)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Same interface; the config selects RMSNorm/SwiGLU vision blocks and windowed attention."""
