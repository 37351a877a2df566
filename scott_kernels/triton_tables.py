"""The compact layout's tables on the GPU, in one Triton launch each (see compact.py for the
layout): the visible tables ``slot``/``tile_pos`` from the mask, and each tile's neighbour table.
The visible tables' launch can also build the first compact stage's neighbour table and lay out
its weight for both GEMMs (the layout pass itself lives here so that triton_conv's own layout
launch shares it).

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
from .triton_configs import cdiv, check_interpretable, pow2, triton_supports

__all__ = ["visible_tables", "tables_for", "neighbour_table", "check_neighbours", "new_weight_layouts"]


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
    def _visible_tables_kernel(keep_ptr, slot_ptr, tile_pos_ptr, nbr_ptr, N, num_visible, GW, batch,
                               w_ptr, gemm_ptr, t_ptr, w_total, R: tl.constexpr, BLOCK: tl.constexpr,
                               C_OUT: tl.constexpr, C_IN: tl.constexpr, KK: tl.constexpr, CW: tl.constexpr,
                               BLOCK_W: tl.constexpr):
        """Row b = program_id(0) < batch of keep (B, N): slot[b, n] = b * K + (visible patches
        before n), or -1, and tile_pos of those tiles = b * N + n, for K = num_visible. A row holding
        more than K visible patches numbers its first K; one with fewer gives its missing tiles the
        row's first position; either fails the device assertion, and no index leaves its table.
        With R >= 0 also the neighbour table of the row's tiles (see _neighbour_table_kernel):
        neighbours are in the same image, whose slots this program has just written. With
        BLOCK_W > 0, every program also lays out every num_programs-th block of BLOCK_W elements
        of a stage's weight from block b on (see triton_conv._weight_layouts_kernel)."""
        b = tl.program_id(0).to(tl.int64)
        if b < batch:
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
        if BLOCK_W > 0:
            for start in range(b * BLOCK_W, w_total, tl.num_programs(0) * BLOCK_W):
                _weight_layouts_block(w_ptr, gemm_ptr, t_ptr, start + tl.arange(0, BLOCK_W), w_total,
                                      C_OUT, C_IN, KK, CW)

    @triton.jit
    def _weight_layouts_block(w_ptr, gemm_ptr, t_ptr, e, total, C_OUT: tl.constexpr, C_IN: tl.constexpr,
                              KK: tl.constexpr, CW: tl.constexpr):
        """Elements ``e`` of _weight_layouts_kernel's pass; each store casts to its layout's dtype."""
        ok = e < total
        cw = e % CW
        co = (e // CW) % C_OUT
        tap = e // (CW * C_OUT)
        real = ok & (cw < C_IN)
        v = tl.load(w_ptr + (co * C_IN + cw) * KK + tap, mask=real, other=0.0)
        tl.store(t_ptr + e, v.to(t_ptr.dtype.element_ty), mask=ok)
        tl.store(gemm_ptr + (tap * C_IN + cw) * C_OUT + co, v.to(gemm_ptr.dtype.element_ty), mask=real)


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


_LAYOUT_PROGRAMS = 256


def _padded_channels(c_in: int) -> int:
    """The input gradient's weight rows: whole 16-byte vectors of channels."""
    return -(-c_in // 8) * 8


def new_weight_layouts(name: str, weight: torch.Tensor, dtype: torch.dtype | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks a compact stage's (C_out, C_in, k, k) weight and returns its two GEMM layouts,
    uninitialised, in ``dtype`` (default: the weight's): the forward's (k*k*C_in, C_out) and the
    input gradient's (k*k*C_out, CW), CW = C_in rounded up to a multiple of 8 (zeros)."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or not weight.is_floating_point():
        raise ValueError(f"{name}: weight must be a floating (C_out, C_in, k, k) tensor, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    c_out, c_in, k, _ = weight.shape
    dtype = dtype or weight.dtype
    return (weight.new_empty((k * k * c_in, c_out), dtype=dtype),
            weight.new_empty((k * k * c_out, _padded_channels(c_in)), dtype=dtype))


def layouts_args(weight: torch.Tensor) -> dict:
    """The layout pass's compile-time geometry for ``weight``."""
    c_out, c_in, k, _ = weight.shape
    return {"C_OUT": c_out, "C_IN": c_in, "KK": k * k, "CW": _padded_channels(c_in)}



def _visible_tables(keep: torch.Tensor, num_visible: int, grid_h: int, grid_w: int, radius: int = -1,
                    weight: torch.Tensor | None = None, layout_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``visible_tables``, for callers already inside an op."""
    slot, tile_pos, nbr = compact.new_tables("triton_visible_tables", keep, num_visible, grid_h, grid_w, radius)
    w_gemm, w_t = _layouts_or_empty(keep, weight, layout_dtype)
    if not triton_supports(keep.device):
        raise RuntimeError(f"triton_visible_tables: Triton does not run on {keep.device} here")
    if weight is not None:
        if weight.device != keep.device:
            raise ValueError(f"triton_visible_tables: weight is on {weight.device}, expected {keep.device}")
        check_interpretable("triton_visible_tables", weight.dtype, w_t.dtype)
    batch, positions = keep.shape
    nb = nbr.shape[1]
    w_total, block_w = w_t.numel(), 1024
    rows = batch if positions else 0
    # the rows, or enough programs to keep the layout pass's loads in flight (a few per SM)
    programs = max(rows, min(cdiv(w_total, block_w), _LAYOUT_PROGRAMS))
    if programs:
        block = min(1024, pow2(max(positions, num_visible * nb * nb, 1)))
        geometry = layouts_args(weight) if w_total else {"C_OUT": 1, "C_IN": 1, "KK": 1, "CW": 1}
        # debug for the assertion alone: no overflow checks on every integer op (4x the code)
        _visible_tables_kernel[(programs,)](
            keep.contiguous(), slot, tile_pos, nbr if nb else slot, positions, num_visible, grid_w, rows,
            weight.contiguous() if w_total else slot, w_gemm if w_total else slot, w_t if w_total else slot,
            w_total, R=radius if nb else -1, BLOCK=block, BLOCK_W=block_w if w_total else 0, num_warps=4,
            sanitize_overflow=False, **geometry)
    return slot, tile_pos, nbr, w_gemm, w_t


@custom_op("scott_kernels::triton_visible_tables", mutates_args=())
def visible_tables(keep: torch.Tensor, num_visible: int, grid_h: int, grid_w: int, radius: int = -1,
                   weight: torch.Tensor | None = None, layout_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot (B, GH, GW) int32, tile_pos (B * num_visible,) int64, nbr, w_gemm, w_t) of a
    (B, GH * GW) bool mask whose rows each hold ``num_visible`` visible patches (a device assertion
    checks it), in one launch and with no host synchronisation: the tables of
    ``compact.visible_tables``; with ``radius`` >= 0 the tiles' neighbour table
    (``neighbour_table``; else nbr is empty); with a compact stage's ``weight`` its two GEMM
    layouts (``triton_conv.weight_layouts``) in ``layout_dtype`` (default: the weight's; else
    w_gemm and w_t are empty). One launch builds everything the first compact stage needs before
    its activations exist."""
    return _visible_tables(keep, num_visible, grid_h, grid_w, radius, weight, layout_dtype)


def _layouts_or_empty(keep: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype | None):
    if weight is None:
        empty = keep.new_empty((0, 0), dtype=dtype or torch.float32)
        return empty, empty.new_empty((0, 0))
    return new_weight_layouts("triton_visible_tables", weight, dtype)


@visible_tables.register_fake
def _(keep, num_visible, grid_h, grid_w, radius=-1, weight=None, layout_dtype=None):
    return (*compact.new_tables("triton_visible_tables", keep, num_visible, grid_h, grid_w, radius),
            *_layouts_or_empty(keep, weight, layout_dtype))


def tables_for(keep: torch.Tensor | None, batch: int, grid_h: int, grid_w: int, device: torch.device,
               num_visible: int | None = None, radius: int = -1, weight: torch.Tensor | None = None,
               layout_dtype: torch.dtype | None = None, num_tiles: int | None = None) -> tuple:
    """(slot, tile_pos, nbr, layouts): ``compact.visible_tables``, in one launch where the visible
    count is given, which then also builds the neighbour table of ``radius`` (>= 0; else nbr is
    None) and ``weight``'s two GEMM layouts in ``layout_dtype`` (a (w_gemm, w_t) pair; else
    None). ``num_tiles``: the visible count without ``num_visible``, when the caller has it
    (else it is read back from the device)."""
    if keep is None or num_visible is None:
        return (*compact.visible_tables(keep, batch, grid_h, grid_w, device, num_visible, num_tiles), None, None)
    slot, tile_pos, nbr, w_gemm, w_t = _visible_tables(keep.reshape(batch, grid_h * grid_w), num_visible, grid_h,
                                                      grid_w, radius, weight, layout_dtype)
    return slot, tile_pos, nbr if radius >= 0 else None, (w_gemm, w_t) if weight is not None else None


def _neighbour_table(slot: torch.Tensor, tile_pos: torch.Tensor, radius: int) -> torch.Tensor:
    """The body of ``neighbour_table``, for callers already inside an op."""
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
        _neighbour_table_kernel[(cdiv(total, block),)](
            slot, tile_pos, nbr, total, num_tiles, slot.numel(), slot.shape[1], slot.shape[2], R=radius, BLOCK=block)
    return nbr


@custom_op("scott_kernels::triton_neighbour_table", mutates_args=())
def neighbour_table(slot: torch.Tensor, tile_pos: torch.Tensor, radius: int) -> torch.Tensor:
    """(M, 2r+1, 2r+1) int32: each tile's neighbour within ``radius`` patches, or -1. Built once
    per stage: the conv's forward and both its gradients gather through the same table."""
    return _neighbour_table(slot, tile_pos, radius)


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
