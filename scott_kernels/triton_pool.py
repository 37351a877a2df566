"""Triton MaxBlurPool over compact visible patches, forward and backward, and the same pool fused
with the token epilogue (LayerNorm over D, position embedding, mask-token fill, packed or
(B, N, D) layout).

Layout (see triton_backend): activations are (M, s, s, C) channel-last blocks of the M visible
patches; ``slot`` (B, GH, GW) maps a grid position to its tile or -1, ``tile_pos`` (M,) a tile
to its flat grid position.

Every kernel works on pooled pixels: a program holds TILES tiles x PIXELS pooled pixels of each
x BLOCK_C channels as one [TILES, PIXELS, BLOCK_C] block. Pooled pixel (py, px) reads the 4 x 4
conv-output pixels (2py-1 .. 2py+2, 2px-1 .. 2px+2): its own tile's pixels plus, at the tile
edge, the 1-pixel halo of a neighbour. The eight neighbours' tiles are looked up once per tile
(not per element), each of the 16 reads picks its tile with at most three selects per pixel, and
loads are masked by tile and channel only, so channel vectors load 16 bytes at a time.
  forward   max over each 2x2 window of the 4 x 4 block (3 x 3 windows), binomial blur of those
  backward  the same 4 x 4 block (argmax recomputed, cheaper in bytes than storing it) and the
            3 x 3 pooled gradients around (py, px) give the gradient of the 2 x 2 conv pixels
            (2py .. 2py+1, 2px .. 2px+1) directly: no atomics, every conv pixel written once,
            optionally already multiplied by ReLU' of the activation (act > 0).
"""

from __future__ import annotations


import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from ._device import custom_op
from .compact import accumulator_dtype, check_tables
from .triton_configs import (accumulator, autotune, cdiv, check_interpretable, interpreting, pow2, rows_bucket,
                             single_config, triton_supports)

__all__ = ["max_blur_pool", "max_blur_pool_backward", "pool_tokens", "pool_tokens_backward",
           "pool_tokens_apply"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_interpreting = interpreting


# --------------------------------------------------------------------------------------------
# Configs. ROWS = pooled pixels per program (whole tiles when a tile has at most ROWS pooled
# pixels, else a chunk of one tile). Kept: the configs with no spills and the fewest
# instructions per byte for the shapes that matter (64 channels at side 8, 384 at side 2), by
# the static cost of their sm_90a machine code.
# --------------------------------------------------------------------------------------------
def _configs(table) -> list:
    if _interpreting():
        # the interpreter's cost is per program and per op, not per element: few, large programs
        return [triton.Config({"ROWS": 64, "BLOCK_C": 32})]
    configs = [triton.Config({"ROWS": rows, "BLOCK_C": bc}, num_warps=warps) for rows, bc, warps in table]
    return configs[:1] if single_config() else configs


_FWD_TABLE = [(32, 64, 4), (16, 64, 4), (16, 128, 4)]
_BWD_TABLE = [(32, 64, 8), (16, 64, 4), (16, 128, 8)]
_EPI_TABLE = [(4, 4), (8, 8), (2, 2)]    # (tokens per program, warps): a program holds all of D


def _prune_channels(configs, named_args, **kwargs):
    """Drops channel blocks wider than the channel count's power of two (masked lanes cost
    issue slots in a memory-bound kernel); keeps at least one config."""
    c = {**named_args, **kwargs}["C"]   # C is a constexpr: the autotuner passes it by keyword
    limit = max(16, pow2(c))
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= limit]
    return kept or [min(configs, key=lambda cfg: cfg.kwargs["BLOCK_C"])]


def _prune_warps(configs, named_args, **kwargs):
    """The token epilogue's backward: eight warps for more than 256 channels, else four."""
    warps = 8 if {**named_args, **kwargs}["C"] > 256 else 4
    return [cfg for cfg in configs if cfg.num_warps == warps] or configs[:1]


def _autotune(configs, key, prune=None):
    """triton_configs.autotune (fixed config under deterministic algorithms, fallback when a
    launch runs out of resources) without shared-memory pruning: these kernels stage nothing."""
    return autotune(configs, key, prune, shared=None)


