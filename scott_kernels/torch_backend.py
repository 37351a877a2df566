"""Sparse SCOTT tokenizer from plain torch ops over visible patches only.

Per stage: gather each visible patch with its halo into a tile (native kernel, zeros where the
neighbour is masked), convolve the tile without padding, apply the mask at the conv's resolution,
ReLU, MaxBlurPool on the tile, and keep one compact (M, C, r, r) block per visible patch; the next
stage gathers its halos from those blocks. Autograd runs through every step (the gather's
gradient is the native scatter).

Tile geometry for a stage whose input patch side is q (conv stride 2, kernel k, pad k//2):
the pool needs the conv output of the patch plus 1 pixel all round (its 2x2 max reads one pixel
past the patch, and the blur one before it), and that conv output needs input rows
[2*(start-1) - k//2, 2*(start + q/2) + k//2], i.e. a halo of k//2 + 2 before and k//2 + 1 after.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .ops import gather_tiles
from .reference import blur_kernel

__all__ = ["torch_tokenize", "stage_halo"]


def stage_halo(kernel_size: int) -> tuple[int, int]:
    """Input halo (before, after) a stage needs around each patch."""
    return kernel_size // 2 + 2, kernel_size // 2 + 1


def _grid_coords(tile_pos: torch.Tensor, grid_h: int, grid_w: int):
    cells = grid_h * grid_w
    return tile_pos // cells, (tile_pos % cells) // grid_w, tile_pos % grid_w


def _window(start: torch.Tensor, side: int, before: int, length: int):
    """Global coordinates (M, length) of a window that begins `before` pixels ahead of a patch."""
    offsets = torch.arange(length, device=start.device) - before
    return start[:, None] * side + offsets


def _conv_output_visibility(keep_grid: torch.Tensor, tile_pos: torch.Tensor, side: int) -> torch.Tensor:
    """(M, 1, side+2, side+2) mask at conv-output resolution for each tile (1 px halo).

    1 where the pixel lies inside the image in a visible patch, 0 elsewhere.
    """
    B, GH, GW = keep_grid.shape
    b, gy, gx = _grid_coords(tile_pos, GH, GW)
    rows = _window(gy, side, 1, side + 2)
    cols = _window(gx, side, 1, side + 2)
    row_in = (rows >= 0) & (rows < GH * side)
    col_in = (cols >= 0) & (cols < GW * side)
    prow = rows.clamp(0, GH * side - 1) // side
    pcol = cols.clamp(0, GW * side - 1) // side
    visible = keep_grid[b[:, None, None], prow[:, :, None], pcol[:, None, :]]
    return (visible & row_in[:, :, None] & col_in[:, None, :]).unsqueeze(1)


def _max_pool_border(tile_pos: torch.Tensor, grid_h: int, grid_w: int, side: int) -> torch.Tensor:
    """(M, 1, side+1, side+1): 1 where the 2x2 max-pool output exists in the dense map.

    The dense max-pool of an R-wide map is R-1 wide; outside it the blur reads its zero padding.
    """
    _, gy, gx = _grid_coords(tile_pos, grid_h, grid_w)
    rows = _window(gy, side, 1, side + 1)
    cols = _window(gx, side, 1, side + 1)
    row_ok = (rows >= 0) & (rows < grid_h * side - 1)
    col_ok = (cols >= 0) & (cols < grid_w * side - 1)
    return (row_ok[:, :, None] & col_ok[:, None, :]).unsqueeze(1)


def torch_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None,
                   patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, D) tokens; masked tokens are exactly 0.

    Inputs are assumed validated (see ``scott_kernels.functional``). With ``keep`` given, the list
    of visible patches comes from ``nonzero`` (one host synchronisation); ``keep=None`` needs none.
    """
    B, C, H, W = x.shape
    GH, GW = H // patch_size, W // patch_size
    positions = B * GH * GW
    device = x.device
    all_positions = torch.arange(positions, dtype=torch.int64, device=device)
    if keep is None:
        keep_grid = torch.ones((B, GH, GW), dtype=torch.bool, device=device)
        tile_pos = all_positions
    else:
        keep_grid = keep.reshape(B, GH, GW)
        tile_pos = keep.reshape(-1).nonzero().squeeze(1)
    num_tiles = tile_pos.shape[0]
    # The image is its own source: slot = grid position, -1 where masked (read as zeros).
    slot = torch.where(keep_grid.reshape(-1), all_positions, -1).view(B, GH, GW)
    src = x.view(B, C, GH, patch_size, GW, patch_size).permute(0, 2, 4, 1, 3, 5)
    # Later stages read the compact blocks of the previous one: slot = tile index.
    compact_slot = torch.full((positions,), -1, dtype=torch.int64, device=device)
    compact_slot[tile_pos] = torch.arange(num_tiles, dtype=torch.int64, device=device)
    compact_slot = compact_slot.view(B, GH, GW)

    side = patch_size
    out = None
    for weight in weights:
        halo_lo, halo_hi = stage_halo(weight.shape[-1])
        tiles = gather_tiles(src, slot, tile_pos, halo_lo, halo_hi)
        conv_side = side // 2
        a = F.conv2d(tiles, weight, stride=2)
        a = torch.relu(a) * _conv_output_visibility(keep_grid, tile_pos, conv_side).to(a.dtype)
        m = F.max_pool2d(a, kernel_size=2, stride=1)
        m = m * _max_pool_border(tile_pos, GH, GW, conv_side).to(m.dtype)
        out = F.conv2d(m, blur_kernel(m.shape[1], m.dtype, device), stride=2, groups=m.shape[1])
        side = conv_side // 2
        src = out.view(num_tiles, 1, 1, out.shape[1], side, side)
        slot = compact_slot
    tokens = out.reshape(num_tiles, out.shape[1])
    dense = tokens.new_zeros((positions, tokens.shape[1])).index_copy(0, tile_pos, tokens)
    return dense.view(B, GH * GW, tokens.shape[1])
