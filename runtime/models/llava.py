"""LLaVA-1.5: a CLIP ViT tower and an MLP projector feeding a Llama LM, behind the engine's model interface."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from runtime.models.attention import AttentionBackend
from runtime.models.base import VisionLanguageModel
from runtime.models.clip_vision import ClipVisionTower
from runtime.models.config import ClipVisionConfig, ModelConfig
from runtime.models.layers import activation
from runtime.models.weights import LLAVA_PREFIXES, Prefixes


class MultiModalProjector(nn.Module):
    """linear_1 -> act -> linear_2, from the (concatenated) CLIP features to the LM width."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size * len(cfg.feature_layers), cfg.out_dim, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_act)
        self.linear_2 = nn.Linear(cfg.out_dim, cfg.out_dim, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """The encoder side: CLIP tower, feature selection, projector. One fixed-size token block per image."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = ClipVisionTower(cfg)
        self.multi_modal_projector = MultiModalProjector(cfg)

    def forward(self, pixels: torch.Tensor, backend: AttentionBackend) -> torch.Tensor:
        """pixels `[N, C, S, S]` -> `[N, tokens_per_image, out_dim]`."""
        features = self.vision_tower(pixels, backend)
        if self.cfg.feature_select == "default":
            features = features[:, 1:]  # the CLS token is not an image token
        return self.multi_modal_projector(features)


class LlavaForConditionalGeneration(VisionLanguageModel):
    """LLaVA-1.5: vision tower + projector (`.visual`) and/or the Llama LM (`.lm`), as this instance was built.

    Same interface as Qwen2VLForConditionalGeneration. Differences the engine sees: every image is
    `vision.image_size` square and yields `config.tokens_per_image` embeddings; positions are 1-D
    (all three rows of `[3, L]` equal, decode delta 0). The LM is our Qwen2 decoder configured as
    Llama (no q/k/v bias, plain RoPE).
    """

    checkpoint_prefixes: ClassVar[Prefixes] = LLAVA_PREFIXES

    def build_visual(self, config: ModelConfig) -> nn.Module:
        if not isinstance(config.vision, ClipVisionConfig):
            raise TypeError("LlavaForConditionalGeneration needs a LLaVA ModelConfig (a ClipVisionConfig vision part)")
        return LlavaVision(config.vision)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values `[N, C, S, S]` (CLIP-processed), grid_thw `[N, 3]` of `(1, S / patch, S / patch)`:
        one `[tokens_per_image, hidden]` tensor per image."""
        visual = self._require_visual()
        self._check_images(pixel_values, torch.as_tensor(grid_thw).reshape(-1, 3))
        return list(visual(pixel_values, self.backend).unbind(0))

    def _check_images(self, pixels: torch.Tensor, grids: torch.Tensor) -> None:
        v = self.config.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [N, {', '.join(map(str, want))}], got {tuple(pixels.shape)}")
        expected = torch.tensor([[1, v.grid_side, v.grid_side]]).expand(pixels.shape[0], 3)
        if grids.shape != expected.shape or not torch.equal(grids.cpu().long(), expected):
            raise ValueError(f"grid_thw {grids.tolist()} does not describe {pixels.shape[0]} images of {want}")

    def rope_positions(self, input_ids: Sequence[int] | torch.Tensor,
                       image_grid_thw: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, int]:
        """1-D positions `arange(L)` on all three rows and decode delta 0; checks the image token count."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        n_image = int((ids == self.config.image_token_id).sum())
        expected = len(image_grid_thw) * self.config.tokens_per_image
        if n_image != expected:
            raise ValueError(f"{n_image} image tokens in input_ids but {len(image_grid_thw)} images "
                             f"need {expected}")
        return torch.arange(len(ids)).repeat(3, 1), 0

    def pixel_shape(self) -> tuple[int, int, int, int]:
        """The layout of one image's `pixel_values`: `[1, channels, size, size]` (the CLIP processor's)."""
        v = self.config.vision
        return (1, v.num_channels, v.image_size, v.image_size)

    def dummy_image(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero pixels and grid of one image for timing `encode`; the size is fixed, so `num_tokens` is ignored."""
        v = self.config.vision
        pixels = torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=self.dtype)
        return pixels, torch.tensor([[1, v.grid_side, v.grid_side]])
