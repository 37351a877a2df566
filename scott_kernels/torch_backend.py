"""Sparse SCOTT tokenizer from plain torch ops over visible patches only.

Activations stay compact: one (C, r, r) block per visible patch. Per stage, with input patch
side q, kernel k (stride 2, pad k//2) and conv-output patch side s = q/2:
  1. gather each visible patch with the input halo its own conv outputs need (native kernel;
     zeros where the neighbour is masked or outside the image): k//2 before, k//2 - 1 after;
  2. conv2d without padding -> exactly the patch's s x s conv outputs (no recomputed halo, so
     the convolution FLOPs are those of the visible patches), ReLU;
  3. gather those conv outputs again with a 1-pixel halo: the 2x2 max reads one pixel past the
     patch and the stride-2 blur one before it; masked neighbours read as zero, which is the
     mask the dense emulation applies after the conv;
  4. 2x2 max-pool (stride 1), zero where the dense max-pool map does not exist (the blur's own
     padding at the image border), 3x3 blur with stride 2 -> the s/2 x s/2 block.
Autograd runs through every step; the gather's gradient is the native scatter. With keep=None
every patch is visible and the sparse computation is the dense one, so that path runs the dense
convolutions directly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .ops import gather_tiles
from .reference import blur_kernel, reference_tokenize

__all__ = ["torch_tokenize", "stage_halo"]


def stage_halo(kernel_size: int) -> tuple[int, int]:
    """Input halo (before, after) that a patch's own conv outputs read (stride 2, pad k//2)."""
    pad = kernel_size // 2
    return pad, max(pad - 1, 0)


def _grid_coords(tile_pos: torch.Tensor, grid_h: int, grid_w: int):
    cells = grid_h * grid_w
    return tile_pos // cells, (tile_pos % cells) // grid_w, tile_pos % grid_w


def _window(start: torch.Tensor, side: int, before: int, length: int):
    """Global coordinates (M, length) of a window that begins `before` pixels ahead of a patch."""
    offsets = torch.arange(length, device=start.device) - before
    return start[:, None] * side + offsets


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
    of visible patches comes from ``nonzero`` (one host synchronisation).
    """
    if keep is None:
        return reference_tokenize(x, weights, None, patch_size)
    B, C, H, W = x.shape
    GH, GW = H // patch_size, W // patch_size
    positions = B * GH * GW
    device = x.device
    all_positions = torch.arange(positions, dtype=torch.int64, device=device)
    tile_pos = keep.reshape(-1).nonzero().squeeze(1)
    num_tiles = tile_pos.shape[0]
    # The image is its own source: slot = grid position, -1 where masked (read as zeros).
    slot = torch.where(keep.reshape(-1), all_positions, -1).view(B, GH, GW)
    src = x.view(B, C, GH, patch_size, GW, patch_size).permute(0, 2, 4, 1, 3, 5)
    # Compact blocks are indexed by tile: slot = tile index.
    compact_slot = torch.full((positions,), -1, dtype=torch.int64, device=device)
    compact_slot[tile_pos] = torch.arange(num_tiles, dtype=torch.int64, device=device)
    compact_slot = compact_slot.view(B, GH, GW)

    side = patch_size
    out = None
    for weight in weights:
        conv_side = side // 2
        tiles = gather_tiles(src, slot, tile_pos, *stage_halo(weight.shape[-1]))
        a = torch.relu(F.conv2d(tiles, weight, stride=2))                 # (M, C', s, s)
        a = gather_tiles(a.view(num_tiles, 1, 1, *a.shape[1:]), compact_slot, tile_pos, 1, 1)
        m = F.max_pool2d(a, kernel_size=2, stride=1)                      # (M, C', s+1, s+1)
        m = m * _max_pool_border(tile_pos, GH, GW, conv_side).to(m.dtype)
        out = F.conv2d(m, blur_kernel(m.shape[1], m.dtype, device), stride=2, groups=m.shape[1])
        side = conv_side // 2
        src, slot = out.view(num_tiles, 1, 1, out.shape[1], side, side), compact_slot
    tokens = out.reshape(num_tiles, out.shape[1])
    dense = tokens.new_zeros((positions, tokens.shape[1])).index_copy(0, tile_pos, tokens)
    return dense.view(B, GH * GW, tokens.shape[1])
