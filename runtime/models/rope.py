"""Rotary position math: M-RoPE for the LM, 2-D RoPE and window order for the vision tower."""
from __future__ import annotations

from collections.abc import Sequence

import torch


class MRope:
    """Multimodal RoPE: frequency j rotates by the t, h or w position, chosen by `mrope_section`."""

    def __init__(self, head_dim: int, theta: float, section: Sequence[int], device: torch.device | str) -> None:
        if 2 * sum(section) != head_dim:
            raise ValueError(f"mrope_section {list(section)} must sum to head_dim / 2 = {head_dim // 2}")
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        axis = [i % 3 for i, n in enumerate(section) for _ in range(n)]
        self.axis = torch.tensor(axis, device=device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[3, T]` -> cos, sin `[T, head_dim]` in `dtype`."""
        freqs = positions[self.axis].T.float() * self.inv_freq  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_positions(input_ids: Sequence[int] | torch.Tensor, image_grid_thw: Sequence[Sequence[int]],
                   image_token_id: int, spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """M-RoPE positions `[3, L]` and the decode delta, as transformers' `get_rope_index`.

    Text advances all three axes by one per token. An image's tokens get (t, h, w) grid coordinates
    offset by the running position, which then advances by max(h, w) of the merged grid. The token
    at absolute index i >= L decodes at position i + delta on every axis.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    image_rows = (ids == image_token_id).nonzero().squeeze(1).tolist()
    pieces, pos, row, used = [], 0, 0, 0
    for t, h, w in image_grid_thw:
        gt, gh, gw = int(t), int(h) // spatial_merge_size, int(w) // spatial_merge_size
        n = gt * gh * gw
        if used + n > len(image_rows):
            raise ValueError(f"image grid {(t, h, w)} needs {n} image tokens; too few left in input_ids")
        start = image_rows[used]
        pieces.append(torch.arange(start - row).expand(3, -1) + pos)
        pos += start - row
        pieces.append(_grid_positions(gt, gh, gw) + pos)
        pos += max(gh, gw)
        row, used = start + n, used + n
    if used != len(image_rows):
        raise ValueError(f"{len(image_rows)} image tokens in input_ids but the grids cover {used}")
    pieces.append(torch.arange(len(ids) - row).expand(3, -1) + pos)
    positions = torch.cat(pieces, dim=1)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def _grid_positions(t: int, h: int, w: int) -> torch.Tensor:
    """`[3, t*h*w]` (t, h, w) coordinates in row-major order."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    return grid.reshape(3, -1)


def vision_patch_positions(grid_thw: Sequence[Sequence[int]], merge: int) -> torch.Tensor:
    """`[N, 2]` (h, w) of every patch, in the tower's order: merge x merge blocks kept together."""
    out = []
    for t, h, w in grid_thw:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        hw = torch.stack((hh, ww), dim=-1).reshape(h // merge, merge, w // merge, merge, 2)
        out.append(hw.transpose(1, 2).reshape(-1, 2).repeat(t, 1))
    return torch.cat(out)


def vision_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE: the first half of the rotated pairs follow h, the second half w. fp32 `[N, head_dim]`."""
    quarter = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=positions.device) / quarter)
    freqs = (positions.float()[..., None] * inv_freq).flatten(1)  # [N, head_dim / 2]: h freqs then w freqs
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def window_order(grid_thw: Sequence[Sequence[int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL windowing over merged units (each `merge**2` patches).

    Returns the permutation of merged units that makes every window contiguous, and cumulative
    window boundaries in patches (empty windows dropped).
    """
    order, cu, base = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        units = torch.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // window), -(-gw // window)
        padded = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)
        padded[:, :gh, :gw] = units
        tiles = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        order.append(tiles[tiles >= 0] + base)
        sizes = (tiles >= 0).sum(1)
        cu.extend((torch.cumsum(sizes[sizes > 0], 0) * merge * merge + cu[-1]).tolist())
        base += t * gh * gw
    return torch.cat(order), cu
