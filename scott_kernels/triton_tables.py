"""The compact layout's tables on the GPU, in one Triton launch each (see compact.py for the
layout): the visible tables ``slot``/``tile_pos`` from the mask, and each tile's neighbour table.

Built by torch ops, the visible tables take a dozen launches (cumulative sum, comparisons,
selections, a scatter, the row-count assertion); here one program per image reads its mask row,
numbers its visible patches and writes both tables, and checks the row's count with a device
assertion. Without ``num_visible`` the tile count must be read back first, and the torch ops of
``compact.visible_tables`` build the tables instead.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from ._device import custom_op
from . import compact
from .triton_configs import triton_supports

__all__ = ["visible_tables", "tables_for", "neighbour_table", "check_neighbours"]


if triton is not None:

    @triton.jit
    def _neighbour_slot(slot_ptr, image, n, d, ok, GH, GW, R: tl.constexpr):
        """The slot of neighbour d (offset (d // NB - R, d % NB - R), NB = 2R + 1) of in-image
        position n of the image whose slots start at ``image``, or -1 outside the image."""
        NB: tl.constexpr = 2 * R + 1
        gy = n // GW + d // NB - R
        gx = n % GW + d % NB - R
        inside = ok & (gy >= 0) & (gy < GH) & (gx >= 0) & (gx < GW)
        return tl.load(slot_ptr + image + gy * GW + gx, mask=inside, other=-1)

    # debug=True keeps the device assertion (Triton compiles tl.device_assert away otherwise)
    @triton.jit(debug=True)
    def _visible_tables_kernel(keep_ptr, slot_ptr, tile_pos_ptr, nbr_ptr, N, num_visible, GW,
                               R: tl.constexpr, BLOCK: tl.constexpr):
        """Row b = program_id(0) of keep (B, N): slot[b, n] = b * K + (visible patches before n), or
        -1, and tile_pos of those tiles = b * N + n, for K = num_visible. A row holding more than
        K visible patches numbers its first K; one with fewer gives its missing tiles the row's
        first position; either fails the device assertion, and no index leaves its table.
        With R >= 0 also the neighbour table of the row's tiles (see _neighbour_table_kernel):
        neighbours are in the same image, whose slots this program has just written."""
        b = tl.program_id(0).to(tl.int64)
        row = b * N
        first_tile = b * num_visible
        seen = tl.full((), 0, tl.int32)
        for start in range(0, N, BLOCK):
            n = start + tl.arange(0, BLOCK)
            ok = n < N
            kept = (tl.load(keep_ptr + row + n, mask=ok, other=0) != 0).to(tl.int32)
            index = seen + tl.cumsum(kept, 0) - 1
            visible = ok & (kept != 0) & (index < num_visible)
            tile = first_tile + index
            tl.store(slot_ptr + row + n, tl.where(visible, tile, -1).to(tl.int32), mask=ok)
            tl.store(tile_pos_ptr + tile, row + n, mask=visible)
            seen += tl.sum(kept, 0)
        tl.device_assert(seen == num_visible, "keep: every row must hold exactly num_visible visible patches")
        for start in range(0, num_visible, BLOCK):
            j = start + tl.arange(0, BLOCK)
            tl.store(tile_pos_ptr + first_tile + j, row + tl.zeros_like(j).to(tl.int64),
                     mask=(j >= seen) & (j < num_visible))
        if R >= 0:
            NB: tl.constexpr = 2 * R + 1
            GH = N // GW
            tl.debug_barrier()   # the row's slot and tile_pos, written above, read back below
            for start in range(0, num_visible * NB * NB, BLOCK):
                e = start + tl.arange(0, BLOCK)
                ok = e < num_visible * NB * NB
                n = tl.load(tile_pos_ptr + first_tile + e // (NB * NB), mask=ok, other=row) - row
                s = _neighbour_slot(slot_ptr, row, n, e % (NB * NB), ok, GH, GW, R)
                tl.store(nbr_ptr + first_tile * (NB * NB) + e, s, mask=ok)

    @triton.jit
    def _neighbour_table_kernel(slot_ptr, tile_pos_ptr, nbr_ptr, total, num_tiles, num_pos, GH, GW,
                                R: tl.constexpr, BLOCK: tl.constexpr):
        """nbr (M, 2R+1, 2R+1) int32: the tile at grid offset (dy - R, dx - R) from each tile, or
        -1 (masked, outside the image, or a slot naming no tile)."""
        NB: tl.constexpr = 2 * R + 1
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = e < total
        pos = tl.load(tile_pos_ptr + e // (NB * NB), mask=ok, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1)
        image = pos - pos % (GH * GW)
        s = _neighbour_slot(slot_ptr, image, pos - image, e % (NB * NB), ok, GH, GW, R)
        s = tl.where((s >= 0) & (s < num_tiles), s, -1)
        tl.store(nbr_ptr + e, s.to(tl.int32), mask=ok)


@custom_op("scott_kernels::triton_visible_tables", mutates_args=())
def visible_tables(keep: torch.Tensor, num_visible: int, grid_h: int, grid_w: int, radius: int = -1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot (B, GH, GW) int32, tile_pos (B * num_visible,) int64, nbr) of a (B, GH * GW) bool
    mask whose rows each hold ``num_visible`` visible patches (a device assertion checks it), in
    one launch and with no host synchronisation; the same tables as ``compact.visible_tables``,
    and with ``radius`` >= 0 the tiles' neighbour table (``neighbour_table``; else nbr is empty)."""
    slot, tile_pos, nbr = compact.new_tables("triton_visible_tables", keep, num_visible, grid_h, grid_w, radius)
    if not triton_supports(keep.device):
        raise RuntimeError(f"triton_visible_tables: Triton does not run on {keep.device} here")
    batch, positions = keep.shape
    nb = nbr.shape[1]
    if batch and positions:
        block = min(1024, triton.next_power_of_2(max(positions, num_visible * nb * nb)))
        # debug for the assertion alone: no overflow checks on every integer op (4x the code)
        _visible_tables_kernel[(batch,)](keep.contiguous(), slot, tile_pos, nbr if nb else slot, positions, num_visible,
                                         grid_w, R=radius if nb else -1, BLOCK=block, num_warps=4,
                                         sanitize_overflow=False)
    return slot, tile_pos, nbr


@visible_tables.register_fake
def _(keep, num_visible, grid_h, grid_w, radius=-1):
    return compact.new_tables("triton_visible_tables", keep, num_visible, grid_h, grid_w, radius)


def tables_for(keep: torch.Tensor | None, batch: int, grid_h: int, grid_w: int, device: torch.device,
               num_visible: int | None = None, radius: int = -1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(slot, tile_pos, nbr): ``compact.visible_tables``, in one launch where the visible count is
    given, which then also builds the neighbour table of ``radius`` (>= 0; else nbr is None)."""
    if keep is None or num_visible is None:
        return (*compact.visible_tables(keep, batch, grid_h, grid_w, device, num_visible), None)
    slot, tile_pos, nbr = visible_tables(keep.reshape(batch, grid_h * grid_w), num_visible, grid_h, grid_w, radius)
    return slot, tile_pos, nbr if radius >= 0 else None


@custom_op("scott_kernels::triton_neighbour_table", mutates_args=())
def neighbour_table(slot: torch.Tensor, tile_pos: torch.Tensor, radius: int) -> torch.Tensor:
    """(M, 2r+1, 2r+1) int32: each tile's neighbour within ``radius`` patches, or -1. Built once
    per stage: the conv's forward and both its gradients gather through the same table."""
    compact.check_tables("triton_neighbour_table", slot, slot, tile_pos)
    if radius < 0:
        raise ValueError(f"triton_neighbour_table: radius must be >= 0, got {radius}")
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    num_tiles = tile_pos.shape[0]
    nb = 2 * radius + 1
    nbr = torch.empty((num_tiles, nb, nb), dtype=torch.int32, device=slot.device)
    total = nbr.numel()
    if total:
        block = 1024
        _neighbour_table_kernel[(triton.cdiv(total, block),)](
            slot, tile_pos, nbr, total, num_tiles, slot.numel(), slot.shape[1], slot.shape[2], R=radius, BLOCK=block)
    return nbr


@neighbour_table.register_fake
def _(slot, tile_pos, radius):
    nb = 2 * radius + 1
    return slot.new_empty((tile_pos.shape[0], nb, nb), dtype=torch.int32)


def check_neighbours(name: str, nbr: torch.Tensor, tile_pos: torch.Tensor, radius: int) -> torch.Tensor:
    """Raises unless ``nbr`` is the (M, 2r+1, 2r+1) int32 table for these tiles; returns it contiguous."""
    nb = 2 * radius + 1
    want = (tile_pos.shape[0], nb, nb)
    if nbr.dtype != torch.int32 or tuple(nbr.shape) != want or nbr.device != tile_pos.device:
        raise ValueError(f"{name}: nbr must be an int32 {want} neighbour table on {tile_pos.device}, "
                         f"got {tuple(nbr.shape)} {nbr.dtype} on {nbr.device}")
    return nbr.contiguous()
