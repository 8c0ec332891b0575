"""The model object the engine talks to: one interface for every family (see `VisionLanguageModel`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from runtime.models.attention import get_backend
from runtime.models.config import ModelConfig
from runtime.models.forward_batch import ForwardBatch, KVPool
from runtime.models.qwen2_lm import Qwen2LM
from runtime.models.weights import Prefixes, materialize


class VisionLanguageModel(nn.Module):
    """A vision tower (`.visual`) and/or a language model (`.lm`), whichever parts this instance was
    built with: an E instance loads only the tower, a P or D instance only the LM.

    The engine calls, and each family implements:
    - `encode(pixel_values, grid_thw)`: the tower (and projector) over several images at once, one
      `[tokens_i, hidden]` embedding tensor per image;
    - `rope_positions(input_ids, grids)`: positions `[3, L]` of a whole prompt and the decode delta
      (position = index + delta); 1-D families repeat one row;
    - `pixel_shape()`: the layout of one image's `pixel_values` (None where any size goes), which the
      data plane checks on arrival; `dummy_image(num_tokens)`: zero pixels and grid for timing `encode`;
    - `prefill(batch, kv)` / `decode(batch, kv)`: the LM over a ragged `ForwardBatch` on the paged pool,
      fp32 logits of `batch.logits_indices` (image embeddings scattered at the image token's positions).

    Built with meta parameters, then `materialize`d on the target device; the loader fills them.
    """

    checkpoint_prefixes: ClassVar[Prefixes]

    def __init__(self, config: ModelConfig, with_vision: bool = True, with_lm: bool = True,
                 device: torch.device | str = "cpu", attn_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        with torch.device("meta"):
            self.visual = self.build_visual(config) if with_vision else None
            self.lm = Qwen2LM(config.text) if with_lm else None  # Llama too: no biases, 1-D rope
        materialize(self, config.dtype, device)
        if self.lm is not None:
            self.lm.setup(torch.device(device))
        self.backend = get_backend(attn_backend, device, config.dtype)
        self.requires_grad_(False)

    def build_visual(self, config: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def rope_positions(self, input_ids: Sequence[int] | torch.Tensor,
                       image_grid_thw: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def pixel_shape(self) -> tuple[int | None, ...]:
        raise NotImplementedError

    def dummy_image(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _require_visual(self) -> nn.Module:
        if self.visual is None:
            raise RuntimeError("this instance was loaded without the vision tower")
        return self.visual

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
