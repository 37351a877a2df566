"""Triton backend: the SCOTT tokenizer over visible patches with fused Triton kernels.

Activations stay compact and channel-last: one (side, side, C) block per visible patch, i.e. a
(M, side, side, C) tensor for M visible patches (tile order = row-major over batch and patch
grid). Two tables describe the visible set and are shared by every stage:
  slot      (B, GH, GW) int32   grid position -> tile index, or -1 where the patch is masked
  tile_pos  (M,)        int64   tile index -> flat grid position (b * GH * GW + gy * GW + gx)
A kernel reading a neighbour's pixel looks its patch up in ``slot``; -1 (or a position outside
the image) reads as zero, which is exactly the mask the dense emulation applies after each op.

Per stage (input patch side q, conv output side s = q / 2, pooled side s / 2):
  conv_relu       implicit GEMM (rows = M*s*s output pixels, cols = C_out, K = k*k*C_in) on
                  tensor cores, ReLU in the epilogue (unless relu=False). A compact source is gathered through a
                  per-tile neighbour table (M, 2r+1, 2r+1) built from ``slot``/``tile_pos``: K runs
                  over (tap, channel block), so a row's neighbour lookup is one small load per
                  step and each step loads contiguous channels. The image stage first packs the
                  images once (masked patches zeroed, uint8 normalised, channels padded to a power
                  of two, zero border) into (B, H + 2p, W', CP), so a kernel row of a window is
                  one contiguous run of elements; ``conv_image`` returns that packed copy too, and
                  its autograd keeps it (not the images) for the weight gradient.
  max_blur_pool   2x2 max (stride 1) + 3x3 binomial blur (stride 2), reading the 1-pixel halo
                  from neighbouring patches (scott_kernels.triton_pool); the last stage's pool
                  also applies the token epilogue (LayerNorm, position embedding, mask-token
                  fill, packed or (B, N, D) layout) in the same pass when one is asked for.
Backward: max_blur_pool_backward gives each conv pixel the gradient of every max window it won
(argmax recomputed, first maximum in row-major order as torch's max_pool2d); conv wgrad is a
split-K GEMM over output pixels into float32 partials, with output tiles of one or two taps'
channels (or kernel rows of the packed image); conv dgrad is an implicit GEMM over input pixels
that gathers the output gradient through the neighbour table, run per parity class of input
pixel (a stride-2 conv reads a pixel only through taps of one parity, so each class loops over
its own taps only). The gradient ops take the forward's output for the ReLU mask, or None for a
gradient already masked. The tokenizer runs each stage as conv (``relu=False``) -> pool of
relu(conv) (``max_blur_pool(..., relu=True)``; the last one fused with the token epilogue): the
same function, but the pool's backward multiplies by ReLU' as it writes the conv gradient, so the
conv gradients take it as masked and never read the conv output.
Geometry (channels, sides, kernel size) is compile-time; offsets are 32-bit unless a tensor
reaches 2^30 elements.

Every kernel sits behind a ``torch.library.custom_op`` with a fake implementation and autograd,
so the backend traces under torch.compile. With ``num_visible`` (visible patches per row) given,
the tables are built without a host synchronisation.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from . import compact
from .triton_configs import (accumulator, gemm_shared_bytes, interpreting, prune_hook, rows_bucket, shared_fits,
                             single_config, triton_supports)
from .compact import (accumulator_dtype, check_tables, gemm_weight, gemm_weight_transposed,
                      register_stage_autograd, tokenize_compact, visible_tables, weight_from_partials)
from .triton_pool import max_blur_pool, max_blur_pool_backward, pool_tokens_apply

__all__ = ["triton_tokenize", "triton_supports", "visible_tables"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_interpreting = interpreting


# --------------------------------------------------------------------------------------------
# Tile-size autotuning: keyed on channel counts, patch side, kernel size and the row count's
# power of two; results are kept per process and in Triton's on-disk cache (cache_results).
# --------------------------------------------------------------------------------------------
def _cfg(kwargs: dict, warps: int, stages: int):
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def _keep(configs: list) -> list:
    return configs[:1] if single_config() else configs


# The conv GEMM tile lists hold only configs that the sm_90 machine code shows can win at the
# SCOTT shapes (wgmma tiles of at least 64 rows, 16-byte gathers, no spills), so a first call
# compiles a handful of variants. The interpreter gets one small tile.
def _fwd_configs() -> list:
    """Compact-source forward: output tile BLOCK_M x BLOCK_N; the K step is one tap's channels."""
    if _interpreting():
        return [_cfg({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1)]
    return _keep([_cfg({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3), _cfg({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 4)])


def _image_fwd_configs() -> list:
    """Image forward: output tile BLOCK_M x BLOCK_N; the K step is one kernel row of the packed image."""
    if _interpreting():
        return [_cfg({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1)]
    return _keep([_cfg({"BLOCK_M": 256, "BLOCK_N": 64}, 8, 3), _cfg({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3)])


def _wgrad_configs() -> list:
    """Compact-source weight gradient: output tile (one tap's channel block) x BLOCK_N, BLOCK_R
    output pixels per step."""
    if _interpreting():
        return [_cfg({"BLOCK_N": 32, "BLOCK_R": 64}, 4, 1)]
    return _keep([_cfg({"BLOCK_N": 128, "BLOCK_R": 64}, 4, 3), _cfg({"BLOCK_N": 128, "BLOCK_R": 128}, 8, 3)])


def _image_wgrad_configs() -> list:
    """Image weight gradient: output tile (BLOCK_KY kernel rows of the packed image) x BLOCK_N.
    The host sizes its splits for this tile (one wave of CTAs): a taller tile would leave SMs idle."""
    if _interpreting():
        return [_cfg({"BLOCK_KY": 2, "BLOCK_N": 32, "BLOCK_R": 64}, 4, 1)]
    return _keep([_cfg({"BLOCK_KY": 2, "BLOCK_N": 64, "BLOCK_R": 128}, 4, 3)])


def _dgrad_configs() -> list:
    """Input gradient: output tile BLOCK_M input pixels x BLOCK_N input channels; the K step is
    one tap's block of BLOCK_K output channels."""
    if _interpreting():
        return [_cfg({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 1)]
    return _keep([_cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
                  _cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
                  _cfg({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 64}, 4, 3)])   # image gradients (C_in 3)


def _prune_wide(configs, columns: int, block: str = "BLOCK_N"):
    """Drops tiles more than twice as wide as the channel count (pure waste); keeps at least one."""
    limit = max(16, 2 * (1 << max(int(columns) - 1, 0).bit_length()))
    kept = [c for c in configs if c.kwargs[block] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs[block])]


def _prune_by_c_out(configs, named_args, **kwargs):
    return _prune_wide(configs, {**named_args, **kwargs}["C_OUT"])


def _prune_by_c_in(configs, named_args, **kwargs):
    """Input-gradient tiles: no wider than twice C_in, and no narrower than it up to 64."""
    c_in = {**named_args, **kwargs}["C_IN"]
    kept = [c for c in _prune_wide(configs, c_in) if c.kwargs["BLOCK_N"] >= min(64, _pow2(c_in))]
    return kept or _prune_wide(configs, c_in)


def _prune_image_wgrad(configs, named_args, **kwargs):
    """Weight-gradient tiles no taller than the padded kernel (KYP kernel rows), no wider than
    twice C_out."""
    args = {**named_args, **kwargs}
    kept = [c for c in _prune_wide(configs, args["C_OUT"]) if c.kwargs["BLOCK_KY"] <= args["KYP"]]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_KY"])]


def _autotune(configs, key, prune, shared=gemm_shared_bytes):
    # configs whose operand tiles would not fit the device's shared memory are dropped before compiling
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": prune_hook(prune, shared_fits(shared))},
                           cache_results=True)


_CONV_KEY = ["C_IN", "C_OUT", "IN_SIDE", "KSIZE", "ROWS_BUCKET"]
_IMAGE_KEY = ["C_OUT", "OUT_SIDE", "KSIZE", "KYP", "CP", "KROW", "ROWS_BUCKET"]

# Shared memory of each GEMM's pipelined operand tiles (m x k and k x n per stage), to prune
# configs that cannot fit before they are compiled. The weight gradients reduce over their
# BLOCK_R output pixels; their output tile is TAPS taps' channel block (or BLOCK_KY kernel rows
# of the packed image).
_FWD_SHARED = functools.partial(gemm_shared_bytes, k="BLOCK_K")
_IMAGE_FWD_SHARED = functools.partial(gemm_shared_bytes, k="KROW")
_WGRAD_SHARED = functools.partial(gemm_shared_bytes, m=("TAPS", "BLOCK_K"), k="BLOCK_R")
_IMAGE_WGRAD_SHARED = functools.partial(gemm_shared_bytes, m=("BLOCK_KY", "KROW"), k="BLOCK_R")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tile_coords(rows, row_ok, tile_pos_ptr, num_pos, GH, GW, SIDE: tl.constexpr):
        """Row r of a (M, SIDE, SIDE, C) compact tensor -> (batch, global y, global x).

        A tile position outside the grid (a corrupt table) is clamped into it, so no table can
        make a kernel address memory outside its tensors."""
        tile = tl.where(row_ok, rows // (SIDE * SIDE), 0)
        rem = rows % (SIDE * SIDE)
        pos = tl.load(tile_pos_ptr + tile, mask=row_ok, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1)
        cells = GH * GW
        b = pos // cells
        gy = (pos % cells) // GW
        gx = pos % GW
        return b, gy * SIDE + rem // SIDE, gx * SIDE + rem % SIDE

    @triton.jit
    def _compact_offsets(slot_ptr, b, y, x, c, ok, GH, GW, num_tiles, C, SIDE: tl.constexpr):
        """Offsets into a compact (M, SIDE, SIDE, C) tensor of global pixel (y, x), channel c.

        ``valid`` is False outside the image, in a masked patch, or where ``ok`` is False.
        """
        inside = ok & (y >= 0) & (y < GH * SIDE) & (x >= 0) & (x < GW * SIDE)
        yc = tl.where(inside, y, 0)
        xc = tl.where(inside, x, 0)
        py = yc // SIDE
        px = xc // SIDE
        slot = tl.load(slot_ptr + (b * GH + py) * GW + px, mask=inside, other=-1).to(tl.int64)
        valid = inside & (slot >= 0) & (slot < num_tiles)
        slot = tl.where(valid, slot, 0)
        offs = ((slot * SIDE + (yc - py * SIDE)) * SIDE + (xc - px * SIDE)) * C + c
        return offs, valid

    # ---- conv GEMMs --------------------------------------------------------------------------
    # Offsets are 32-bit (the host checks every tensor's size) unless WIDE, where the tile index is
    # widened before the final multiply. Geometry (sides, channels, kernel size) is compile-time,
    # so every divide below is a multiply-shift, and the K loops have compile-time trip counts.
    @triton.jit
    def _row_block(pid, rows_total, BLOCK: tl.constexpr, WIDE: tl.constexpr):
        """Rows pid * BLOCK + [0, BLOCK): clamped into range (so loads need no row mask) and a
        mask of the real ones; 64-bit when WIDE (a tensor of 2^31 elements or more)."""
        if WIDE:
            rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            rows = pid * BLOCK + tl.arange(0, BLOCK)
        return tl.minimum(rows, rows_total - 1), rows < rows_total

    @triton.jit
    def _neighbour_offsets(nbr_row, y, x, ch, SIDE: tl.constexpr, C: tl.constexpr, NB: tl.constexpr,
                           CH_MASK: tl.constexpr, WIDE: tl.constexpr):
        """Offsets and mask of a [rows, channels] block of a compact (M, SIDE, SIDE, C) tensor at
        pixel (y, x) of each row's (NB x NB)-tile neighbourhood (y, x >= 0, relative to its
        top-left tile). nbr_row points at each row's (NB, NB) neighbour table; -1 reads as 0."""
        ty = y // SIDE
        tx = x // SIDE
        nb = tl.load(nbr_row + ty * NB + tx)
        if WIDE:
            nb = nb.to(tl.int64)
        offs = nb * (SIDE * SIDE * C) + ((y - ty * SIDE) * SIDE + (x - tx * SIDE)) * C
        mask = (nb >= 0)[:, None]
        if CH_MASK:
            mask = mask & (ch < C)[None, :]
        return offs[:, None] + ch[None, :], mask

    @triton.jit
    def _relu_grad(grad_ptr, out_ptr, offs, mask, GRAD_MASKED: tl.constexpr):
        """grad * relu'(out); with GRAD_MASKED the gradient comes already multiplied."""
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        if not GRAD_MASKED:
            r = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(r > 0, g, tl.zeros_like(g))
        return g

    @_autotune(_fwd_configs(), _CONV_KEY, _prune_by_c_out, shared=_FWD_SHARED)
    @triton.jit
    def _conv_relu_fwd_kernel(src_ptr, w_ptr, out_ptr, nbr_ptr, rows_total, ROWS_BUCKET,
                              C_IN: tl.constexpr, C_OUT: tl.constexpr, IN_SIDE: tl.constexpr,
                              KSIZE: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
                              RELU: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out (M, s, s, C_out) = relu(im2col(src) @ W) (without RELU: no relu) for a compact
        (M, q, q, C_in) source.

        K runs over (tap, channel block): a row's neighbour lookup is one load from its tile's
        (2R+1)^2 neighbour table per step, and each step gathers BLOCK_K contiguous channels."""
        OUT_SIDE: tl.constexpr = IN_SIDE // 2
        PAD: tl.constexpr = KSIZE // 2
        NB: tl.constexpr = 2 * R + 1
        CB: tl.constexpr = (C_IN + BLOCK_K - 1) // BLOCK_K
        CH_MASK: tl.constexpr = C_IN % BLOCK_K != 0
        rows, row_ok = _row_block(tl.program_id(0), rows_total, BLOCK_M, WIDE)
        tile = rows // (OUT_SIDE * OUT_SIDE)
        rem = rows % (OUT_SIDE * OUT_SIDE)
        # input pixel of tap (0, 0), shifted by R tiles so that it is never negative
        y0 = 2 * (rem // OUT_SIDE) - PAD + R * IN_SIDE
        x0 = 2 * (rem % OUT_SIDE) - PAD + R * IN_SIDE
        nbr_row = nbr_ptr + tile * (NB * NB)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        kc = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for it in range(KSIZE * KSIZE * CB):
            tap = it // CB
            ch = (it % CB) * BLOCK_K + kc
            offs, mask = _neighbour_offsets(nbr_row, y0 + tap // KSIZE, x0 + tap % KSIZE, ch, IN_SIDE, C_IN, NB,
                                            CH_MASK, WIDE)
            a = tl.load(src_ptr + offs, mask=mask, other=0.0)
            w_mask = col_ok[None, :]
            if CH_MASK:
                w_mask = w_mask & (ch < C_IN)[:, None]
            w = tl.load(w_ptr + (tap * C_IN + ch)[:, None] * C_OUT + cols[None, :], mask=w_mask, other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _image_row_offsets(rows, tile_pos_ptr, num_pos, CELLS: tl.constexpr, GW: tl.constexpr,
                           ROW_STRIDE: tl.constexpr, IMG_STRIDE: tl.constexpr,
                           OUT_SIDE: tl.constexpr, CP: tl.constexpr, WIDE: tl.constexpr):
        """Offset in the packed image of each output row's window corner (tap (0, 0)).

        A tile position outside the grid (a corrupt table) is clamped into it."""
        tile = rows // (OUT_SIDE * OUT_SIDE)
        rem = rows % (OUT_SIDE * OUT_SIDE)
        pos = tl.load(tile_pos_ptr + tile)
        pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1).to(tl.int32)
        b = pos // CELLS
        cell = pos % CELLS
        y = (cell // GW) * OUT_SIDE + rem // OUT_SIDE
        x = (cell % GW) * OUT_SIDE + rem % OUT_SIDE
        if WIDE:
            b = b.to(tl.int64)
        return b * IMG_STRIDE + (2 * y) * ROW_STRIDE + (2 * x) * CP

    @_autotune(_image_fwd_configs(), _IMAGE_KEY, _prune_by_c_out, shared=_IMAGE_FWD_SHARED)
    @triton.jit
    def _conv_relu_image_fwd_kernel(packed_ptr, w_ptr, out_ptr, tile_pos_ptr, rows_total, num_pos, ROWS_BUCKET,
                                    CELLS: tl.constexpr, GW: tl.constexpr, ROW_STRIDE: tl.constexpr,
                                    IMG_STRIDE: tl.constexpr, C_OUT: tl.constexpr, OUT_SIDE: tl.constexpr, KSIZE: tl.constexpr,
                                    CP: tl.constexpr, KROW: tl.constexpr, WIDE: tl.constexpr,
                                    RELU: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The image stage's forward from the packed image (see _pack_image_kernel): kernel row ky
        of an output pixel's window is KROW contiguous elements (KROW / CP pixels x CP channels,
        the taps past KSIZE and the channels past C_in have zero weights), so each K step is one
        unmasked, 16-byte-vector load per row."""
        rows, row_ok = _row_block(tl.program_id(0), rows_total, BLOCK_M, WIDE)
        base = _image_row_offsets(rows, tile_pos_ptr, num_pos, CELLS, GW, ROW_STRIDE, IMG_STRIDE, OUT_SIDE, CP, WIDE)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        kc = tl.arange(0, KROW)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for ky in range(KSIZE):
            a = tl.load(packed_ptr + (base + ky * ROW_STRIDE)[:, None] + kc[None, :])
            w = tl.load(w_ptr + (ky * KROW + kc)[:, None] * C_OUT + cols[None, :], mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _pack_image_kernel(x_ptr, packed_ptr, slot_ptr, norm_ptr, num_tiles, GH, GW, H, W, HP, WP,
                           s_b, s_c, s_h, s_w, C: tl.constexpr, CP: tl.constexpr, P: tl.constexpr,
                           PAD: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr):
        """packed (B, HP, WP, CP)[b, y + PAD, x + PAD, c] = image[b, c, y, x] (normalised with
        NORMALIZE) where (y, x) is in the image and its patch visible, else 0: the image stage's
        masking, padding and normalisation, done once."""
        prow = tl.program_id(0)
        b = prow // HP
        y = prow % HP - PAD
        xp = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        x = xp - PAD
        inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
        yc = tl.where(inside, y, 0)
        xc = tl.where(inside, x, 0)
        s = tl.load(slot_ptr + (b * GH + yc // P) * GW + xc // P, mask=inside, other=-1)
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
    def _neighbour_table_kernel(slot_ptr, tile_pos_ptr, nbr_ptr, total, num_tiles, num_pos, GH, GW,
                                R: tl.constexpr, BLOCK: tl.constexpr):
        """nbr (M, 2R+1, 2R+1) int32: the tile at grid offset (dy - R, dx - R) from each tile, or
        -1 (masked, outside the image, or a slot naming no tile)."""
        NB: tl.constexpr = 2 * R + 1
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = e < total
        tile = e // (NB * NB)
        d = e % (NB * NB)
        pos = tl.load(tile_pos_ptr + tile, mask=ok, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1)
        b = pos // (GH * GW)
        gy = (pos % (GH * GW)) // GW + d // NB - R
        gx = pos % GW + d % NB - R
        inside = ok & (gy >= 0) & (gy < GH) & (gx >= 0) & (gx < GW)
        s = tl.load(slot_ptr + (b * GH + gy) * GW + gx, mask=inside, other=-1)
        s = tl.where((s >= 0) & (s < num_tiles), s, -1)
        tl.store(nbr_ptr + e, s.to(tl.int32), mask=ok)

    @_autotune(_wgrad_configs(), _CONV_KEY + ["ROWS_PER_CTA", "TAPS"], _prune_by_c_out, shared=_WGRAD_SHARED)
    @triton.jit
    def _conv_relu_wgrad_kernel(src_ptr, grad_ptr, out_ptr, partial_ptr, nbr_ptr, rows_total, ROWS_BUCKET,
                                C_IN: tl.constexpr, C_OUT: tl.constexpr, IN_SIDE: tl.constexpr,
                                KSIZE: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, TAPS: tl.constexpr,
                                ROWS_PER_CTA: tl.constexpr, GRAD_MASKED: tl.constexpr, WIDE: tl.constexpr,
                                ACC: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """partial[split] (k*k*C_in, C_out) = im2col(rows of this split)^T @ (grad * relu').

        A CTA owns TAPS (1 or 2) taps' block of BLOCK_K channels: each step does one neighbour
        lookup per row and tap, gathers contiguous channels, and loads the gradient once for
        both taps."""
        OUT_SIDE: tl.constexpr = IN_SIDE // 2
        PAD: tl.constexpr = KSIZE // 2
        NB: tl.constexpr = 2 * R + 1
        CB: tl.constexpr = (C_IN + BLOCK_K - 1) // BLOCK_K
        CH_MASK: tl.constexpr = C_IN % BLOCK_K != 0
        tap = (tl.program_id(0) // CB) * TAPS
        ch = (tl.program_id(0) % CB) * BLOCK_K + tl.arange(0, BLOCK_K)
        dy = tap // KSIZE - PAD + R * IN_SIDE
        dx = tap % KSIZE - PAD + R * IN_SIDE
        # the second tap (when there is one: k*k is odd, so the last CTA has only the first)
        tap2 = tap + 1
        has2 = tap2 < KSIZE * KSIZE
        dy2 = tap2 // KSIZE - PAD + R * IN_SIDE
        dx2 = tap2 % KSIZE - PAD + R * IN_SIDE
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        split = tl.program_id(2)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
        for r0 in range(0, ROWS_PER_CTA, BLOCK_R):
            rows, row_ok = _row_block(split * (ROWS_PER_CTA // BLOCK_R) + r0 // BLOCK_R, rows_total, BLOCK_R, WIDE)
            tile = rows // (OUT_SIDE * OUT_SIDE)
            rem = rows % (OUT_SIDE * OUT_SIDE)
            oy2 = 2 * (rem // OUT_SIDE)
            ox2 = 2 * (rem % OUT_SIDE)
            nbr_row = nbr_ptr + tile * (NB * NB)
            g_offs = rows[:, None] * C_OUT + cols[None, :]
            g = _relu_grad(grad_ptr, out_ptr, g_offs, row_ok[:, None] & col_ok[None, :], GRAD_MASKED)
            offs, mask = _neighbour_offsets(nbr_row, oy2 + dy, ox2 + dx, ch, IN_SIDE, C_IN, NB, CH_MASK, WIDE)
            a = tl.load(src_ptr + offs, mask=mask, other=0.0)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION, out_dtype=ACC)
            if TAPS == 2:
                offs, mask = _neighbour_offsets(nbr_row, oy2 + dy2, ox2 + dx2, ch, IN_SIDE, C_IN, NB, CH_MASK, WIDE)
                a2 = tl.load(src_ptr + offs, mask=mask & has2, other=0.0)
                acc2 = tl.dot(tl.trans(a2), g, acc2, input_precision=PRECISION, out_dtype=ACC)
        k_rows = tap * C_IN + ch
        dst = partial_ptr + (split * (KSIZE * KSIZE * C_IN) + k_rows[:, None]) * C_OUT + cols[None, :]
        ok = (ch < C_IN)[:, None] & col_ok[None, :]
        tl.store(dst, acc.to(partial_ptr.dtype.element_ty), mask=ok)
        if TAPS == 2:
            tl.store(dst + C_IN * C_OUT, acc2.to(partial_ptr.dtype.element_ty), mask=ok & has2)

    @_autotune(_image_wgrad_configs(), _IMAGE_KEY, _prune_image_wgrad, shared=_IMAGE_WGRAD_SHARED)
    @triton.jit
    def _conv_relu_image_wgrad_kernel(packed_ptr, grad_ptr, out_ptr, partial_ptr, tile_pos_ptr, rows_total, num_pos,
                                      ROWS_BUCKET, rows_per_cta,
                                      CELLS: tl.constexpr, GW: tl.constexpr, ROW_STRIDE: tl.constexpr,
                                      IMG_STRIDE: tl.constexpr, C_OUT: tl.constexpr, OUT_SIDE: tl.constexpr,
                                      KYP: tl.constexpr, CP: tl.constexpr, KROW: tl.constexpr,
                                      GRAD_MASKED: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr,
                                      PRECISION: tl.constexpr,
                                      BLOCK_KY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """partial[split] (KYP * KROW, C_out): the image stage's weight gradient over the packed
        image's kernel rows (the host keeps the rows of real taps and channels), over rows_per_cta
        output pixels (a multiple of BLOCK_R) per split."""
        BK: tl.constexpr = BLOCK_KY * KROW
        # the gradient's loads are masked by row only where the channel blocks tile C_out
        COL_MASK: tl.constexpr = C_OUT % BLOCK_N != 0
        j = tl.arange(0, BK)
        k_offs = (tl.program_id(0) * BLOCK_KY + j // KROW) * ROW_STRIDE + j % KROW
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        split = tl.program_id(2)
        blocks = rows_per_cta // BLOCK_R
        acc = tl.zeros((BK, BLOCK_N), dtype=ACC)
        for r0 in range(0, blocks):
            rows, row_ok = _row_block(split * blocks + r0, rows_total, BLOCK_R, WIDE)
            base = _image_row_offsets(rows, tile_pos_ptr, num_pos, CELLS, GW, ROW_STRIDE, IMG_STRIDE, OUT_SIDE, CP,
                                      WIDE)
            a = tl.load(packed_ptr + base[:, None] + k_offs[None, :])
            g_mask = row_ok[:, None]
            if COL_MASK:
                g_mask = g_mask & col_ok[None, :]
            g = _relu_grad(grad_ptr, out_ptr, rows[:, None] * C_OUT + cols[None, :], g_mask, GRAD_MASKED)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION, out_dtype=ACC)
        k_rows = tl.program_id(0) * BK + j
        tl.store(partial_ptr + (split * (KYP * KROW) + k_rows[:, None]) * C_OUT + cols[None, :],
                 acc.to(partial_ptr.dtype.element_ty), mask=col_ok[None, :])

    @triton.jit
    def _dgrad_step(grad_ptr, out_ptr, w_ptr, nbr_row, ly, lx, it, ky0, kx0, n_kx, n_iter, kc, cols, col_ok,
                    C_IN: tl.constexpr, CW: tl.constexpr, C_OUT: tl.constexpr, OUT_SIDE: tl.constexpr, KSIZE: tl.constexpr,
                    R: tl.constexpr, BLOCK_K: tl.constexpr, GRAD_MASKED: tl.constexpr, WIDE: tl.constexpr,
                    BOUNDED: tl.constexpr):
        """One K step of the input gradient: tap (ky, kx) of the class, output channels block."""
        PAD: tl.constexpr = KSIZE // 2
        NB: tl.constexpr = 2 * R + 1
        CB: tl.constexpr = (C_OUT + BLOCK_K - 1) // BLOCK_K
        CH_MASK: tl.constexpr = C_OUT % BLOCK_K != 0
        tap = it // CB
        co = (it % CB) * BLOCK_K + kc
        ty = tap // n_kx
        ky = ky0 + 2 * ty
        kx = kx0 + 2 * (tap - ty * n_kx)
        # the output pixel ((ly + PAD - ky) / 2, ...) reads this input pixel through tap (ky, kx);
        # shifted by R output tiles (R * 2 * OUT_SIDE input pixels) to stay non-negative
        oy = (ly + PAD - ky + R * 2 * OUT_SIDE) // 2
        ox = (lx + PAD - kx + R * 2 * OUT_SIDE) // 2
        offs, mask = _neighbour_offsets(nbr_row, oy, ox, co, OUT_SIDE, C_OUT, NB, CH_MASK, WIDE)
        w_mask = col_ok[None, :]
        if CH_MASK:
            w_mask = w_mask & (co < C_OUT)[:, None]
        if BOUNDED:
            # the interpreter's loop runs the largest class's count: extra steps read nothing
            mask = mask & (it < n_iter)
            w_mask = w_mask & (it < n_iter)
        g = _relu_grad(grad_ptr, out_ptr, offs, mask, GRAD_MASKED)
        w = tl.load(w_ptr + ((ky * KSIZE + kx) * C_OUT + co)[:, None] * CW + cols[None, :], mask=w_mask, other=0.0)
        return g, w

    @_autotune(_dgrad_configs(), _CONV_KEY, _prune_by_c_in)
    @triton.jit
    def _conv_relu_dgrad_kernel(grad_ptr, out_ptr, w_ptr, dsrc_ptr, nbr_ptr, rows_class, ROWS_BUCKET,
                                C_IN: tl.constexpr, CW: tl.constexpr, C_OUT: tl.constexpr, IN_SIDE: tl.constexpr,
                                KSIZE: tl.constexpr, R: tl.constexpr, GRAD_MASKED: tl.constexpr,
                                WIDE: tl.constexpr, INTERPRET: tl.constexpr, ACC: tl.constexpr,
                                PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """dsrc (M, q, q, C_in) = sum over the outputs each input pixel feeds of (grad * relu') W^T.

        A stride-2 conv reads input row iy only through taps ky of parity (iy + pad) % 2, so the
        input pixels are split into four parity classes (grid axis 2) and each class loops over
        its own taps only (9, 12, 12 and 16 of a 7x7 kernel), each tap once per block of output
        channels. w_ptr holds W as (k, k, C_out, CW), CW >= C_in (rows padded for 16-byte loads)."""
        OUT_SIDE: tl.constexpr = IN_SIDE // 2
        HALF: tl.constexpr = IN_SIDE // 2
        PAD: tl.constexpr = KSIZE // 2
        NB: tl.constexpr = 2 * R + 1
        CB: tl.constexpr = (C_OUT + BLOCK_K - 1) // BLOCK_K
        KH: tl.constexpr = (KSIZE + 1) // 2
        cls = tl.program_id(2)
        cy = cls // 2
        cx = cls % 2
        ky0 = (cy + PAD) % 2
        kx0 = (cx + PAD) % 2
        n_ky = (KSIZE - ky0 + 1) // 2
        n_kx = (KSIZE - kx0 + 1) // 2   # 0 for a 1x1 kernel's odd class: nothing reads those pixels
        n_iter = n_ky * n_kx * CB
        n_kx = tl.maximum(n_kx, 1)      # (only a divisor below; n_iter already says 0 taps)
        # rows of this class: (tile, ry, rx) -> local pixel (2 ry + cy, 2 rx + cx)
        rows, row_ok = _row_block(tl.program_id(0), rows_class, BLOCK_M, WIDE)
        tile = rows // (HALF * HALF)
        rem = rows % (HALF * HALF)
        ly = 2 * (rem // HALF) + cy
        lx = 2 * (rem % HALF) + cx
        nbr_row = nbr_ptr + tile * (NB * NB)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_IN
        kc = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        if INTERPRET:
            # (a loop bound computed from program_id fails in older Triton interpreters)
            for it in range(KH * KH * CB):
                g, w = _dgrad_step(grad_ptr, out_ptr, w_ptr, nbr_row, ly, lx, it, ky0, kx0, n_kx, n_iter, kc, cols,
                                   col_ok, C_IN, CW, C_OUT, OUT_SIDE, KSIZE, R, BLOCK_K, GRAD_MASKED, WIDE, True)
                acc = tl.dot(g, w, acc, input_precision=PRECISION, out_dtype=ACC)
        else:
            for it in range(n_iter):
                g, w = _dgrad_step(grad_ptr, out_ptr, w_ptr, nbr_row, ly, lx, it, ky0, kx0, n_kx, n_iter, kc, cols,
                                   col_ok, C_IN, CW, C_OUT, OUT_SIDE, KSIZE, R, BLOCK_K, GRAD_MASKED, WIDE, False)
                acc = tl.dot(g, w, acc, input_precision=PRECISION, out_dtype=ACC)
        out_rows = tile * (IN_SIDE * IN_SIDE) + ly * IN_SIDE + lx
        tl.store(dsrc_ptr + out_rows[:, None] * C_IN + cols[None, :], acc.to(dsrc_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's convolution setting (TF32 on tensor cores unless disabled)
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def _check_tables(name: str, src: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                  image: bool = False) -> None:
    if src.dtype not in _DTYPES and not (image and src.dtype == torch.uint8):
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {src.dtype}")
    check_tables(name, src, slot, tile_pos)
    if not triton_supports(src.device):
        raise RuntimeError(f"{name}: Triton does not run on {src.device} here "
                           "(a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")


def _source_geometry(src: torch.Tensor, slot: torch.Tensor, in_side: int, src_is_image: bool) -> int:
    """C_in of a conv source: an image (B, C, H, W) or compact (M, q, q, C)."""
    B, GH, GW = slot.shape
    if src_is_image:
        if src.dim() != 4 or tuple(src.shape[2:]) != (GH * in_side, GW * in_side) or src.shape[0] != B:
            raise ValueError(f"conv source: expected images ({B}, C, {GH * in_side}, {GW * in_side}), "
                             f"got {tuple(src.shape)}")
        return src.shape[1]
    if src.dim() != 4 or tuple(src.shape[1:3]) != (in_side, in_side):
        raise ValueError(f"conv source: expected compact (M, {in_side}, {in_side}, C), got {tuple(src.shape)}")
    return src.shape[3]


_INT32_MAX = 2 ** 31 - 1


def _wide(*tensors: torch.Tensor) -> bool:
    """True when 32-bit offsets cannot address every element of these tensors."""
    return max(t.numel() for t in tensors) > _INT32_MAX // 2


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _k_block(channels: int) -> int:
    """A conv GEMM's K step over one tap's channels: 16 to 64, a power of two."""
    return min(64, max(16, _pow2(channels)))


def _radius(in_side: int, k: int) -> int:
    """How many patches away a stride-2 k x k window (or its transpose) reaches."""
    return -(-(k // 2) // in_side)


def _neighbour_table(slot: torch.Tensor, tile_pos: torch.Tensor, radius: int) -> torch.Tensor:
    """(M, 2r+1, 2r+1) int32: each tile's neighbour within ``radius`` patches, or -1."""
    num_tiles = tile_pos.shape[0]
    nb = 2 * radius + 1
    nbr = torch.empty((num_tiles, nb, nb), dtype=torch.int32, device=slot.device)
    total = nbr.numel()
    if total:
        block = 1024
        _neighbour_table_kernel[(triton.cdiv(total, block),)](
            slot, tile_pos, nbr, total, num_tiles, slot.numel(), slot.shape[1], slot.shape[2], R=radius, BLOCK=block)
    return nbr


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return compact._multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _image_rows_per_cta(rows: int, tiles: int, device: torch.device) -> int:
    """Output pixels each image weight-gradient CTA reduces over: a multiple of 128 (the largest
    BLOCK_R), as few parts as fill one wave of ``tiles`` x parts CTAs at two per SM, since every
    part writes (and the sum reads) a float32 partial. One part off the GPU."""
    sms = _sm_count(device)
    parts = 1 if sms is None else max(1, 2 * sms // tiles)
    return max(128, -(-(-(-rows // parts)) // 128) * 128)


def _rows_per_cta(rows: int, tiles: int, device: torch.device) -> int:
    """Output pixels each weight-gradient CTA reduces over: a power of two (one compiled variant
    per size class), enough parts to give every SM about two CTAs. Each part writes its own
    float32 partial, summed afterwards: deterministic, no atomics. One part off the GPU."""
    sms = _sm_count(device)
    parts = 1 if sms is None else max(1, -(-2 * sms // tiles))
    return max(128, _pow2(-(-rows // parts)))


# ---- the image stage: a packed, padded, masked copy of the images ----------------------------
def _packed_geometry(height: int, width: int, k: int, c_in: int) -> dict:
    """Layout of the packed images (B, HP, WP, CP): channels padded to CP (a power of two), a
    kernel row read as KROW = KXE * CP contiguous elements (KXE >= k pixels), KYP >= k kernel rows
    covered by the weight-gradient tiles, rows padded so that every such read stays inside and
    each packed row is whole 8-element (16-byte in 16 bits) vectors."""
    pad = k // 2
    cp = _pow2(c_in)
    kxe = max(_pow2(k), -(-16 // cp))
    kyp = max(2, _pow2(k))   # at least the smallest weight-gradient tile (two kernel rows)
    hp = max(height + 2 * pad, height - 2 + kyp)
    align = max(1, 8 // cp)
    wp = -(-max(width + 2 * pad, width - 2 + kxe) // align) * align
    return dict(pad=pad, cp=cp, kxe=kxe, krow=kxe * cp, kyp=kyp, hp=hp, wp=wp)


def _pack_image(x: torch.Tensor, slot: torch.Tensor, num_tiles: int, in_side: int, k: int,
                norm: torch.Tensor, normalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    B, C, H, W = x.shape
    geo = _packed_geometry(H, W, k, C)
    packed = torch.empty((B, geo["hp"], geo["wp"], geo["cp"]), dtype=dtype, device=x.device)
    block = min(256, triton.next_power_of_2(geo["wp"]))   # a packed row per program: few, busy programs
    _pack_image_kernel[(B * geo["hp"], triton.cdiv(geo["wp"], block))](
        x, packed, slot, norm, num_tiles, slot.shape[1], slot.shape[2], H, W, geo["hp"], geo["wp"], *x.stride(),
        C=C, CP=geo["cp"], P=in_side, PAD=geo["pad"], NORMALIZE=normalize, ACC=accumulator(dtype), BLOCK_W=block)
    return packed, geo


def _image_weight(weight: torch.Tensor, geo: dict) -> torch.Tensor:
    """(C_out, C_in, k, k) -> (k * KROW, C_out), zero at the padded taps and channels."""
    c_out, c_in, k, _ = weight.shape
    w = weight.new_zeros((k, geo["kxe"], geo["cp"], c_out))
    w[:, :k, :c_in] = weight.permute(2, 3, 1, 0)
    return w.reshape(k * geo["krow"], c_out)


def _image_args(packed: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, rows: int, geo: dict) -> tuple:
    return (tile_pos, rows, slot.numel(), rows_bucket(rows))


def _image_consts(slot: torch.Tensor, geo: dict) -> dict:
    """The image kernels' compile-time geometry: grid cells per image and per row, packed strides."""
    _, GH, GW = slot.shape
    hp, wp, cp = geo["hp"], geo["wp"], geo["cp"]
    return dict(CELLS=GH * GW, GW=GW, ROW_STRIDE=wp * cp, IMG_STRIDE=hp * wp * cp)


# --------------------------------------------------------------------------------------------
# conv + ReLU
# --------------------------------------------------------------------------------------------
def _norm_args(pixel_norm: torch.Tensor | None, src: torch.Tensor, c_in: int, fallback: torch.Tensor):
    """(pointer tensor, NORMALIZE) for the kernels; fallback is any tensor when there is no table."""
    if pixel_norm is None:
        if src.dtype == torch.uint8:
            raise TypeError("triton_conv_relu: uint8 images need pixel_norm (mean, 1/std)")
        return fallback, False
    if tuple(pixel_norm.shape) != (2, c_in) or not pixel_norm.is_floating_point() \
            or pixel_norm.device != src.device:
        raise ValueError(f"pixel_norm must be a floating (2, {c_in}) table (mean, 1/std) on {src.device}, "
                         f"got {tuple(pixel_norm.shape)} {pixel_norm.dtype} on {pixel_norm.device}")
    return pixel_norm.contiguous(), True


def _image_geometry(name: str, slot: torch.Tensor, in_side: int, weight: torch.Tensor, packed: torch.Tensor) -> dict:
    """The packed images' layout for these tables and weight; raises unless ``packed`` has it."""
    _, c_in, k, _ = weight.shape
    B, GH, GW = slot.shape
    geo = _packed_geometry(GH * in_side, GW * in_side, k, c_in)
    want = (B, geo["hp"], geo["wp"], geo["cp"])
    if tuple(packed.shape) != want or packed.dtype != weight.dtype or not packed.is_contiguous():
        raise ValueError(f"{name}: packed must be a contiguous {weight.dtype} tensor of shape {want} "
                         f"(conv_image's second output), got {tuple(packed.shape)} {packed.dtype}")
    return geo


def _conv_image(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int,
                pixel_norm: torch.Tensor | None, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The image stage: packs the images, then the conv (+ ReLU) GEMM -> (out, packed)."""
    _check_tables("triton_conv_image", src, slot, tile_pos, image=True)
    c_in = _source_geometry(src, slot, in_side, True)
    c_out, _, k, _ = weight.shape
    if src.dtype != weight.dtype and src.dtype != torch.uint8:
        raise TypeError(f"triton_conv_image: src is {src.dtype} but weight is {weight.dtype}")
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    rows = num_tiles * side * side
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    norm, normalize = _norm_args(pixel_norm, src, c_in, weight)
    packed, geo = _pack_image(src, slot, num_tiles, in_side, k, norm, normalize, weight.dtype)
    out = torch.empty((num_tiles, side, side, c_out), dtype=weight.dtype, device=src.device)
    if rows == 0:
        return out, packed
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))
    _conv_relu_image_fwd_kernel[grid](
        packed, _image_weight(weight, geo), out, *_image_args(packed, slot, tile_pos, rows, geo),
        **_image_consts(slot, geo), C_OUT=c_out, OUT_SIDE=side, KSIZE=k, CP=geo["cp"], KROW=geo["krow"], WIDE=_wide(packed, out), RELU=relu,
        ACC=accumulator(weight.dtype), PRECISION=_precision(weight.dtype))
    return out, packed


@torch.library.custom_op("scott_kernels::triton_conv_relu", mutates_args=())
def conv_relu(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
              in_side: int, src_is_image: bool, pixel_norm: torch.Tensor | None = None,
              relu: bool = True) -> torch.Tensor:
    """relu(conv(src, weight, stride 2, pad k//2)) at the visible patches -> (M, q/2, q/2, C_out);
    the plain convolution with ``relu=False``.

    Computes in ``weight.dtype``; ``src`` is the images (B, C, H, W), of that dtype or, with
    ``pixel_norm`` (mean, 1/std per channel), uint8, or a compact (M, q, q, C) activation.
    """
    if src_is_image:
        return _conv_image(src, weight, slot, tile_pos, in_side, pixel_norm, relu)[0]
    _check_tables("triton_conv_relu", src, slot, tile_pos)
    src = src.contiguous()
    c_in = _source_geometry(src, slot, in_side, False)
    c_out, _, k, _ = weight.shape
    if src.dtype != weight.dtype:
        raise TypeError(f"triton_conv_relu: src is {src.dtype} but weight is {weight.dtype}")
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    out = torch.empty((num_tiles, side, side, c_out), dtype=weight.dtype, device=src.device)
    rows = num_tiles * side * side
    if rows == 0:
        return out
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    radius = _radius(in_side, k)
    nbr = _neighbour_table(slot, tile_pos, radius)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))
    _conv_relu_fwd_kernel[grid](
        src, gemm_weight(weight), out, nbr, rows, rows_bucket(rows), C_IN=c_in, C_OUT=c_out, IN_SIDE=in_side, KSIZE=k,
        R=radius, BLOCK_K=_k_block(c_in), WIDE=_wide(src, out), RELU=relu, ACC=accumulator(weight.dtype),
        PRECISION=_precision(weight.dtype))
    return out


@conv_relu.register_fake
def _(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None, relu=True):
    c_out = weight.shape[0]
    return weight.new_empty((tile_pos.shape[0], in_side // 2, in_side // 2, c_out))


@torch.library.custom_op("scott_kernels::triton_conv_image", mutates_args=())
def conv_image(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int,
               pixel_norm: torch.Tensor | None = None, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_relu of the images (B, C, H, W) -> (out, packed): ``packed`` (B, HP, WP, CP) is the
    masked, normalised, zero-padded copy of the images the kernels read, kept by the autograd for
    the weight gradient so that the backward does not pack the images again."""
    return _conv_image(src, weight, slot, tile_pos, in_side, pixel_norm, relu)


@conv_image.register_fake
def _(src, weight, slot, tile_pos, in_side, pixel_norm=None, relu=True):
    c_out, c_in, k, _ = weight.shape
    B, GH, GW = slot.shape
    geo = _packed_geometry(GH * in_side, GW * in_side, k, c_in)
    side = in_side // 2
    return (weight.new_empty((tile_pos.shape[0], side, side, c_out)),
            weight.new_empty((B, geo["hp"], geo["wp"], geo["cp"])))


def _image_wgrad(grad: torch.Tensor, out: torch.Tensor | None, packed: torch.Tensor, geo: dict, weight: torch.Tensor,
                 slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int) -> torch.Tensor:
    """The image stage's weight gradient from the packed images."""
    c_out, c_in, k, _ = weight.shape
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    rows = num_tiles * side * side
    if rows == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    grad = grad.to(weight.dtype).contiguous()
    masked = out is None
    out = grad if masked else out.contiguous()
    kyp, krow = geo["kyp"], geo["krow"]
    # sized for the two-kernel-row tiles that win at C_out = 64
    per_cta = _image_rows_per_cta(rows, max(1, kyp // 2) * triton.cdiv(c_out, 64), packed.device)
    splits = triton.cdiv(rows, per_cta)
    partial = torch.empty((splits, kyp * krow, c_out), dtype=accumulator_dtype(weight.dtype), device=packed.device)
    grid = lambda meta: (kyp // meta["BLOCK_KY"], triton.cdiv(c_out, meta["BLOCK_N"]), splits)
    _conv_relu_image_wgrad_kernel[grid](
        packed, grad, out, partial, *_image_args(packed, slot, tile_pos, rows, geo), per_cta,
        **_image_consts(slot, geo), C_OUT=c_out, OUT_SIDE=side, KYP=kyp, CP=geo["cp"], KROW=krow, GRAD_MASKED=masked,
        WIDE=_wide(packed, grad), ACC=accumulator(weight.dtype), PRECISION=_precision(weight.dtype))
    dw = partial.sum(0).view(kyp, geo["kxe"], geo["cp"], c_out)[:k, :k, :c_in]
    return dw.permute(3, 2, 0, 1).to(weight.dtype).contiguous()


@torch.library.custom_op("scott_kernels::triton_conv_image_wgrad", mutates_args=())
def conv_image_wgrad(grad: torch.Tensor, out: torch.Tensor | None, packed: torch.Tensor, weight: torch.Tensor,
                     slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int) -> torch.Tensor:
    """Gradient of conv_image with respect to its weight, from its packed images. ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it (or the
    forward had no ReLU)."""
    _check_tables("triton_conv_image_wgrad", grad, slot, tile_pos)
    geo = _image_geometry("triton_conv_image_wgrad", slot, in_side, weight, packed)
    return _image_wgrad(grad, out, packed, geo, weight, slot, tile_pos, in_side)


@conv_image_wgrad.register_fake
def _(grad, out, packed, weight, slot, tile_pos, in_side):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _conv_image_setup(ctx, inputs, output):
    src, weight, slot, tile_pos, in_side, pixel_norm, relu = inputs
    out, packed = output
    ctx.mark_non_differentiable(packed)
    ctx.set_materialize_grads(False)   # packed gets no gradient: no zero tensor of its size
    # the packed images instead of the images: the weight gradient reads them as they are
    ctx.save_for_backward(packed, weight, slot, tile_pos, out if relu else None, pixel_norm)
    ctx.in_side, ctx.src_shape, ctx.src_dtype = in_side, tuple(src.shape), src.dtype


def _conv_image_backward(ctx, grad, grad_packed):
    packed, weight, slot, tile_pos, out, pixel_norm = ctx.saved_tensors
    grad_src = grad_w = None
    if grad is not None and ctx.needs_input_grad[1]:
        grad_w = conv_image_wgrad(grad, out, packed, weight, slot, tile_pos, ctx.in_side)
    if grad is not None and ctx.needs_input_grad[0]:
        grad_src = compact.compact_to_image(conv_relu_dgrad(grad, out, weight, slot, tile_pos, ctx.in_side),
                                            tile_pos, ctx.src_shape)
        if pixel_norm is not None:
            grad_src = grad_src * pixel_norm[1].view(1, -1, 1, 1).to(grad_src.dtype)
        grad_src = grad_src.to(ctx.src_dtype)
    return grad_src, grad_w, None, None, None, None, None


conv_image.register_autograd(_conv_image_backward, setup_context=_conv_image_setup)


@torch.library.custom_op("scott_kernels::triton_conv_relu_wgrad", mutates_args=())
def conv_relu_wgrad(grad: torch.Tensor, out: torch.Tensor | None, src: torch.Tensor, weight: torch.Tensor,
                    slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int, src_is_image: bool,
                    pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu with respect to its (C_out, C_in, k, k) weight. ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it."""
    _check_tables("triton_conv_relu_wgrad", src, slot, tile_pos, image=src_is_image)
    if not src_is_image:
        src = src.contiguous()
    c_in = _source_geometry(src, slot, in_side, src_is_image)
    c_out, _, k, _ = weight.shape
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    rows = num_tiles * side * side
    if rows == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    if src_is_image:
        norm, normalize = _norm_args(pixel_norm, src, c_in, weight)
        packed, geo = _pack_image(src, slot, num_tiles, in_side, k, norm, normalize, weight.dtype)
        return _image_wgrad(grad, out, packed, geo, weight, slot, tile_pos, in_side)
    grad = grad.to(weight.dtype).contiguous()
    masked = out is None
    out = grad if masked else out.contiguous()
    acc, precision = accumulator(weight.dtype), _precision(weight.dtype)
    part_dtype = accumulator_dtype(weight.dtype)
    radius = _radius(in_side, k)
    nbr = _neighbour_table(slot, tile_pos, radius)
    block_k = _k_block(c_in)
    # two taps per CTA where a tap's channels fit one block (the gradient tile then serves both)
    taps = 2 if c_in <= block_k and k > 1 else 1
    k_tiles = triton.cdiv(k * k, taps) * triton.cdiv(c_in, block_k)
    per_cta = _rows_per_cta(rows, k_tiles * triton.cdiv(c_out, 128), src.device)
    splits = triton.cdiv(rows, per_cta)
    partial = torch.empty((splits, k * k * c_in, c_out), dtype=part_dtype, device=src.device)
    grid = lambda meta: (k_tiles, triton.cdiv(c_out, meta["BLOCK_N"]), splits)
    _conv_relu_wgrad_kernel[grid](
        src, grad, out, partial, nbr, rows, rows_bucket(rows), C_IN=c_in, C_OUT=c_out, IN_SIDE=in_side, KSIZE=k,
        R=radius, BLOCK_K=block_k, TAPS=taps, ROWS_PER_CTA=per_cta, GRAD_MASKED=masked, WIDE=_wide(src, grad), ACC=acc,
        PRECISION=precision)
    return weight_from_partials(partial, weight)


@conv_relu_wgrad.register_fake
def _(grad, out, src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("scott_kernels::triton_conv_relu_dgrad", mutates_args=())
def conv_relu_dgrad(grad: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, slot: torch.Tensor,
                    tile_pos: torch.Tensor, in_side: int) -> torch.Tensor:
    """Gradient of conv_relu with respect to a compact source -> (M, q, q, C_in). ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it."""
    _check_tables("triton_conv_relu_dgrad", grad, slot, tile_pos)
    c_out, c_in, k, _ = weight.shape
    weight_t = gemm_weight_transposed(weight.to(grad.dtype))
    c_w = -(-c_in // 8) * 8   # weight rows of whole 16-byte vectors
    if c_w != c_in:
        weight_t = torch.nn.functional.pad(weight_t, (0, c_w - c_in))
    num_tiles = tile_pos.shape[0]
    dsrc = torch.empty((num_tiles, in_side, in_side, c_in), dtype=grad.dtype, device=grad.device)
    rows = num_tiles * in_side * in_side
    if rows == 0:
        return dsrc
    grad = grad.contiguous()
    masked = out is None
    out = grad if masked else out.contiguous()
    radius = _radius(in_side, k)
    nbr = _neighbour_table(slot.contiguous(), tile_pos.contiguous(), radius)
    class_rows = rows // 4
    grid = lambda meta: (triton.cdiv(class_rows, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]), 4)
    _conv_relu_dgrad_kernel[grid](
        grad, out, weight_t, dsrc, nbr, class_rows, rows_bucket(rows), C_IN=c_in, CW=c_w, C_OUT=c_out, IN_SIDE=in_side,
        KSIZE=k, R=radius, GRAD_MASKED=masked, WIDE=_wide(grad, dsrc), INTERPRET=_interpreting(),
        ACC=accumulator(grad.dtype), PRECISION=_precision(grad.dtype))
    return dsrc


@conv_relu_dgrad.register_fake
def _(grad, out, weight, slot, tile_pos, in_side):
    return grad.new_empty((tile_pos.shape[0], in_side, in_side, weight.shape[1]))


register_stage_autograd(conv_relu, conv_relu_wgrad, conv_relu_dgrad, max_blur_pool, max_blur_pool_backward)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
# Each stage runs as conv (no ReLU) -> pool of relu(conv): the same function, but the pool's
# backward, which reads the conv output anyway, returns the gradient already multiplied by ReLU',
# so the conv gradients read neither a mask nor the conv output. The image stage keeps its packed
# images for the weight gradient.
def _stage_conv(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm):
    if src_is_image:
        return conv_image(src, weight, slot, tile_pos, in_side, pixel_norm, False)[0]
    return conv_relu(src, weight, slot, tile_pos, in_side, False, pixel_norm, False)


def _stage_pool(act, slot, tile_pos):
    return max_blur_pool(act, slot, tile_pos, True)


def triton_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None,
                    patch_size: int, num_visible: int | None = None, packed: bool = False,
                    pixel_norm: torch.Tensor | None = None, norm=None, pos_embed: torch.Tensor | None = None,
                    mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, D) tokens (masked ones exactly 0), or with ``packed`` the
    (B, num_visible, D) tokens of the visible patches in row-major order. ``pixel_norm``
    ((mean, 1/std) per channel, in the images' units) normalises the images inside the first
    convolution's load, so uint8 images go straight in. ``norm`` ((weight, bias, eps) of a
    LayerNorm over D), ``pos_embed`` (N, D) and ``mask_token`` (D,): the token epilogue (see
    ``functional.token_epilogue``), computed by the last pool kernel as it stores the tokens.

    Inputs are assumed validated (see ``scott_kernels.functional``).
    """
    if norm is None and pos_embed is None and mask_token is None:
        return tokenize_compact(_stage_conv, _stage_pool, x, weights, keep, patch_size, num_visible, packed,
                                pixel_norm)
    dense = keep is None or not packed
    # under autocast the unfused LayerNorm runs (and returns) float32: so do the fused tokens
    out_dtype = torch.float32 if norm is not None and torch.is_autocast_enabled(x.device.type) else None
    fill = mask_token if keep is not None and not packed else None

    def last_pool(act, slot, tile_pos):
        return pool_tokens_apply(act, slot, tile_pos, norm, pos_embed, fill, dense, out_dtype, relu=True)

    return tokenize_compact(_stage_conv, _stage_pool, x, weights, keep, patch_size, num_visible, packed, pixel_norm,
                            last_pool=last_pool)
