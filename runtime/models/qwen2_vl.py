"""Qwen2-VL and Qwen2.5-VL: the model object the engine talks to."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from runtime.models.base import VisionLanguageModel
from runtime.models.config import ModelConfig
from runtime.models.qwen2_vision import VisionTower
from runtime.models.rope import rope_positions
from runtime.models.weights import QWEN2_VL_PREFIXES, Prefixes


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    """Qwen2-VL: a dynamic-resolution ViT (images of any size as `[patches, patch_dim]`, merged 2x2 into
    LM tokens) and a Qwen2 LM with M-RoPE."""

    checkpoint_prefixes: ClassVar[Prefixes] = QWEN2_VL_PREFIXES

    def build_visual(self, config: ModelConfig) -> nn.Module:
        return VisionTower(config.vision)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """Vision tower over several images at once: one `[tokens_i, hidden]` tensor per image."""
        visual = self._require_visual()
        return visual(pixel_values, torch.as_tensor(grid_thw).reshape(-1, 3), self.backend)

    def rope_positions(self, input_ids: Sequence[int] | torch.Tensor,
                       image_grid_thw: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, int]:
        """M-RoPE positions `[3, L]` for a whole prompt and the decode delta (position = index + delta)."""
        return rope_positions(input_ids, image_grid_thw, self.config.image_token_id, self.config.spatial_merge_size)

    def pixel_shape(self) -> tuple[None, None]:
        """`[patches, patch_dim]`, any number of patches."""
        return (None, None)

    def dummy_image(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero patches and grid of one square image of about `num_tokens` merged tokens, for timing `encode`."""
        merge = self.config.spatial_merge_size
        side = max(1, int(num_tokens ** 0.5))  # merged tokens per side; the tower sees merge x merge patches each
        pixels = torch.zeros(merge * merge * side * side, self.config.vision.patch_dim, dtype=self.dtype)
        return pixels, torch.tensor([[1, merge * side, merge * side]])


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Same interface; the config selects RMSNorm/SwiGLU vision blocks and windowed attention."""