_KEY = ["C", "SIDE", "ROWS_BUCKET"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, DY: tl.constexpr, DX: tl.constexpr):
        """[T] tile index of the patch at (gy + DY, gx + DX), or -1 (masked, outside, corrupt)."""
        y = gy + DY
        x = gx + DX
        inside = t_ok & (y >= 0) & (y < GH) & (x >= 0) & (x < GW)
        s = tl.load(slot_ptr + (b * GH + tl.where(inside, y, 0)) * GW + tl.where(inside, x, 0),
                    mask=inside, other=-1)
        return tl.where(inside & (s >= 0) & (s < num_tiles), s, -1)

    @triton.jit
    def _geometry(pos, own, t_ok, slot_ptr, num_tiles, num_pos, GH, GW):
        """Grid row and column of [T] tiles at flat positions ``pos`` and their eight
        neighbours' tile indices (row-major around the tile)."""
        # a corrupt position is clamped into the grid: no table makes a kernel leave its tensors
        pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1).to(tl.int32)
        cells = GH * GW
        b = pos // cells
        gy = (pos % cells) // GW
        gx = pos % GW
        n_ul = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, -1, -1)
        n_u = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, -1, 0)
        n_ur = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, -1, 1)
        n_l = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, 0, -1)
        n_r = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, 0, 1)
        n_dl = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, 1, -1)
        n_d = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, 1, 0)
        n_dr = _neighbour(slot_ptr, b, gy, gx, t_ok, GH, GW, num_tiles, 1, 1)
        return own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr

    @triton.jit
    def _tiles(pid, tile_pos_ptr, slot_ptr, num_tiles, num_pos, GH, GW, TILES: tl.constexpr):
        """The program's TILES tiles: index ([T], -1 past the end), grid row and column, and the
        eight neighbours' tile indices."""
        t = pid * TILES + tl.arange(0, TILES)
        t_ok = t < num_tiles
        pos = tl.load(tile_pos_ptr + t, mask=t_ok, other=0)
        return _geometry(pos, tl.where(t_ok, t, -1), t_ok, slot_ptr, num_tiles, num_pos, GH, GW)

    @triton.jit
    def _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right,
              I: tl.constexpr, J: tl.constexpr, LAST: tl.constexpr):
        """[T, P] tile of a tap of the 4 x 4 (LAST = 3) or 3 x 3 (LAST = 2) neighbourhood of each
        pixel: row I (0 = the row above the pixel's block), column J. Only the first and last
        rows/columns can leave the tile, and only for the pixels on the tile's edge."""
        mid = own[:, None] + 0 * up
        if I == 0:
            c = tl.where(up, n_u[:, None], mid)
            l = tl.where(up, n_ul[:, None], n_l[:, None])
            r = tl.where(up, n_ur[:, None], n_r[:, None])
        elif I == LAST:
            c = tl.where(down, n_d[:, None], mid)
            l = tl.where(down, n_dl[:, None], n_l[:, None])
            r = tl.where(down, n_dr[:, None], n_r[:, None])
        else:
            c = mid
            l = n_l[:, None] + 0 * up
            r = n_r[:, None] + 0 * up
        if J == 0:
            tile = tl.where(left, l, c)
        elif J == LAST:
            tile = tl.where(right, r, c)
        else:
            tile = c
        return tile

    @triton.jit
    def _local(q, edge_lo, edge_hi, I: tl.constexpr, LAST: tl.constexpr, SIDE: tl.constexpr):
        """Row (or column) inside its tile of tap I of pixel q: q - 1 + I, wrapped into the
        neighbour at the edges (SIDE - 1 above, 0 below)."""
        if I == 0:
            v = tl.where(edge_lo, SIDE - 1, q - 1)
        elif I == LAST:
            v = tl.where(edge_hi, 0, q - 1 + I)
        else:
            v = q - 1 + I
        return v

    @triton.jit
    def _load_tap(ptr, tile, ly, lx, c, c_ok, SIDE: tl.constexpr, C: tl.constexpr):
        """[T, P, BLOCK_C] values of compact (M, SIDE, SIDE, C) at (tile, ly, lx); 0 where tile < 0.
        32-bit pixel offsets, the tile's base alone in 64 bits."""
        base = tile.to(tl.int64) * (SIDE * SIDE * C) + (ly * SIDE + lx) * C
        ok = (tile >= 0)[:, :, None] & c_ok[None, None, :]
        return tl.load(ptr + base[:, :, None] + c[None, None, :], mask=ok, other=0.0)

    @triton.jit
    def _pixels(pid_chunk, PIXELS: tl.constexpr, PS: tl.constexpr):
        """This program's pooled pixels of a tile: (py, px) and their edge flags, each [1, P]."""
        p = pid_chunk * PIXELS + tl.arange(0, PIXELS)
        py = (p // PS)[None, :]
        px = (p % PS)[None, :]
        return py, px, py == 0, py == PS - 1, px == 0, px == PS - 1

    @triton.jit
    def _program_block(tile_pos_ptr, slot_ptr, num_tiles, num_pos, GH, GW, C: tl.constexpr, SIDE: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's [TILES, PIXELS, BLOCK_C] block (the split _pool_grid launches): whole
        tiles of PS x PS pooled pixels while a tile fits in ROWS, else CHUNKS programs per tile.
        Returns _tiles' values, _pixels' values, the channels and their mask."""
        PS: tl.constexpr = SIDE // 2
        PIXELS: tl.constexpr = PS * PS if PS * PS <= ROWS else ROWS
        TILES: tl.constexpr = ROWS // PIXELS if PS * PS <= ROWS else 1
        CHUNKS: tl.constexpr = PS * PS // PIXELS
        pid = tl.program_id(0)
        own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr = _tiles(
            pid // CHUNKS, tile_pos_ptr, slot_ptr, num_tiles, num_pos, GH, GW, TILES)
        py, px, up, down, left, right = _pixels(pid % CHUNKS, PIXELS, PS)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        return own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right, c, c < C

    @triton.jit
    def _blurred_max(act_ptr, own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr,
                     py, px, up, down, left, right, c, c_ok, GH, GW,
                     SIDE: tl.constexpr, C: tl.constexpr, ACC: tl.constexpr, RELU: tl.constexpr):
        """[T, P, BLOCK_C] MaxBlurPool of pooled pixels (py, px): max of each 2x2 window of the
        4 x 4 block, binomial blur of the 3 x 3 windows. Windows outside the map are the blur's
        zero padding (image border only; a masked neighbour's pixels read as 0). With RELU the
        pool of relu(act): relu commutes with max, so it is applied to the window maxima. Every max
        here propagates NaN, as torch's max_pool2d and relu do (IEEE maxNum would drop it)."""
        # max-map row/column 0 (2 resp.) lies outside the image only at the image's top/left
        # (bottom/right) edge
        ex_top = ~(up & (gy == 0)[:, None])
        ex_bottom = ~(down & (gy == GH - 1)[:, None])
        ex_left = ~(left & (gx == 0)[:, None])
        ex_right = ~(right & (gx == GW - 1)[:, None])
        acc = tl.zeros([own.shape[0], py.shape[1], c.shape[0]], dtype=ACC)
        h0p = acc
        h1p = acc
        h2p = acc
        for i in tl.static_range(4):
            ly = _local(2 * py, up, down, i, 3, SIDE)
            t0 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 0, 3)
            t1 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 1, 3)
            t2 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 2, 3)
            t3 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 3, 3)
            v0 = _load_tap(act_ptr, t0, ly, _local(2 * px, left, right, 0, 3, SIDE), c, c_ok, SIDE, C)
            v1 = _load_tap(act_ptr, t1, ly, _local(2 * px, left, right, 1, 3, SIDE), c, c_ok, SIDE, C)
            v2 = _load_tap(act_ptr, t2, ly, _local(2 * px, left, right, 2, 3, SIDE), c, c_ok, SIDE, C)
            v3 = _load_tap(act_ptr, t3, ly, _local(2 * px, left, right, 3, 3, SIDE), c, c_ok, SIDE, C)
            # max is exact in the storage dtype: convert the three row maxima only
            h0 = tl.maximum(v0, v1, propagate_nan=tl.PropagateNan.ALL).to(ACC)
            h1 = tl.maximum(v1, v2, propagate_nan=tl.PropagateNan.ALL).to(ACC)
            h2 = tl.maximum(v2, v3, propagate_nan=tl.PropagateNan.ALL).to(ACC)
            if i > 0:
                # max-map row i - 1: weight 1, 2, 1 over rows, the same over columns, / 16
                row_w = 2.0 / 16.0 if i == 2 else 1.0 / 16.0
                m0 = tl.maximum(h0p, h0, propagate_nan=tl.PropagateNan.ALL)
                m1 = tl.maximum(h1p, h1, propagate_nan=tl.PropagateNan.ALL)
                m2 = tl.maximum(h2p, h2, propagate_nan=tl.PropagateNan.ALL)
                if RELU:
                    m0 = tl.maximum(m0, 0.0, propagate_nan=tl.PropagateNan.ALL)
                    m1 = tl.maximum(m1, 0.0, propagate_nan=tl.PropagateNan.ALL)
                    m2 = tl.maximum(m2, 0.0, propagate_nan=tl.PropagateNan.ALL)
                m0 = tl.where(ex_left[:, :, None], m0, 0.0)
                m2 = tl.where(ex_right[:, :, None], m2, 0.0)
                row = m0 + 2.0 * m1 + m2
                if i == 1:
                    row = tl.where(ex_top[:, :, None], row, 0.0)
                if i == 3:
                    row = tl.where(ex_bottom[:, :, None], row, 0.0)
                acc += row * row_w
            h0p = h0
            h1p = h1
            h2p = h2
        return acc

    @_autotune(_configs(_FWD_TABLE), _KEY, _prune_channels)
    @triton.jit
    def _max_blur_pool_fwd_kernel(act_ptr, out_ptr, slot_ptr, tile_pos_ptr, num_tiles, num_pos, GH, GW, ROWS_BUCKET,
                                  C: tl.constexpr, SIDE: tl.constexpr, ACC: tl.constexpr, RELU: tl.constexpr,
                                  ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """(M, s, s, C) -> (M, s/2, s/2, C): 2x2 max (stride 1), binomial 3x3 blur (stride 2, pad 1),
        of relu(act) with RELU."""
        PS: tl.constexpr = SIDE // 2
        (own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
         c, c_ok) = _program_block(tile_pos_ptr, slot_ptr, num_tiles, num_pos, GH, GW, C, SIDE, ROWS, BLOCK_C)
        acc = _blurred_max(act_ptr, own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr,
                           py, px, up, down, left, right, c, c_ok, GH, GW, SIDE, C, ACC, RELU)
        base = own.to(tl.int64)[:, None] * (PS * PS * C) + (py * PS + px) * C
        ok = (own >= 0)[:, None, None] & c_ok[None, None, :]
        tl.store(out_ptr + base[:, :, None] + c[None, None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                 c, c_ok, I: tl.constexpr, J: tl.constexpr, SIDE: tl.constexpr, C: tl.constexpr):
        """[T, P, BLOCK_C] activation at row I, column J of pooled pixel (py, px)'s 4 x 4 block."""
        tile = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, I, J, 3)
        return _load_tap(act_ptr, tile, _local(2 * py, up, down, I, 3, SIDE), _local(2 * px, left, right, J, 3, SIDE),
                         c, c_ok, SIDE, C)

    # Max, min and <= in the operands' own dtype. tl.maximum / tl.minimum compute bfloat16 in
    # float32 (a conversion per element, and no packed bf16x2 instruction), and Triton's
    # interpreter compares bfloat16 tensors by their bits. Compiled, these are the semantic's
    # operations on the operands as they are; interpreted (no _semantic), tl's on float32 copies
    # of bfloat16 operands: the same values, as every bfloat16 is a float32.
    def _in_own_dtype(op):
        def fn(x, y, nan=False, _semantic=None):
            mode = tl.PropagateNan.ALL if tl.core._unwrap_if_constexpr(nan) else tl.PropagateNan.NONE
            if _semantic is None:
                wide = tl.float32 if x.dtype == tl.bfloat16 else x.dtype
                y = y.to(wide) if isinstance(y, tl.tensor) else y
                if op == "less_equal":
                    return x.to(wide) <= y
                return getattr(tl, op)(x.to(wide), y, propagate_nan=mode).to(x.dtype)
            if not isinstance(y, tl.tensor):
                y = _semantic.scalar_constant(tl.core._unwrap_if_constexpr(y), x.dtype)
            if op == "less_equal":
                return _semantic.less_equal(x, y)
            return getattr(_semantic, op)(x, y, mode)
        setattr(fn, tl.core.TRITON_BUILTIN, True)
        return fn

    _max = _in_own_dtype("maximum")
    _min = _in_own_dtype("minimum")
    _le = _in_own_dtype("less_equal")

    @triton.jit
    def _min_inf(x):
        """x with NaN read as +inf (minimum drops NaN), in x's dtype."""
        return _min(x, float("inf"), False)

    @triton.jit
    def _first_win(acc, x, earlier, gm, ok):
        """acc + gm where x, a window's last member, won it (beats every earlier member;
        ``earlier`` = their maximum with NaN read as +inf) and the window lies in the image
        (``ok``), else acc."""
        return tl.where(~_le(x, earlier) & ok, acc + gm, acc)

    @triton.jit
    def _mid_win(acc, x, fx, earlier, later, gm, ok):
        """acc + gm where x (fx: x with NaN read as +inf) beats every earlier member and no later
        one (``later`` = their NaN-propagating maximum) beats x, in a window in the image."""
        return tl.where(~_le(x, earlier) & ok & _le(later, fx), acc + gm, acc)

    @triton.jit
    def _last_win(acc, fx, later, gm, ok):
        """acc + gm where no later member beats x, a window's first member, in a window in the
        image."""
        return tl.where(_le(later, fx) & ok, acc + gm, acc)

    @_autotune(_configs(_BWD_TABLE), _KEY, _prune_channels)
    @triton.jit
    def _max_blur_pool_bwd_kernel(grad_ptr, act_ptr, dact_ptr, slot_ptr, tile_pos_ptr, num_tiles, num_pos, GH, GW,
                                  ROWS_BUCKET, C: tl.constexpr, SIDE: tl.constexpr, ACC: tl.constexpr,
                                  RELU_MASK: tl.constexpr, GRAD_AT_POS: tl.constexpr, ROWS: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
        """dact (M, s, s, C) from the pooled gradient (M, s/2, s/2, C), per 2 x 2 block of conv
        pixels (one per pooled pixel); with RELU_MASK times ReLU' (act > 0, or act NaN). With
        GRAD_AT_POS (s = 2) the gradient is the tokens' (B * GH * GW, C), a tile's row at its grid
        position, so the token gradient needs no gather first."""
        PS: tl.constexpr = SIDE // 2
        tl.static_assert(not GRAD_AT_POS or SIDE == 2)
        (own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
         c, c_ok) = _program_block(tile_pos_ptr, slot_ptr, num_tiles, num_pos, GH, GW, C, SIDE, ROWS, BLOCK_C)
        # the window gradients: the 3 x 3 pooled gradients around (py, px) blurred back onto the
        # 3 x 3 windows; window row 0 (odd) gets pooled rows py - 1 and py, row 1 (even) twice
        # row py, row 2 rows py and py + 1 (the same over columns), / 16
        for i in tl.static_range(3):
            ly = _local(py, up, down, i, 2, PS)
            t0 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 0, 2)
            t1 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 1, 2)
            t2 = _pick(own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, up, down, left, right, i, 2, 2)
            if GRAD_AT_POS:   # tile -> its grid position: the token row holding its gradient
                t0 = tl.load(tile_pos_ptr + t0, mask=t0 >= 0, other=-1)
                t1 = tl.load(tile_pos_ptr + t1, mask=t1 >= 0, other=-1)
                t2 = tl.load(tile_pos_ptr + t2, mask=t2 >= 0, other=-1)
            g0 = _load_tap(grad_ptr, t0, ly, _local(px, left, right, 0, 2, PS), c, c_ok, PS, C).to(ACC)
            g1 = _load_tap(grad_ptr, t1, ly, _local(px, left, right, 1, 2, PS), c, c_ok, PS, C).to(ACC)
            g2 = _load_tap(grad_ptr, t2, ly, _local(px, left, right, 2, 2, PS), c, c_ok, PS, C).to(ACC)
            # columns first: window column 0 = g0 + g1, column 1 = 2 g1, column 2 = g1 + g2
            w0 = (g0 + g1) * (1.0 / 16.0)
            w1 = g1 * (2.0 / 16.0)
            w2 = (g1 + g2) * (1.0 / 16.0)
            # a window's sum starts at its first row's term (not at +0: the sign of a zero
            # gradient is lost at the accumulators below anyway)
            if i == 0:
                r0c0 = w0
                r0c1 = w1
                r0c2 = w2
            elif i == 1:
                r0c0 += w0
                r0c1 += w1
                r0c2 += w2
                r1c0 = 2.0 * w0
                r1c1 = 2.0 * w1
                r1c2 = 2.0 * w2
                r2c0 = w0
                r2c1 = w1
                r2c2 = w2
            else:
                r2c0 += w0
                r2c1 += w1
                r2c2 += w2
        # windows of the max map outside the image (image border) have no gradient: the
        # window's mask, broadcast over channels, joins its win conditions below
        ex_top = ~(up & (gy == 0)[:, None])[:, :, None]
        ex_bottom = ~(down & (gy == GH - 1)[:, None])[:, :, None]
        ex_left = ~(left & (gx == 0)[:, None])[:, :, None]
        ex_right = ~(right & (gx == GW - 1)[:, None])[:, :, None]
        in00 = ex_top & ex_left
        in02 = ex_top & ex_right
        in20 = ex_bottom & ex_left
        in22 = ex_bottom & ex_right
        in11 = ex_top | True   # the centre window always lies in the image
        # the 4 x 4 activations, row-major v<row><column>
        v00 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 0, 0, SIDE, C)
        v01 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 0, 1, SIDE, C)
        v02 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 0, 2, SIDE, C)
        v03 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 0, 3, SIDE, C)
        v10 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 1, 0, SIDE, C)
        v11 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 1, 1, SIDE, C)
        v12 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 1, 2, SIDE, C)
        v13 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 1, 3, SIDE, C)
        v20 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 2, 0, SIDE, C)
        v21 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 2, 1, SIDE, C)
        v22 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 2, 2, SIDE, C)
        v23 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 2, 3, SIDE, C)
        v30 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 3, 0, SIDE, C)
        v31 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 3, 1, SIDE, C)
        v32 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 3, 2, SIDE, C)
        v33 = _act_tap(act_ptr, own, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr, py, px, up, down, left, right,
                       c, c_ok, 3, 3, SIDE, C)
        # A pixel x wins window W when it beats every earlier member and no later member beats
        # it (torch's max_pool2d: the first maximum in row-major order, or the last NaN when the
        # window holds one). With f(q) = minimum(q, inf), q's NaN read as +inf:
        #   x beats every earlier q  <=>  not x <= max f(earlier)   (NaN x beats all)
        #   no later q beats x       <=>  maxNaN(later) <= f(x)     (a later NaN beats x)
        # the maxima in the storage dtype (exact), NaN-propagating for the later members
        f00 = _min_inf(v00)
        f01 = _min_inf(v01)
        f02 = _min_inf(v02)
        f03 = _min_inf(v03)
        f10 = _min_inf(v10)
        f11 = _min_inf(v11)
        f12 = _min_inf(v12)
        f13 = _min_inf(v13)
        f20 = _min_inf(v20)
        f21 = _min_inf(v21)
        f22 = _min_inf(v22)
        e0102 = _max(f01, f02, False)
        e1112 = _max(f11, f12, False)
        l2122 = _max(v21, v22, True)
        l3132 = _max(v31, v32, True)
        # each block pixel's accumulator takes its windows' gradients in row-major window order
        # from +0, gm where it won and +0 elsewhere (an accumulator that starts at +0 never
        # becomes -0, so adding +0 leaves it as it is)
        zero = tl.zeros([own.shape[0], py.shape[1], BLOCK_C], dtype=ACC)
        # block pixel (0, 0) = v11: last member of window (0, 0), third of (0, 1), second of
        # (1, 0), first of (1, 1); the others likewise
        acc00 = _first_win(zero, v11, _max(_max(f00, f01, False), f10, False), r0c0, in00)
        acc00 = _mid_win(acc00, v11, f11, e0102, v12, r0c1, ex_top)
        acc00 = _mid_win(acc00, v11, f11, f10, _max(v20, v21, True), r1c0, ex_left)
        acc00 = _last_win(acc00, f11, _max(v12, l2122, True), r1c1, in11)
        acc01 = _first_win(zero, v12, _max(e0102, f11, False), r0c1, ex_top)
        acc01 = _mid_win(acc01, v12, f12, _max(f02, f03, False), v13, r0c2, in02)
        acc01 = _mid_win(acc01, v12, f12, f11, l2122, r1c1, in11)
        acc01 = _last_win(acc01, f12, _max(_max(v13, v22, True), v23, True), r1c2, ex_right)
        acc10 = _first_win(zero, v21, _max(_max(f10, f11, False), f20, False), r1c0, ex_left)
        acc10 = _mid_win(acc10, v21, f21, e1112, v22, r1c1, in11)
        acc10 = _mid_win(acc10, v21, f21, f20, _max(v30, v31, True), r2c0, in20)
        acc10 = _last_win(acc10, f21, _max(v22, l3132, True), r2c1, ex_bottom)
        acc11 = _first_win(zero, v22, _max(e1112, f21, False), r1c1, in11)
        acc11 = _mid_win(acc11, v22, f22, _max(f12, f13, False), v23, r1c2, ex_right)
        acc11 = _mid_win(acc11, v22, f22, f21, l3132, r2c1, ex_bottom)
        acc11 = _last_win(acc11, f22, _max(_max(v23, v32, True), v33, True), r2c2, in22)
        if RELU_MASK:
            # torch's ReLU' passes the gradient wherever act <= 0 is false: also at NaN
            acc00 = tl.where(~_le(v11, 0.0), acc00, 0.0)
            acc01 = tl.where(~_le(v12, 0.0), acc01, 0.0)
            acc10 = tl.where(~_le(v21, 0.0), acc10, 0.0)
            acc11 = tl.where(~_le(v22, 0.0), acc11, 0.0)
        ok = (own >= 0)[:, None, None] & c_ok[None, None, :]
        base = own.to(tl.int64)[:, None] * (SIDE * SIDE * C) + ((2 * py) * SIDE + 2 * px) * C
        ptrs = dact_ptr + base[:, :, None] + c[None, None, :]
        dtype = dact_ptr.dtype.element_ty
        tl.store(ptrs, acc00.to(dtype), mask=ok)
        tl.store(ptrs + C, acc01.to(dtype), mask=ok)
        tl.store(ptrs + SIDE * C, acc10.to(dtype), mask=ok)
        tl.store(ptrs + (SIDE + 1) * C, acc11.to(dtype), mask=ok)

    @triton.jit
    def _epilogue_fill(pos_ptr, mtok_ptr, n, row_ok, c, c_ok, ACC: tl.constexpr, TOKENS: tl.constexpr,
                       BLOCK_D: tl.constexpr, C: tl.constexpr, HAS_POS: tl.constexpr,
                       HAS_MASK_TOKEN: tl.constexpr):
        """[TOKENS, BLOCK_D] (position embedding at n, mask token + position embedding at n)."""
        pe = tl.zeros([TOKENS, BLOCK_D], dtype=ACC)
        if HAS_POS:
            pe += tl.load(pos_ptr + n[:, None] * C + c[None, :], mask=row_ok[:, None] & c_ok[None, :],
                          other=0.0).to(ACC)
        fill = pe
        if HAS_MASK_TOKEN:
            fill += tl.load(mtok_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
        return pe, fill

    @_autotune([triton.Config({"TOKENS": 32})] if _interpreting() else
               [triton.Config({"TOKENS": t}, num_warps=w) for t, w in _EPI_TABLE][:1 if single_config() else None],
               ["C", "DENSE", "ROWS_BUCKET"])
    @triton.jit
    def _pool_tokens_fwd_kernel(act_ptr, out_ptr, x_ptr, stats_ptr, slot_ptr, tile_pos_ptr, w_ptr, b_ptr, pos_ptr,
                                mtok_ptr, num_tiles, num_pos, GH, GW, eps, ROWS_BUCKET,
                                C: tl.constexpr, BLOCK_D: tl.constexpr, DENSE: tl.constexpr, NORM: tl.constexpr,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_POS: tl.constexpr,
                                HAS_MASK_TOKEN: tl.constexpr, ACC: tl.constexpr, RELU: tl.constexpr,
                                FILL_ROWS: tl.constexpr, TOKENS: tl.constexpr):
        """The last MaxBlurPool (side 2 -> 1: one token per tile; of relu(act) with RELU) and the
        token epilogue in one pass: LayerNorm over D, + pos_embed[n]. Program p pools tiles
        [p * TOKENS, (p + 1) * TOKENS) and stores their tokens at row b * N + n (DENSE, (B, N, D)
        out) or at the tile's row (packed (B, K, D)); with DENSE it also writes the masked rows
        (mask_token + pos_embed[n], or 0) among its share of the B * N rows (_fill_programs), so
        no program pools a masked patch and every program runs the same code (a grid split into
        pooling and filling programs would leave most programs idle in one branch). Saves each
        token's pooled value (x, in the compute dtype) and (mean, rstd) for the backward."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_D)
        c_ok = c < C
        pool_programs = tl.cdiv(num_tiles, TOKENS)
        if DENSE:
            # this program's share of the rows: the grid is max(pool programs, num_pos / FILL_ROWS)
            share = tl.cdiv(num_pos, tl.maximum(pool_programs, tl.cdiv(num_pos, FILL_ROWS)))
            first = pid * share
            for r0 in range(first, first + share, TOKENS):
                row = r0 + tl.arange(0, TOKENS)
                row_ok = (row < num_pos) & (row < first + share)
                tile = tl.load(slot_ptr + row, mask=row_ok, other=0)
                masked = row_ok & ((tile < 0) | (tile >= num_tiles))
                pe, fill = _epilogue_fill(pos_ptr, mtok_ptr, row % (GH * GW), masked, c, c_ok, ACC, TOKENS, BLOCK_D,
                                          C, HAS_POS and HAS_MASK_TOKEN, HAS_MASK_TOKEN)
                tl.store(out_ptr + row.to(tl.int64)[:, None] * C + c[None, :], fill.to(out_ptr.dtype.element_ty),
                         mask=masked[:, None] & c_ok[None, :])
        if pid < pool_programs:
            t = pid * TOKENS + tl.arange(0, TOKENS)
            t_ok = t < num_tiles
            pos = tl.load(tile_pos_ptr + t, mask=t_ok, other=0)
            pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1)
            own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr = _geometry(
                pos, tl.where(t_ok, t, -1), t_ok, slot_ptr, num_tiles, num_pos, GH, GW)
            py, px, up, down, left, right = _pixels(0, 1, 1)
            acc = _blurred_max(act_ptr, own, gy, gx, n_ul, n_u, n_ur, n_l, n_r, n_dl, n_d, n_dr,
                               py, px, up, down, left, right, c, c_ok, GH, GW, 2, C, ACC, RELU)
            # rounded as the pool's own output would be: the epilogue sees what the unfused path sees
            x = tl.reshape(acc, [TOKENS, BLOCK_D]).to(x_ptr.dtype.element_ty)
            ok = t_ok[:, None] & c_ok[None, :]
            t64 = t.to(tl.int64)
            y = x.to(ACC)
            if NORM:
                tl.store(x_ptr + t64[:, None] * C + c[None, :], x, mask=ok)
                mean = tl.sum(y, axis=1) / C
                yc = tl.where(c_ok[None, :], y - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / C + eps)
                tl.store(stats_ptr + t64 * 2, mean, mask=t_ok)
                tl.store(stats_ptr + t64 * 2 + 1, rstd, mask=t_ok)
                y = yc * rstd[:, None]
                if HAS_W:
                    y = y * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
                if HAS_B:
                    y = y + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
            pe, fill = _epilogue_fill(pos_ptr, mtok_ptr, pos % (GH * GW), t_ok, c, c_ok, ACC, TOKENS, BLOCK_D, C,
                                      HAS_POS, False)
            y = y + pe
            out_row = pos if DENSE else t64
            tl.store(out_ptr + out_row[:, None] * C + c[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

    # through the package's autotuner, so a plan can record its launch (scott_kernels._replay): one
    # config per channel count, eight warps past 256 channels
    # (one under the interpreter, where warps mean nothing: Triton 3.5's disk cache of a choice
    # among several cannot name an interpreted kernel)
    @_autotune([triton.Config({}, num_warps=4)] if _interpreting() else
               [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)], ["C"], _prune_warps)
    @triton.jit
    def _pool_tokens_bwd_kernel(grad_ptr, x_ptr, stats_ptr, dx_ptr, part_ptr, slot_ptr, w_ptr, num_tiles,
                                batch, N, rows_per_split,
                                C: tl.constexpr, BLOCK_D: tl.constexpr, DENSE: tl.constexpr, NORM: tl.constexpr,
                                HAS_W: tl.constexpr, HAS_POS: tl.constexpr, HAS_MASK_TOKEN: tl.constexpr,
                                ACC: tl.constexpr, ROWS: tl.constexpr):
        """The epilogue's backward for position n = program_id(0) over the images of split
        program_id(1): the pooled tokens' gradient dx (M, D) through the LayerNorm, and this
        program's partial sums (dw, db, dpos, dmask) at part[:, split, n]; no atomics."""
        n = tl.program_id(0)
        split = tl.program_id(1)
        c = tl.arange(0, BLOCK_D)
        c_ok = c < C
        dw = tl.zeros([BLOCK_D], dtype=ACC)
        db = tl.zeros([BLOCK_D], dtype=ACC)
        dpos = tl.zeros([BLOCK_D], dtype=ACC)
        dmask = tl.zeros([BLOCK_D], dtype=ACC)
        if HAS_W:
            w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
        else:
            w = tl.where(c_ok, 1.0, 0.0).to(ACC)
        start = split * rows_per_split
        for b0 in range(start, start + rows_per_split, ROWS):
            b = b0 + tl.arange(0, ROWS)
            b_ok = (b < batch) & (b < start + rows_per_split)
            at = b * N + n
            tile = tl.load(slot_ptr + at, mask=b_ok, other=-1)
            vis = b_ok & (tile >= 0) & (tile < num_tiles)
            tile64 = tl.where(vis, tile, 0).to(tl.int64)
            if DENSE:
                g_row = at.to(tl.int64)
                g_ok = b_ok
            else:
                g_row = tile64
                g_ok = vis
            g = tl.load(grad_ptr + g_row[:, None] * C + c[None, :], mask=g_ok[:, None] & c_ok[None, :],
                        other=0.0).to(ACC)
            gv = tl.where(vis[:, None], g, 0.0)
            if HAS_POS:
                if HAS_MASK_TOKEN:
                    dpos += tl.sum(g, axis=0)
                else:
                    dpos += tl.sum(gv, axis=0)
            if HAS_MASK_TOKEN:
                dmask += tl.sum(g - gv, axis=0)
            vis_d = vis[:, None] & c_ok[None, :]
            if NORM:
                x = tl.load(x_ptr + tile64[:, None] * C + c[None, :], mask=vis_d, other=0.0).to(ACC)
                mean = tl.load(stats_ptr + tile64 * 2, mask=vis, other=0.0)
                rstd = tl.load(stats_ptr + tile64 * 2 + 1, mask=vis, other=0.0)
                xhat = tl.where(vis_d, (x - mean[:, None]) * rstd[:, None], 0.0)
                dw += tl.sum(gv * xhat, axis=0)
                db += tl.sum(gv, axis=0)
                gw = gv * w[None, :]
                c1 = tl.sum(gw * xhat, axis=1) / C
                c2 = tl.sum(gw, axis=1) / C
                dx = (gw - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            else:
                dx = gv
            tl.store(dx_ptr + tile64[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=vis_d)
        slots = tl.num_programs(1) * N
        at_part = (split * N + n) * C + c
        tl.store(part_ptr + at_part, dw, mask=c_ok)
        tl.store(part_ptr + slots * C + at_part, db, mask=c_ok)
        tl.store(part_ptr + 2 * slots * C + at_part, dpos, mask=c_ok)
        tl.store(part_ptr + 3 * slots * C + at_part, dmask, mask=c_ok)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------
def _check(name: str, act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, side: int | None = None) -> None:
    if act.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {act.dtype}")
    check_interpretable(name, act.dtype)
    check_tables(name, act, slot, tile_pos)
    if not triton_supports(act.device):
        raise RuntimeError(f"{name}: Triton does not run on {act.device} here "
                           "(a CUDA GPU of compute capability 8.0 or newer, or the CPU with TRITON_INTERPRET=1)")
    s = act.shape[1] if act.dim() == 4 else 0
    if act.dim() != 4 or act.shape[2] != s or s < 2 or s & (s - 1) or (side is not None and s != side):
        want = f"side {side}" if side is not None else "s a power of two"
        raise ValueError(f"{name}: expected a compact (M, s, s, C) tensor with {want}, got {tuple(act.shape)}")
    if act.shape[0] != tile_pos.shape[0]:
        raise ValueError(f"{name}: {act.shape[0]} tiles in the activations but {tile_pos.shape[0]} in tile_pos")


def _pool_grid(num_tiles: int, side: int, channels: int):
    pixels_per_tile = (side // 2) ** 2

    def grid(meta):
        rows = meta["ROWS"]
        if pixels_per_tile <= rows:
            programs = cdiv(num_tiles, rows // pixels_per_tile)
        else:
            programs = num_tiles * (pixels_per_tile // rows)
        return programs, cdiv(channels, meta["BLOCK_C"])
    return grid


# --------------------------------------------------------------------------------------------
# MaxBlurPool ops
# --------------------------------------------------------------------------------------------
def _max_blur_pool(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """The body of ``max_blur_pool``, for callers already inside an op."""
    _check("triton_max_blur_pool", act, slot, tile_pos)
    act = act.contiguous()
    num_tiles, side, _, channels = act.shape
    out = torch.empty((num_tiles, side // 2, side // 2, channels), dtype=act.dtype, device=act.device)
    if num_tiles == 0 or channels == 0:
        return out
    _max_blur_pool_fwd_kernel[_pool_grid(num_tiles, side, channels)](
        act, out, slot.contiguous(), tile_pos.contiguous(), num_tiles, slot.numel(), slot.shape[1], slot.shape[2],
        rows_bucket(num_tiles), C=channels, SIDE=side, ACC=accumulator(act.dtype), RELU=relu)
    return out


@custom_op("scott_kernels::triton_max_blur_pool", mutates_args=())
def max_blur_pool(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """MaxBlurPool of compact (M, s, s, C) activations (s a power of two) -> (M, s/2, s/2, C); with
    ``relu`` of relu(act), whose gradient (max_blur_pool_backward with ``relu_mask``) then carries
    the ReLU's mask: the conv before it needs no ReLU of its own, nor a mask pass in the backward."""
    return _max_blur_pool(act, slot, tile_pos, relu)


@max_blur_pool.register_fake
def _(act, slot, tile_pos, relu=False):
    return act.new_empty((act.shape[0], act.shape[1] // 2, act.shape[2] // 2, act.shape[3]))


def _max_blur_pool_backward(grad: torch.Tensor, act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                            relu_mask: bool = False, grad_at_positions: bool = False) -> torch.Tensor:
    """The body of ``max_blur_pool_backward``, for callers already inside an op."""
    _check("triton_max_blur_pool_backward", act, slot, tile_pos)
    act = act.contiguous()
    num_tiles, side, _, channels = act.shape
    want = (slot.shape[0], slot.shape[1] * slot.shape[2], channels) if grad_at_positions else \
        (num_tiles, side // 2, side // 2, channels)
    if grad_at_positions and side != 2:
        raise ValueError(f"triton_max_blur_pool_backward: grad_at_positions needs 2 x 2 tiles, got side {side}")
    if tuple(grad.shape) != want:
        raise ValueError(f"triton_max_blur_pool_backward: grad must be {want}, got {tuple(grad.shape)}")
    dact = torch.empty_like(act)
    if num_tiles == 0 or channels == 0:
        return dact
    _max_blur_pool_bwd_kernel[_pool_grid(num_tiles, side, channels)](
        grad.to(act.dtype).contiguous(), act, dact, slot.contiguous(), tile_pos.contiguous(), num_tiles, slot.numel(),
        slot.shape[1], slot.shape[2], rows_bucket(num_tiles), C=channels, SIDE=side, ACC=accumulator(act.dtype),
        RELU_MASK=relu_mask, GRAD_AT_POS=grad_at_positions)
    return dact


@custom_op("scott_kernels::triton_max_blur_pool_backward", mutates_args=())
def max_blur_pool_backward(grad: torch.Tensor, act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                           relu_mask: bool = False, grad_at_positions: bool = False) -> torch.Tensor:
    """Gradient of max_blur_pool with respect to its (M, s, s, C) input. With ``relu_mask`` the
    gradient comes multiplied by (act > 0): for act = relu(y), the gradient with respect to y.
    With ``grad_at_positions`` (s = 2 only), ``grad`` is the (B, GH * GW, C) gradient of tokens at
    every grid position (the masked rows are not read)."""
    return _max_blur_pool_backward(grad, act, slot, tile_pos, relu_mask, grad_at_positions)


@max_blur_pool_backward.register_fake
def _(grad, act, slot, tile_pos, relu_mask=False, grad_at_positions=False):
    return torch.empty_like(act, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# The last pool fused with the token epilogue
# --------------------------------------------------------------------------------------------
# the most (B, N, D) rows one program of the fused last pool scans for masked ones: with few
# visible patches the grid grows past the pooling programs so that the fill stays parallel
FILL_ROWS = 64


def _fill_programs(num_tiles: int, rows: int, tokens: int) -> int:
    """Programs of the dense fused last pool: one per ``tokens`` tiles to pool, at least one per
    FILL_ROWS rows to fill; each scans cdiv(rows, programs) rows (the kernel's ``share``)."""
    return max(cdiv(num_tiles, tokens), cdiv(rows, FILL_ROWS))


def _vector(name: str, t: torch.Tensor | None, dim: int, device) -> torch.Tensor | None:
    if t is not None and (t.dim() != 1 or t.shape[0] != dim or t.device != device or not t.is_floating_point()):
        raise ValueError(f"triton_pool_tokens: {name} must be a floating ({dim},) tensor on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return None if t is None else t.contiguous()


def _pool_tokens(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, ln_weight: torch.Tensor | None,
                 ln_bias: torch.Tensor | None, pos_embed: torch.Tensor | None, mask_token: torch.Tensor | None,
                 eps: float, norm: bool, dense: bool, out_dtype: torch.dtype, relu: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``pool_tokens``, for callers already inside an op."""
    _check("triton_pool_tokens", act, slot, tile_pos, side=2)
    act = act.contiguous()
    num_tiles, _, _, dim = act.shape
    B, GH, GW = slot.shape
    N = GH * GW
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("mask_token", mask_token)):
        _vector(name, t, dim, act.device)
    if pos_embed is not None and (tuple(pos_embed.shape) != (N, dim) or pos_embed.device != act.device):
        raise ValueError(f"triton_pool_tokens: pos_embed must be (N, D) = ({N}, {dim}) on {act.device}, "
                         f"got {tuple(pos_embed.shape)} on {pos_embed.device}")
    if not dense and num_tiles % B:
        raise ValueError(f"triton_pool_tokens: packed tokens need the same count per image; {num_tiles} tiles, B={B}")
    rows = B * N if dense else num_tiles
    tokens = torch.empty((B, rows // B, dim), dtype=out_dtype, device=act.device)
    saved = num_tiles if norm else 0
    x = torch.empty((saved, dim), dtype=act.dtype, device=act.device)
    stats = torch.empty((saved, 2), dtype=accumulator_dtype(act.dtype), device=act.device)
    if rows == 0 or dim == 0:
        return tokens, x, stats
    if dense and num_tiles > B * N:
        raise ValueError(f"triton_pool_tokens: {num_tiles} tiles for {B * N} positions")
    any_ = act   # any tensor stands for an absent optional pointer (never read)
    grid = lambda meta: ((_fill_programs(num_tiles, rows, meta["TOKENS"]) if dense
                          else cdiv(num_tiles, meta["TOKENS"])),)
    _pool_tokens_fwd_kernel[grid](
        act, tokens, x if norm else any_, stats if norm else any_, slot.contiguous(), tile_pos.contiguous(),
        any_ if ln_weight is None else ln_weight.contiguous(), any_ if ln_bias is None else ln_bias.contiguous(),
        any_ if pos_embed is None else pos_embed.contiguous(), any_ if mask_token is None else mask_token.contiguous(),
        num_tiles, slot.numel(), GH, GW, float(eps), rows_bucket(rows),
        C=dim, BLOCK_D=pow2(dim), DENSE=dense, NORM=norm, HAS_W=norm and ln_weight is not None,
        HAS_B=norm and ln_bias is not None, HAS_POS=pos_embed is not None,
        HAS_MASK_TOKEN=dense and mask_token is not None, ACC=accumulator(act.dtype), RELU=relu, FILL_ROWS=FILL_ROWS)
    return tokens, x, stats


@custom_op("scott_kernels::triton_pool_tokens", mutates_args=())
def pool_tokens(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, ln_weight: torch.Tensor | None,
                ln_bias: torch.Tensor | None, pos_embed: torch.Tensor | None, mask_token: torch.Tensor | None,
                eps: float, norm: bool, dense: bool, out_dtype: torch.dtype, relu: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last MaxBlurPool (compact (M, 2, 2, D) -> one token per tile; of relu(act) with
    ``relu``, as max_blur_pool) with the token epilogue:
    with ``norm`` a LayerNorm over D (``ln_weight``/``ln_bias`` optional, ``eps``), then
    ``pos_embed`` (N, D) at each token's position; tokens in ``out_dtype``, as (B, N, D) with
    masked positions = ``mask_token`` + pos_embed (or 0) when ``dense``, else packed (B, M/B, D).

    Returns (tokens, x, stats): with ``norm``, x (M, D) the pooled tokens before the epilogue and
    stats (M, 2) their (mean, 1/std), both kept for the backward (without it both are empty: the
    backward reads neither).
    """
    return _pool_tokens(act, slot, tile_pos, ln_weight, ln_bias, pos_embed, mask_token, eps, norm, dense, out_dtype, relu)


@pool_tokens.register_fake
def _(act, slot, tile_pos, ln_weight, ln_bias, pos_embed, mask_token, eps, norm, dense, out_dtype, relu=False):
    num_tiles, dim = act.shape[0], act.shape[3]
    B, GH, GW = slot.shape
    rows = B * GH * GW if dense else num_tiles
    saved = num_tiles if norm else 0
    return (act.new_empty((B, rows // B, dim), dtype=out_dtype), act.new_empty((saved, dim)),
            act.new_empty((saved, 2), dtype=accumulator_dtype(act.dtype)))


def _splits(batch: int, positions: int, device: torch.device) -> int:
    """Images per position are split so that the backward's grid holds about two programs per SM."""
    if device.type != "cuda":
        return 1
    from .compact import _multiprocessors

    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(batch, -(-2 * sms // max(positions, 1))))


def _pool_tokens_backward(grad: torch.Tensor, act: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                          slot: torch.Tensor, tile_pos: torch.Tensor, ln_weight: torch.Tensor | None, norm: bool,
                          dense: bool, has_pos: bool, has_mask_token: bool, relu_mask: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``pool_tokens_backward``, for callers already inside an op."""
    _check("triton_pool_tokens_backward", act, slot, tile_pos, side=2)
    num_tiles, _, _, dim = act.shape
    B, GH, GW = slot.shape
    N = GH * GW
    acc = accumulator_dtype(act.dtype)
    rows = B * N if dense else num_tiles
    if tuple(grad.shape) != (B, rows // B, dim):
        raise ValueError(f"triton_pool_tokens_backward: grad must be {(B, rows // B, dim)}, got {tuple(grad.shape)}")
    dx = torch.zeros((num_tiles, 1, 1, dim), dtype=act.dtype, device=act.device)
    splits = _splits(B, N, act.device)
    part = torch.zeros((4, splits, N, dim), dtype=acc, device=act.device)
    if rows and dim:
        _pool_tokens_bwd_kernel[(N, splits)](
            grad.contiguous(), x.contiguous() if norm else act, stats.contiguous() if norm else act, dx, part,
            slot.contiguous(),
            act if ln_weight is None else ln_weight.contiguous(), num_tiles, B, N, -(-B // splits),
            C=dim, BLOCK_D=pow2(dim), DENSE=dense, NORM=norm,
            HAS_W=norm and ln_weight is not None, HAS_POS=has_pos, HAS_MASK_TOKEN=dense and has_mask_token,
            ACC=accumulator(act.dtype), ROWS=32 if _interpreting() else 8)
    dact = _max_blur_pool_backward(dx, act, slot, tile_pos, relu_mask)
    return dact, part[0].sum((0, 1)), part[1].sum((0, 1)), part[2].sum(0), part[3].sum((0, 1))


@custom_op("scott_kernels::triton_pool_tokens_backward", mutates_args=())
def pool_tokens_backward(grad: torch.Tensor, act: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                         slot: torch.Tensor, tile_pos: torch.Tensor, ln_weight: torch.Tensor | None, norm: bool,
                         dense: bool, has_pos: bool, has_mask_token: bool, relu_mask: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of pool_tokens: (d act, d ln_weight, d ln_bias, d pos_embed (N, D), d mask_token),
    the last four in the accumulator dtype. With ``relu_mask``, d act comes multiplied by (act > 0)."""
    return _pool_tokens_backward(grad, act, x, stats, slot, tile_pos, ln_weight, norm, dense, has_pos, has_mask_token, relu_mask)


@pool_tokens_backward.register_fake
def _(grad, act, x, stats, slot, tile_pos, ln_weight, norm, dense, has_pos, has_mask_token, relu_mask=False):
    dim = act.shape[3]
    N = slot.shape[1] * slot.shape[2]
    acc = accumulator_dtype(act.dtype)
    return (torch.empty_like(act, memory_format=torch.contiguous_format), act.new_empty((dim,), dtype=acc),
            act.new_empty((dim,), dtype=acc), act.new_empty((N, dim), dtype=acc), act.new_empty((dim,), dtype=acc))


def _tokens_setup(ctx, inputs, output):
    act, slot, tile_pos, ln_weight, ln_bias, pos_embed, mask_token, eps, norm, dense, out_dtype, relu = inputs
    _, x, stats = output
    ctx.mark_non_differentiable(x, stats)
    ctx.set_materialize_grads(False)   # x and stats get no gradient: no zero tensors for them
    ctx.save_for_backward(act, x, stats, slot, tile_pos, ln_weight)
    ctx.flags = (norm, dense, pos_embed is not None, mask_token is not None, relu)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (ln_weight, ln_bias, pos_embed, mask_token))


def _tokens_backward(ctx, grad, grad_x, grad_stats):
    act, x, stats, slot, tile_pos, ln_weight = ctx.saved_tensors
    norm, dense, has_pos, has_mask_token, relu = ctx.flags
    if grad is None:
        return (None,) * 12
    if not (norm or has_pos or has_mask_token):
        # no epilogue: the tokens are the pool's output, (B, N, D) rows at tile_pos or packed
        num_tiles, dim = act.shape[0], act.shape[3]
        if dense:   # the pool's backward reads each tile's row of the (B, N, D) gradient
            dact = max_blur_pool_backward(grad, act, slot, tile_pos, relu, True)
        else:
            dact = max_blur_pool_backward(grad.reshape(num_tiles, 1, 1, dim), act, slot, tile_pos, relu)
        return (dact, *([None] * 11))
    dact, dw, db, dpos, dmask = pool_tokens_backward(grad, act, x, stats, slot, tile_pos, ln_weight, norm, dense,
                                                     has_pos, has_mask_token, relu)
    # parameters the epilogue never uses (no norm: weight/bias; packed: mask_token) get zeros
    wanted = ctx.needs_input_grad[3:7]
    grads = [g.to(dtype) if dtype is not None and need else None
             for g, dtype, need in zip((dw, db, dpos, dmask), ctx.dtypes, wanted)]
    return (dact, None, None, *grads, None, None, None, None, None)


pool_tokens.register_autograd(_tokens_backward, setup_context=_tokens_setup)


def pool_tokens_apply(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, norm=None,
                      pos_embed: torch.Tensor | None = None, mask_token: torch.Tensor | None = None,
                      dense: bool = True, out_dtype: torch.dtype | None = None, relu: bool = False) -> torch.Tensor:
    """Tokens of pool_tokens from a ``norm = (weight, bias, eps)`` triple (or None)."""
    ln_weight, ln_bias, eps = norm if norm is not None else (None, None, 0.0)
    tokens, _, _ = pool_tokens(act, slot, tile_pos, ln_weight, ln_bias, pos_embed, mask_token, float(eps),
                               norm is not None, dense, act.dtype if out_dtype is None else out_dtype, relu)
    return tokens
