"""The training-only probe: dense targets for every merged image token, and linear heads that read them.

Answer tokens alone teach the chat format fast but leave the vision tower blind for a long time (on 2 cores,
hundreds of steps at chance). The probe gives the tower a direct signal: from each merged image token (the
vector the LM reads) predict the colour, the shape and the left-to-right rank of the shape under it, and the
scene's shape count. It is dropped after training; the checkpoint stays plain Qwen2-VL.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from runtime.shapes.scene import COLORS, SHAPES, Scene

CLASSES = (1 + len(COLORS), 1 + len(SHAPES), 4, 3)  # colour, shape, rank (0: background), count 1-3
MIN_COVER = 0.25  # a token belongs to a shape when the shape covers at least this much of its 28x28 window


def token_targets(scene: Scene, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    """[tokens, 4] targets per merged token, in the merger's raster order over the 2x2 windows."""
    _, h, w = grid_thw
    cover = np.zeros((len(scene.shapes), h // 2, w // 2))
    for k, shape in enumerate(scene.shapes):
        mask = Image.new("L", (scene.width, scene.height), 0)
        shape.draw(ImageDraw.Draw(mask), 255)
        cover[k] = np.asarray(mask.resize((w // 2, h // 2), Image.BOX), dtype=np.float64) / 255
    best, has = cover.argmax(0).ravel(), cover.max(0).ravel() >= MIN_COVER
    colors = np.array([1 + list(COLORS).index(s.color) for s in scene.shapes])[best]
    kinds = np.array([1 + SHAPES.index(s.kind) for s in scene.shapes])[best]
    rank = np.where(has, best + 1, 0)
    count = np.full_like(rank, len(scene.shapes) - 1)
    return torch.from_numpy(np.stack([np.where(has, colors, 0), np.where(has, kinds, 0), rank, count], 1))


class Probe(torch.nn.Module):
    """Linear heads on the merged image tokens, captured by a forward hook on the vision merger."""

    def __init__(self, model: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in CLASSES)
        self.tokens: torch.Tensor | None = None
        model.model.visual.merger.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, out: torch.Tensor) -> None:
        self.tokens = out

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        assert self.tokens is not None and self.tokens.shape[0] == targets.shape[0]
        f = torch.nn.functional
        return sum(f.cross_entropy(head(self.tokens), targets[:, i]) for i, head in enumerate(self.heads))
