"""The compact layout's tables on the GPU, in one Triton launch each (see compact.py for the
layout): the visible tables ``slot``/``tile_pos`` from the mask, and each tile's neighbour table.
The visible tables' launch can also build the first compact stage's neighbour table, lay out
its weight for both GEMMs and pack the images for the image stage (the layout and packing passes
themselves live here so that triton_conv's layout launch and triton_image's packing launch share
them).

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
from .triton_configs import autotune, cdiv, check_interpretable, pow2, triton_supports

__all__ = ["visible_tables", "tables_for", "neighbour_table", "check_neighbours", "new_weight_layouts", "new_packed"]


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

    # debug=True keeps the device assertion (Triton compiles tl.device_assert away otherwise). One
    # config, through the package's autotuner all the same: a repeated launch then calls its
    # compiled kernel directly, not through the JIT's binding of these ~50 arguments
    @autotune([triton.Config({}, num_warps=4)], key=[], shared=None)
    @triton.jit(debug=True)
    def _visible_tables_kernel(keep_ptr, slot_ptr, tile_pos_ptr, nbr_ptr, N, num_visible, GW, batch,
                               w_ptr, gemm_ptr, t_ptr, w_total, x_ptr, packed_ptr, norm_ptr, iw_ptr, iw_out_ptr,
                               H, W, HP, WP, s_b, s_c, s_h, s_w, pack_rows, iw_total, R: tl.constexpr,
                               BLOCK: tl.constexpr, C_OUT: tl.constexpr, C_IN: tl.constexpr, KK: tl.constexpr,
                               CW: tl.constexpr, BLOCK_W: tl.constexpr, C0: tl.constexpr, CP: tl.constexpr,
                               P: tl.constexpr, PAD: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                               PACK_W: tl.constexpr, C_OUT0: tl.constexpr, KSIZE0: tl.constexpr,
                               KXE: tl.constexpr, IW_BLOCK: tl.constexpr):
        """Row b = program_id(0) < batch of keep (B, N): slot[b, n] = b * K + (visible patches
        before n), or -1, and tile_pos of those tiles = b * N + n, for K = num_visible. A row holding
        more than K visible patches numbers its first K; one with fewer gives its missing tiles the
        row's first position; either fails the device assertion, and no index leaves its table.
        With R >= 0 also the neighbour table of the row's tiles (see _neighbour_table_kernel):
        neighbours are in the same image, whose slots this program has just written. With
        BLOCK_W > 0, every program also lays out every num_programs-th block of BLOCK_W elements
        of a stage's weight from block b on (see triton_conv._weight_layouts_kernel). With
        PACK_W > 0, every program also packs every num_programs-th row of the images from row b on
        (see triton_image._pack_image_kernel; a patch's visibility read from ``keep``, since the
        slot table is being written by this launch) and writes its share of the image GEMM's
        padded weight (_image_weight_block)."""
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
        if PACK_W > 0:
            for prow in range(b, pack_rows, tl.num_programs(0)):
                for col0 in range(0, WP, PACK_W):
                    # (a tensor under the interpreter too, whose loop variables are plain ints)
                    _pack_block(x_ptr, packed_ptr, keep_ptr, norm_ptr, prow + tl.full((), 0, tl.int64), col0, 0,
                                N // GW, GW, H, W, HP, WP, s_b, s_c, s_h, s_w, C0, CP, P, PAD, NORMALIZE, ACC, PACK_W,
                                True)
            for start in range(b * IW_BLOCK, iw_total, tl.num_programs(0) * IW_BLOCK):
                _image_weight_block(iw_ptr, iw_out_ptr, start + tl.arange(0, IW_BLOCK), iw_total, iw_total, C0, CP,
                                    C_OUT0, KSIZE0, KXE)

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
    def _pack_block(x_ptr, packed_ptr, mask_ptr, norm_ptr, prow, col0, num_tiles, GH, GW, H, W, HP, WP, s_b, s_c, s_h,
                    s_w, C: tl.constexpr, CP: tl.constexpr, P: tl.constexpr, PAD: tl.constexpr,
                    NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr, FROM_KEEP: tl.constexpr):
        """Packs BLOCK_W pixels from column col0 of packed row ``prow`` (= b * HP + y + PAD): packed
        (B, HP, WP, CP)[b, y + PAD, x + PAD, c] = image[b, c, y, x] (normalised with NORMALIZE)
        where (y, x) is in the image and its patch visible, else 0. A patch is visible where the
        slot table names a tile, or with FROM_KEEP where the (B, GH * GW) mask ``mask_ptr`` says so
        (for a launch that writes the slot table at the same time)."""
        b = prow // HP
        y = prow % HP - PAD
        xp = col0 + tl.arange(0, BLOCK_W)
        x = xp - PAD
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        yc = tl.where(inside, y, 0)
        xc = tl.where(inside, x, 0)
        cell = (b * GH + yc // P) * GW + xc // P
        if FROM_KEEP:
            valid = inside & (tl.load(mask_ptr + cell, mask=inside, other=0) != 0)
        else:
            s = tl.load(mask_ptr + cell, mask=inside, other=-1)
            valid = inside & (s >= 0) & (s < num_tiles)
        c = tl.arange(0, CP)
        ok = valid[:, None] & (c < C)[None, :]
        src = x_ptr + b.to(tl.int64) * s_b + c[None, :].to(tl.int64) * s_c + yc.to(tl.int64)[:, None] * s_h \
            + xc.to(tl.int64)[:, None] * s_w
        v = tl.load(src, mask=ok, other=0)
        if NORMALIZE:
            mean = tl.load(norm_ptr + c, mask=c < C, other=0.0).to(ACC)
            inv_std = tl.load(norm_ptr + C + c, mask=c < C, other=0.0).to(ACC)
            v = tl.where(ok, (v.to(ACC) - mean[None, :]) * inv_std[None, :], 0.0)
        dst = packed_ptr + (prow.to(tl.int64) * WP + xp)[:, None] * CP + c[None, :]
        tl.store(dst, v.to(packed_ptr.dtype.element_ty), mask=(xp < WP)[:, None])

    @triton.jit
    def _image_weight_block(w_ptr, w_out_ptr, e, w_total, w_end, C: tl.constexpr, CP: tl.constexpr,
                            C_OUT: tl.constexpr, KSIZE: tl.constexpr, KXE: tl.constexpr):
        """Elements ``e`` (below w_end) of the image GEMM's weight: w_out (k, KXE, CP, C_out) =
        weight (C_out, C_in, k, k) at (ky, kx, ci, co), 0 at the padded taps (kx >= k) and channels
        (ci >= C_in); the store casts to w_out's dtype."""
        co = e % C_OUT
        ci = (e // C_OUT) % CP
        kx = (e // (C_OUT * CP)) % KXE
        ky = e // (C_OUT * CP * KXE)
        mine = (e < w_total) & (e < w_end)
        real = mine & (ci < C) & (kx < KSIZE)
        w = tl.load(w_ptr + ((co * C + ci) * KSIZE + ky) * KSIZE + kx, mask=real, other=0.0)
        tl.store(w_out_ptr + e, w.to(w_out_ptr.dtype.element_ty), mask=mine)


    # one config, through the package's autotuner: a plan can record its launch (scott_kernels._replay)
    @autotune([triton.Config({}, num_warps=4)], key=[], shared=None)
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


def _packed_geometry(height: int, width: int, k: int, c_in: int) -> dict:
    """Layout of the packed images (B, HP, WP, CP): channels padded to CP (a power of two), a
    kernel row read as KROW = KXE * CP contiguous elements (KXE >= k pixels), KYP >= k kernel rows
    covered by the weight-gradient tiles, rows padded so that every such read stays inside and
    each packed row is whole 8-element (16-byte in 16 bits) vectors."""
    pad = k // 2
    cp = pow2(c_in)
    kxe = max(pow2(k), -(-16 // cp))
    kyp = max(2, pow2(k))   # at least the smallest weight-gradient tile (two kernel rows)
    hp = max(height + 2 * pad, height - 2 + kyp)
    align = max(1, 8 // cp)
    wp = -(-max(width + 2 * pad, width - 2 + kxe) // align) * align
    return dict(pad=pad, cp=cp, kxe=kxe, krow=kxe * cp, kyp=kyp, hp=hp, wp=wp)



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
                    weight: torch.Tensor | None = None, layout_dtype: torch.dtype | None = None,
                    images: tuple | None = None) -> tuple:
    """The body of ``visible_tables``, for callers already inside an op: its five tables, then with
    ``images`` = (x, norm, normalize, image weight, patch side, dtype) the image stage's packed
    images, padded GEMM weight in ``dtype`` and their geometry, written by the same launch (else
    None; see triton_image._pack_image for the arguments)."""
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
    packed = None
    pack_args, pack_consts = (slot,) * 5 + (0,) * 10, _NO_PACKING
    if images is not None:
        packed, pack_args, pack_consts = _packing(keep, *images)
    pack_rows = pack_args[-2]
    # the rows, or enough programs to keep the layout and packing passes' loads in flight
    programs = max(rows, min(cdiv(w_total, block_w), _LAYOUT_PROGRAMS), min(pack_rows, _PACK_PROGRAMS))
    if programs:
        block = min(1024, pow2(max(positions, num_visible * nb * nb, 1)))
        geometry = layouts_args(weight) if w_total else {"C_OUT": 1, "C_IN": 1, "KK": 1, "CW": 1}
        # debug for the assertion alone: no overflow checks on every integer op (4x the code)
        _visible_tables_kernel[(programs,)](
            keep.contiguous(), slot, tile_pos, nbr if nb else slot, positions, num_visible, grid_w, rows,
            weight.contiguous() if w_total else slot, w_gemm if w_total else slot, w_t if w_total else slot,
            w_total, *pack_args, R=radius if nb else -1, BLOCK=block, BLOCK_W=block_w if w_total else 0,
            sanitize_overflow=False, **geometry, **pack_consts)
    return slot, tile_pos, nbr, w_gemm, w_t, packed


# packed image rows per launch: up to this many programs, each packing every num_programs-th row
_PACK_PROGRAMS = 1024
_NO_PACKING = dict(C0=1, CP=1, P=1, PAD=0, NORMALIZE=False, ACC=None, PACK_W=0, C_OUT0=1, KSIZE0=1, KXE=1,
                   IW_BLOCK=64)


def new_packed(x: torch.Tensor, k: int, dtype: torch.dtype, c_out: int | None = None) -> tuple:
    """(packed images, the image GEMM's (k * KROW, C_out) weight or None without ``c_out``, their
    geometry, the packed row block of a program) for images ``x`` (B, C, H, W) and a k x k conv,
    uninitialised, in ``dtype``: what a packing launch writes."""
    B, C, H, W = x.shape
    geo = _packed_geometry(H, W, k, C)
    packed = torch.empty((B, geo["hp"], geo["wp"], geo["cp"]), dtype=dtype, device=x.device)
    w_image = None if c_out is None else torch.empty((k * geo["krow"], c_out), dtype=dtype, device=x.device)
    return packed, w_image, geo, min(256, pow2(geo["wp"]))


def _packing(keep: torch.Tensor, x: torch.Tensor, norm: torch.Tensor, normalize: bool, weight: torch.Tensor,
             in_side: int, dtype: torch.dtype) -> tuple:
    """((packed images, padded image weight, their geometry), the tables kernel's packing
    arguments, its packing constants) for images ``x`` (B, C, H, W) and the image stage's
    ``weight``."""
    from .triton_configs import accumulator
    check_interpretable("triton_visible_tables", dtype, *((x.dtype,) if x.is_floating_point() else ()))
    B, C, H, W = x.shape
    c_out, _, k, _ = weight.shape
    packed, w_image, geo, block = new_packed(x, k, dtype, c_out)
    args = (x, packed, norm, weight.contiguous(), w_image, H, W, geo["hp"], geo["wp"], *x.stride(),
            B * geo["hp"], w_image.numel())
    consts = dict(C0=C, CP=geo["cp"], P=in_side, PAD=geo["pad"], NORMALIZE=normalize, ACC=accumulator(dtype),
                  PACK_W=block, C_OUT0=c_out, KSIZE0=k, KXE=geo["kxe"], IW_BLOCK=64)
    return (packed, w_image, geo), args, consts


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
    return _visible_tables(keep, num_visible, grid_h, grid_w, radius, weight, layout_dtype)[:5]


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
               layout_dtype: torch.dtype | None = None, num_tiles: int | None = None, images: tuple | None = None
               ) -> tuple:
    """(slot, tile_pos, nbr, layouts, packed): ``compact.visible_tables``, in one launch where the visible
    count is given, which then also builds the neighbour table of ``radius`` (>= 0; else nbr is
    None) and ``weight``'s two GEMM layouts in ``layout_dtype`` (a (w_gemm, w_t) pair; else
    None). ``num_tiles``: the visible count without ``num_visible``, when the caller has it
    (else it is read back from the device). ``images``: the image stage's packing, done by the same
    launch (``_visible_tables``), returned last as (packed images, image weight, geometry); else
    None."""
    if keep is None or num_visible is None:
        return (*compact.visible_tables(keep, batch, grid_h, grid_w, device, num_visible, num_tiles), None, None,
                None)
    slot, tile_pos, nbr, w_gemm, w_t, packed = _visible_tables(keep.reshape(batch, grid_h * grid_w), num_visible,
                                                              grid_h, grid_w, radius, weight, layout_dtype, images)
    return slot, tile_pos, nbr if radius >= 0 else None, (w_gemm, w_t) if weight is not None else None, packed


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
