"""The training-only probe: dense targets for every merged image token, and linear heads that read them.

Answer tokens alone teach the chat format fast but leave the vision tower blind for a long time (on 2 cores,
hundreds of steps at chance). The probe gives the tower a direct signal from the merged image tokens (the
vectors the LM reads):
- per shape token, its colour; per token, the left-to-right rank of the shape under it (0: background) and
  the scene's shape count;
- per shape, its kind, from the mean of that shape's tokens. A single token often cannot tell (the inside
  of a shape, or an edge that is straight in a circle too); a per-token kind target stayed at chance for
  hundreds of steps, while the pooled one learns;
- with `token_kind`, per shape token its shape's kind as well (the same head as the pooled target: the LM
  answers `What color is the circle?` by finding circle tokens, and a tower that has learnt kinds from the
  pooled target can pass them to every token of the shape).
It is dropped after training; the checkpoint stays plain Qwen2-VL.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from runtime.shapes.scene import COLORS, SHAPES, Scene

CLASSES = (1 + len(COLORS), 1 + len(SHAPES), 4, 3)  # colour, shape, rank (0: background), count 1-3
MIN_COVER = 0.25  # a token belongs to a shape when the shape covers at least this much of its 28x28 window


def token_targets(scene: Scene, grid_thw: tuple[int, int, int], image: int = 0) -> torch.Tensor:
    """[tokens, 5] targets per merged token, in the merger's raster order over the 2x2 windows: colour, kind,
    rank, count and the image's index in the batch."""
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
    index = np.full_like(rank, image)
    return torch.from_numpy(np.stack([np.where(has, colors, 0), np.where(has, kinds, 0), rank, count, index], 1))


class Probe(torch.nn.Module):
    """Linear heads on the merged image tokens, captured by a forward hook on the vision merger."""

    def __init__(self, model: torch.nn.Module, hidden: int, token_kind: bool = False) -> None:
        super().__init__()
        self.token_kind = token_kind
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in CLASSES)
        self.tokens: torch.Tensor | None = None
        model.model.visual.merger.register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, out: torch.Tensor) -> None:
        self.tokens = out

    def losses(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy per target (see the module docstring); clears the captured tokens."""
        tokens, self.tokens = self.tokens, None
        assert tokens is not None and tokens.shape[0] == targets.shape[0]
        ce = torch.nn.functional.cross_entropy
        color, kind, rank, count, image = targets.unbind(1)
        on = rank > 0
        shape_id, which = torch.unique(image[on] * 4 + rank[on], return_inverse=True)
        pooled = tokens.new_zeros(len(shape_id), tokens.shape[1]).index_add_(0, which, tokens[on])
        pooled = pooled / torch.bincount(which, minlength=len(shape_id))[:, None]
        kinds = kind.new_zeros(len(shape_id)).index_put_((which,), kind[on])
        out = {"color": ce(self.heads[0](tokens[on]), color[on]), "shape": ce(self.heads[1](pooled), kinds),
               "rank": ce(self.heads[2](tokens), rank), "count": ce(self.heads[3](tokens), count)}
        if self.token_kind:
            out["token_shape"] = ce(self.heads[1](tokens[on]), kind[on])
        return out
