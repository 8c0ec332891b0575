"""Qwen2-VL pixel preprocessing in three passes, bit-identical to transformers' PIL image processor.

transformers' `Qwen2VLImageProcessorPil` makes about eight full passes over each image (uint8 to float64,
scale, to float32, subtract, divide, two transposes, the temporal copy). Every output value depends only
on a pixel's channel and its uint8 value, so a 3x256 lookup table, computed with the same numpy operations
in the same dtypes gives the same float32 bits; the resize is the same PIL call. What is left is one
gather and one copy into the patch layout. `tests/test_preprocess.py` checks `torch.equal` against
transformers on many shapes.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

SUPPORTED = ("Qwen2VLImageProcessorPil",)


class Qwen2VLPixels:
    """Resize, rescale, normalize and patchify one RGB image as the checkpoint's image processor does."""

    def __init__(self, image_processor) -> None:
        ip = image_processor
        self.patch, self.merge, self.temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        self.min_pixels, self.max_pixels = ip.size["shortest_edge"], ip.size["longest_edge"]
        self.resample = Image.Resampling(int(ip.resample))
        self._lut = _lookup_table(ip.rescale_factor, ip.image_mean, ip.image_std)

    @staticmethod
    def supports(image_processor) -> bool:
        ip = image_processor
        flags = ("do_resize", "do_rescale", "do_normalize")
        return (type(ip).__name__ in SUPPORTED and all(getattr(ip, f, False) for f in flags)
                and len(ip.image_mean) == len(ip.image_std) == 3)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Return (pixel_values [patches, 3 * temporal * patch * patch] float32, grid (1, rows, columns))."""
        compact, grid = self.compact(img)
        return self.expand(compact), grid

    def compact(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The resized image's uint8 values in the processor's patch order, one frame: `[patches, 3, patch,
        patch]`, an eighth of the bytes of `__call__`'s output, from which `expand` makes exactly that."""
        width, height = img.size
        rh, rw = smart_resize(height, width, factor=self.patch * self.merge,
                              min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), resample=self.resample)
        p, m = self.patch, self.merge
        gh, gw = rh // p, rw // p
        # (H, W, C) -> (gh/m, gw/m, m, m, C, p, p): the processor's patch order and per-patch layout
        blocks = np.asarray(img, dtype=np.uint8).reshape(gh // m, m, p, gw // m, m, p, 3)
        blocks = np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 6, 2, 5))
        return torch.from_numpy(blocks).view(gh * gw, 3, p, p), (1, gh, gw)

    def compact_shape(self) -> tuple[None, int, int, int]:
        return (None, 3, self.patch, self.patch)

    def expand(self, compact: torch.Tensor) -> torch.Tensor:
        """`compact`'s output as the tower's float32 `[patches, 3 * temporal * patch * patch]`, with the
        values transformers' processor gives (a lookup through its own arithmetic) and its temporal copy."""
        p, t = self.patch, self.temporal
        if compact.dtype != torch.uint8 or compact.dim() != 4 or tuple(compact.shape[1:]) != (3, p, p):
            raise ValueError(f"compact pixels must be uint8 [patches, 3, {p}, {p}], got {compact.dtype} "
                             f"{tuple(compact.shape)}")
        n = compact.shape[0]
        out = torch.empty((n, 3, t, p, p), dtype=torch.float32)
        frames, src = out.numpy(), compact.numpy()
        for c in range(3):  # the table lookup writes straight into the first frame
            np.take(self._lut[c], src[:, c], out=frames[:, c, 0], mode="clip")
        frames[:, :, 1:] = frames[:, :, :1]  # the temporal copies of the one frame
        return out.view(n, 3 * t * p * p)

def _lookup_table(scale: float, mean, std) -> np.ndarray:
    """Every uint8 value of each channel through transformers' own rescale and normalize arithmetic."""
    values = np.arange(256, dtype=np.uint8)
    rescaled = (values.astype(np.float64) * scale).astype(np.float32)
    mean32, std32 = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    return np.stack([(rescaled - mean32[c]) / std32[c] for c in range(3)]).astype(np.float32)

