"""Triton backend: the SCOTT tokenizer over visible patches with fused Triton kernels.

Activations stay compact and channel-last: one (side, side, C) block per visible patch, i.e. a
(M, side, side, C) tensor for M visible patches (tile order = row-major over batch and patch
grid). Two tables describe the visible set and are shared by every stage:
  slot      (B, GH, GW) int32   grid position -> tile index, or -1 where the patch is masked
  tile_pos  (M,)        int64   tile index -> flat grid position (b * GH * GW + gy * GW + gx)
A kernel reading a neighbour's pixel looks its patch up in ``slot``; -1 (or a position outside
the image) reads as zero, which is exactly the mask the dense emulation applies after each op.

Per stage (input patch side q, conv output side s = q / 2, pooled side s / 2):
  conv_relu       implicit GEMM (rows = M*s*s output pixels, cols = C_out, K = k*k*C_in) that
                  gathers its input window through ``slot``; ReLU in the epilogue. Stage 0 reads
                  the (B, C, H, W) images directly, so input masking is fused into the load.
  max_blur_pool   2x2 max (stride 1) + 3x3 binomial blur (stride 2), reading the 1-pixel halo
                  from neighbouring patches; the max-pool map's absence at the image border is
                  the blur's zero padding.
Backward: max_blur_pool_backward pulls, for every conv pixel, the gradient of each max window
that selected it (first maximum in row-major order, as torch's max_pool2d); conv wgrad is a
split-K GEMM over output pixels into float32 partials; conv dgrad is an implicit GEMM over input
pixels that gathers the output gradient through ``slot``, run per parity class of input pixel (a
stride-2 conv reads a pixel only through taps of one parity, so each class reduces over a quarter
of the taps); both apply the ReLU mask on load.

Every kernel sits behind a ``torch.library.custom_op`` with a fake implementation and autograd,
so the backend traces under torch.compile. With ``num_visible`` (visible patches per row) given,
the tables are built without a host synchronisation.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from .triton_configs import gemm_shared_bytes, prune_hook, shared_fits
from .compact import (accumulator_dtype, check_tables, gemm_weight, gemm_weight_transposed, reduction_splits,
                      register_stage_autograd, tokenize_compact, visible_tables, weight_from_partials)

__all__ = ["triton_tokenize", "triton_supports", "visible_tables"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(device: torch.device) -> bool:
    """Triton runs on CUDA GPUs, and on the CPU under its interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


# --------------------------------------------------------------------------------------------
# Tile-size autotuning: keyed on channel counts, patch side, kernel size and the row count's
# power of two; results are kept per process and in Triton's on-disk cache (cache_results).
# --------------------------------------------------------------------------------------------
def _single_config() -> bool:
    """SCOTT_TRITON_SINGLE_CONFIG=1: every autotuned kernel keeps only its first config, so a
    quick GPU check compiles one variant per kernel instead of benchmarking the whole list."""
    return os.environ.get("SCOTT_TRITON_SINGLE_CONFIG", "").strip().lower() in {"1", "true", "yes", "on"}


def _gemm_configs() -> list:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32})]
    configs = []
    for bm, bn, bk, warps, stages in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                      (128, 128, 64, 8, 2), (64, 64, 64, 4, 3), (128, 32, 32, 4, 4),
                                      (64, 32, 32, 4, 4), (64, 16, 32, 4, 4), (128, 16, 64, 4, 3)]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                     num_stages=stages))
    return configs[:1] if _single_config() else configs


def _pool_configs() -> list:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_C": 32})]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps)
               for bm, bc, warps in [(16, 64, 2), (32, 64, 4), (64, 64, 4), (16, 128, 4), (32, 128, 4),
                                     (64, 32, 4), (32, 32, 2)]]
    return configs[:1] if _single_config() else configs


def _prune_wide(configs, columns: int, block: str = "BLOCK_N"):
    """Drops tiles more than twice as wide as the channel count (pure waste); keeps at least one."""
    limit = max(16, 2 * (1 << max(int(columns) - 1, 0).bit_length()))
    kept = [c for c in configs if c.kwargs[block] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs[block])]


def _prune_by_c_out(configs, named_args, **kwargs):
    return _prune_wide(configs, named_args["C_OUT"])


def _prune_by_c_in(configs, named_args, **kwargs):
    return _prune_wide(configs, named_args["C_IN"])


def _prune_by_channels(configs, named_args, **kwargs):
    return _prune_wide(configs, named_args["C"], "BLOCK_C")


def _autotune(configs, key, prune, shared=gemm_shared_bytes):
    # configs whose operand tiles would not fit the device's shared memory are dropped before compiling
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": prune_hook(prune, shared_fits(shared))},
                           cache_results=True)


# wgrad's GEMM is (BLOCK_K x BLOCK_M) @ (BLOCK_M x BLOCK_N): it reduces over the BLOCK_M rows
_WGRAD_SHARED = functools.partial(gemm_shared_bytes, m="BLOCK_K", k="BLOCK_M")


_GEMM_KEY = ["C_IN", "C_OUT", "IN_SIDE", "KSIZE", "ROWS_BUCKET"]
_POOL_KEY = ["C", "SIDE", "ROWS_BUCKET"]


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

    @triton.jit
    def _source_window(src_ptr, slot_ptr, b, oy, ox, kk, row_ok, k_ok, GH, GW, num_tiles, C_IN,
                       s_b, s_c, s_h, s_w, norm_ptr, IN_SIDE: tl.constexpr, KSIZE: tl.constexpr,
                       SRC_IMAGE: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                       COMPUTE: tl.constexpr):
        """[rows, K] block of the conv's input windows (im2col, K ordered (ky, kx, ci)).

        With NORMALIZE the image (any dtype, uint8 included) becomes (x - mean[c]) * inv_std[c]
        on load, norm_ptr holding (mean, inv_std) as a (2, C_in) table; masked pixels stay 0.
        """
        PAD: tl.constexpr = KSIZE // 2
        ky = kk // (KSIZE * C_IN)
        kx = (kk // C_IN) % KSIZE
        ci = kk % C_IN
        iy = 2 * oy[:, None] - PAD + ky[None, :]
        ix = 2 * ox[:, None] - PAD + kx[None, :]
        ok = row_ok[:, None] & k_ok[None, :]
        bb = b[:, None]
        if SRC_IMAGE:
            # the image is read in place; slot says only whether the patch is visible
            inside = ok & (iy >= 0) & (iy < GH * IN_SIDE) & (ix >= 0) & (ix < GW * IN_SIDE)
            iyc = tl.where(inside, iy, 0)
            ixc = tl.where(inside, ix, 0)
            slot = tl.load(slot_ptr + (bb * GH + iyc // IN_SIDE) * GW + ixc // IN_SIDE, mask=inside, other=-1)
            valid = inside & (slot >= 0) & (slot < num_tiles)
            offs = bb * s_b + ci[None, :].to(tl.int64) * s_c + iyc.to(tl.int64) * s_h + ixc.to(tl.int64) * s_w
            v = tl.load(src_ptr + offs, mask=valid, other=0)
            if NORMALIZE:
                mean = tl.load(norm_ptr + ci, mask=k_ok, other=0.0).to(ACC)
                inv_std = tl.load(norm_ptr + C_IN + ci, mask=k_ok, other=0.0).to(ACC)
                v = tl.where(valid, (v.to(ACC) - mean[None, :]) * inv_std[None, :], 0.0)
            return v.to(COMPUTE)
        else:
            offs, valid = _compact_offsets(slot_ptr, bb, iy, ix, ci[None, :], ok, GH, GW, num_tiles, C_IN, IN_SIDE)
            return tl.load(src_ptr + offs, mask=valid, other=0.0)

    @_autotune(_gemm_configs(), _GEMM_KEY, _prune_by_c_out)
    @triton.jit
    def _conv_relu_fwd_kernel(src_ptr, w_ptr, out_ptr, slot_ptr, tile_pos_ptr,
                              num_tiles, num_pos, GH, GW, C_IN, C_OUT, K_TOTAL, ROWS_BUCKET, s_b, s_c, s_h, s_w, norm_ptr,
                              IN_SIDE: tl.constexpr, KSIZE: tl.constexpr, SRC_IMAGE: tl.constexpr,
                              NORMALIZE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        OUT_SIDE: tl.constexpr = IN_SIDE // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_tiles * (OUT_SIDE * OUT_SIDE)
        b, oy, ox = _tile_coords(rows, row_ok, tile_pos_ptr, num_pos, GH, GW, OUT_SIDE)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, K_TOTAL, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K_TOTAL
            a = _source_window(src_ptr, slot_ptr, b, oy, ox, kk, row_ok, k_ok, GH, GW, num_tiles, C_IN,
                               s_b, s_c, s_h, s_w, norm_ptr, IN_SIDE, KSIZE, SRC_IMAGE, NORMALIZE, ACC,
                               w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + kk[:, None] * C_OUT + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
        acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @_autotune(_gemm_configs(), _GEMM_KEY + ["SPLITS"], _prune_by_c_out, shared=_WGRAD_SHARED)
    @triton.jit
    def _conv_relu_wgrad_kernel(src_ptr, grad_ptr, out_ptr, partial_ptr, slot_ptr, tile_pos_ptr,
                                num_tiles, num_pos, GH, GW, C_IN, C_OUT, K_TOTAL, ROWS_BUCKET, SPLITS, s_b, s_c, s_h, s_w,
                                norm_ptr, IN_SIDE: tl.constexpr, KSIZE: tl.constexpr, SRC_IMAGE: tl.constexpr,
                                NORMALIZE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """partial[split] (K, C_out) = im2col(rows of this split)^T @ (grad * relu')."""
        OUT_SIDE: tl.constexpr = IN_SIDE // 2
        kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < K_TOTAL
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_OUT
        split = tl.program_id(2)
        total_rows = num_tiles * (OUT_SIDE * OUT_SIDE)
        ROWS_PER_SPLIT = tl.cdiv(tl.cdiv(total_rows, SPLITS), BLOCK_M) * BLOCK_M
        start = split.to(tl.int64) * ROWS_PER_SPLIT
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
        for r0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
            rows = start + r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < total_rows
            b, oy, ox = _tile_coords(rows, row_ok, tile_pos_ptr, num_pos, GH, GW, OUT_SIDE)
            a = _source_window(src_ptr, slot_ptr, b, oy, ox, kk, row_ok, k_ok, GH, GW, num_tiles, C_IN,
                               s_b, s_c, s_h, s_w, norm_ptr, IN_SIDE, KSIZE, SRC_IMAGE, NORMALIZE, ACC,
                               grad_ptr.dtype.element_ty)
            g_offs = rows[:, None] * C_OUT + cols[None, :]
            g_ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(grad_ptr + g_offs, mask=g_ok, other=0.0)
            r = tl.load(out_ptr + g_offs, mask=g_ok, other=0.0)
            g = tl.where(r > 0, g, tl.zeros_like(g))
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION, out_dtype=ACC)
        tl.store(partial_ptr + (split.to(tl.int64) * K_TOTAL + kk[:, None]) * C_OUT + cols[None, :],
                 acc.to(partial_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])

    @_autotune(_gemm_configs(), _GEMM_KEY, _prune_by_c_in)
    @triton.jit
    def _conv_relu_dgrad_kernel(grad_ptr, out_ptr, w_ptr, dsrc_ptr, slot_ptr, tile_pos_ptr,
                                num_tiles, num_pos, GH, GW, C_IN, C_OUT, K_TOTAL, ROWS_BUCKET,
                                IN_SIDE: tl.constexpr, KSIZE: tl.constexpr,
                                ACC: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """dsrc (M, q, q, C_in) = sum over the outputs each input pixel feeds of W^T (grad * relu').

        A stride-2 conv reads input row iy only through taps ky of parity (iy + pad) % 2, so the
        input pixels are split into four parity classes (grid axis 2) and each class reduces over
        its own taps only: K = ceil-or-floor(k/2)^2 * C_out instead of k^2 * C_out, a quarter of
        the work of the plain transposed convolution. w_ptr holds W as (k, k, C_out, C_in).
        """
        OUT_SIDE: tl.constexpr = IN_SIDE // 2
        HALF: tl.constexpr = IN_SIDE // 2
        PAD: tl.constexpr = KSIZE // 2
        cls = tl.program_id(2)
        cy = cls // 2
        cx = cls % 2
        ky0 = (cy + PAD) % 2
        kx0 = (cx + PAD) % 2
        n_ky = (KSIZE - ky0 + 1) // 2
        n_kx = (KSIZE - kx0 + 1) // 2   # 0 for a 1x1 kernel's odd class: nothing reads those pixels
        k_class = n_ky * n_kx * C_OUT
        n_kx = tl.maximum(n_kx, 1)      # (only a divisor below; k_class already says 0 taps)
        # rows of this class: (tile, ry, rx) -> local pixel (2 ry + cy, 2 rx + cx)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_tiles * (HALF * HALF)
        tile = tl.where(row_ok, rows // (HALF * HALF), 0)
        rem = rows % (HALF * HALF)
        ly = 2 * (rem // HALF) + cy
        lx = 2 * (rem % HALF) + cx
        pos = tl.load(tile_pos_ptr + tile, mask=row_ok, other=0)
        pos = tl.minimum(tl.maximum(pos, 0), num_pos - 1)
        cells = GH * GW
        b = pos // cells
        iy = (pos % cells) // GW * IN_SIDE + ly
        ix = pos % GW * IN_SIDE + lx
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < C_IN
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, K_TOTAL, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k_class
            ky = ky0 + 2 * (kk // (n_kx * C_OUT))
            kx = kx0 + 2 * ((kk // C_OUT) % n_kx)
            co = kk % C_OUT
            # the output pixel (ny/2, nx/2) reads this input pixel through tap (ky, kx); ny, nx even
            ny = iy[:, None] + PAD - ky[None, :]
            nx = ix[:, None] + PAD - kx[None, :]
            ok = row_ok[:, None] & k_ok[None, :] & (ny >= 0) & (nx >= 0)
            offs, valid = _compact_offsets(slot_ptr, b[:, None], ny // 2, nx // 2, co[None, :], ok,
                                           GH, GW, num_tiles, C_OUT, OUT_SIDE)
            g = tl.load(grad_ptr + offs, mask=valid, other=0.0)
            r = tl.load(out_ptr + offs, mask=valid, other=0.0)
            g = tl.where(r > 0, g, tl.zeros_like(g))
            w_row = (ky * KSIZE + kx) * C_OUT + co
            w = tl.load(w_ptr + w_row[:, None] * C_IN + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            acc = tl.dot(g, w, acc, input_precision=PRECISION, out_dtype=ACC)
        out_rows = tile * (IN_SIDE * IN_SIDE) + ly * IN_SIDE + lx
        tl.store(dsrc_ptr + out_rows[:, None] * C_IN + cols[None, :], acc.to(dsrc_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _relu_value(act_ptr, slot_ptr, b, y, x, c, ok, GH, GW, num_tiles, C, SIDE: tl.constexpr, ACC: tl.constexpr):
        offs, valid = _compact_offsets(slot_ptr, b, y, x, c, ok, GH, GW, num_tiles, C, SIDE)
        return tl.load(act_ptr + offs, mask=valid, other=0.0).to(ACC)

    @triton.jit
    def _max_window(act_ptr, slot_ptr, b, my, mx, c, ok, GH, GW, num_tiles, C, SIDE: tl.constexpr, ACC: tl.constexpr):
        """The 2x2 window with top-left (my, mx): its four values, row-major."""
        v00 = _relu_value(act_ptr, slot_ptr, b, my, mx, c, ok, GH, GW, num_tiles, C, SIDE, ACC)
        v01 = _relu_value(act_ptr, slot_ptr, b, my, mx + 1, c, ok, GH, GW, num_tiles, C, SIDE, ACC)
        v10 = _relu_value(act_ptr, slot_ptr, b, my + 1, mx, c, ok, GH, GW, num_tiles, C, SIDE, ACC)
        v11 = _relu_value(act_ptr, slot_ptr, b, my + 1, mx + 1, c, ok, GH, GW, num_tiles, C, SIDE, ACC)
        return v00, v01, v10, v11

    @_autotune(_pool_configs(), _POOL_KEY, _prune_by_channels)
    @triton.jit
    def _max_blur_pool_fwd_kernel(act_ptr, out_ptr, slot_ptr, tile_pos_ptr, num_tiles, num_pos, GH, GW, C,
                                  ROWS_BUCKET,
                                  SIDE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """(M, s, s, C) -> (M, s/2, s/2, C): 2x2 max (stride 1), binomial 3x3 blur (stride 2, pad 1)."""
        POOLED: tl.constexpr = SIDE // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_tiles * (POOLED * POOLED)
        b, py, px = _tile_coords(rows, row_ok, tile_pos_ptr, num_pos, GH, GW, POOLED)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (c[None, :] < C)
        bb = b[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
        for dy in tl.static_range(3):
            for dx in tl.static_range(3):
                my = 2 * py[:, None] - 1 + dy
                mx = 2 * px[:, None] - 1 + dx
                # the max-pool map is (H_s - 1) x (W_s - 1); beyond it the blur reads its padding
                exists = ok & (my >= 0) & (my < GH * SIDE - 1) & (mx >= 0) & (mx < GW * SIDE - 1)
                v00, v01, v10, v11 = _max_window(act_ptr, slot_ptr, bb, my, mx, c[None, :], exists,
                                                 GH, GW, num_tiles, C, SIDE, ACC)
                tap = (1 + (dy == 1)) * (1 + (dx == 1)) / 16.0
                acc += tl.maximum(tl.maximum(v00, v01), tl.maximum(v10, v11)) * tap
        tl.store(out_ptr + rows[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)

    @_autotune(_pool_configs(), _POOL_KEY, _prune_by_channels)
    @triton.jit
    def _max_blur_pool_bwd_kernel(grad_ptr, act_ptr, dact_ptr, slot_ptr, tile_pos_ptr, num_tiles, num_pos, GH, GW,
                                  C, ROWS_BUCKET,
                                  SIDE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """dact (M, s, s, C): for each pixel, the blurred gradient of every max window it won."""
        POOLED: tl.constexpr = SIDE // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_tiles * (SIDE * SIDE)
        b, cy, cx = _tile_coords(rows, row_ok, tile_pos_ptr, num_pos, GH, GW, SIDE)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (c[None, :] < C)
        bb = b[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
        for wy in tl.static_range(2):
            for wx in tl.static_range(2):
                # window with top-left (my, mx) holds this pixel at (1 - wy, 1 - wx)
                my = cy[:, None] - 1 + wy
                mx = cx[:, None] - 1 + wx
                exists = ok & (my >= 0) & (my < GH * SIDE - 1) & (mx >= 0) & (mx < GW * SIDE - 1)
                v00, v01, v10, v11 = _max_window(act_ptr, slot_ptr, bb, my, mx, c[None, :], exists,
                                                 GH, GW, num_tiles, C, SIDE, ACC)
                # torch's max_pool2d keeps the first maximum in row-major order
                best = v00
                arg = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.int32)
                arg = tl.where(v01 > best, 1, arg)
                best = tl.maximum(best, v01)
                arg = tl.where(v10 > best, 2, arg)
                best = tl.maximum(best, v10)
                arg = tl.where(v11 > best, 3, arg)
                won = exists & (arg == (1 - wy) * 2 + (1 - wx))
                window_grad = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
                for dy in tl.static_range(3):
                    for dx in tl.static_range(3):
                        # pooled output (qy, qx) reads this window through blur tap (dy, dx)
                        ny = my + 1 - dy
                        nx = mx + 1 - dx
                        read = won & (ny >= 0) & (nx >= 0) & (ny % 2 == 0) & (nx % 2 == 0)
                        offs, valid = _compact_offsets(slot_ptr, bb, ny // 2, nx // 2, c[None, :], read,
                                                       GH, GW, num_tiles, C, POOLED)
                        tap = (1 + (dy == 1)) * (1 + (dx == 1)) / 16.0
                        window_grad += tl.load(grad_ptr + offs, mask=valid, other=0.0).to(ACC) * tap
                acc += window_grad
        tl.store(dact_ptr + rows[:, None] * C + c[None, :], acc.to(dact_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's convolution setting (TF32 on tensor cores unless disabled)
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def _bucket(rows: int) -> int:
    return int(rows).bit_length()


def _check_tables(name: str, src: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                  image: bool = False) -> None:
    if src.dtype not in _DTYPES and not (image and src.dtype == torch.uint8):
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {src.dtype}")
    check_tables(name, src, slot, tile_pos)
    if not triton_supports(src.device):
        raise RuntimeError(f"{name}: Triton does not run on {src.device} here "
                           "(a CUDA GPU, or the CPU with TRITON_INTERPRET=1)")


def _source_geometry(src: torch.Tensor, slot: torch.Tensor, in_side: int, src_is_image: bool):
    """(C_in, strides) of a conv source: an image (B, C, H, W) or compact (M, q, q, C)."""
    B, GH, GW = slot.shape
    if src_is_image:
        if src.dim() != 4 or tuple(src.shape[2:]) != (GH * in_side, GW * in_side) or src.shape[0] != B:
            raise ValueError(f"conv source: expected images ({B}, C, {GH * in_side}, {GW * in_side}), "
                             f"got {tuple(src.shape)}")
        return src.shape[1], src.stride()
    if src.dim() != 4 or tuple(src.shape[1:3]) != (in_side, in_side):
        raise ValueError(f"conv source: expected compact (M, {in_side}, {in_side}, C), got {tuple(src.shape)}")
    return src.shape[3], (0, 0, 0, 0)


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


@torch.library.custom_op("scott_kernels::triton_conv_relu", mutates_args=())
def conv_relu(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
              in_side: int, src_is_image: bool, pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv(src, weight, stride 2, pad k//2)) at the visible patches -> (M, q/2, q/2, C_out).

    Computes in ``weight.dtype``; ``src`` is the images (B, C, H, W), of that dtype or, with
    ``pixel_norm`` (mean, 1/std per channel), uint8, or a compact (M, q, q, C) activation.
    """
    _check_tables("triton_conv_relu", src, slot, tile_pos, image=src_is_image)
    if not src_is_image:
        src = src.contiguous()
    c_in, strides = _source_geometry(src, slot, in_side, src_is_image)
    c_out, _, k, _ = weight.shape
    if src.dtype != weight.dtype and src.dtype != torch.uint8:
        raise TypeError(f"triton_conv_relu: src is {src.dtype} but weight is {weight.dtype}")
    weight_t = gemm_weight(weight)
    norm, normalize = _norm_args(pixel_norm, src, c_in, weight_t)
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    out = torch.empty((num_tiles, side, side, c_out), dtype=weight.dtype, device=src.device)
    rows = num_tiles * side * side
    if rows == 0:
        return out
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))
    _conv_relu_fwd_kernel[grid](
        src, weight_t, out, slot.contiguous(), tile_pos.contiguous(), num_tiles, slot.numel(), slot.shape[1], slot.shape[2],
        c_in, c_out, k * k * c_in, _bucket(rows), *strides, norm, IN_SIDE=in_side, KSIZE=k,
        SRC_IMAGE=src_is_image, NORMALIZE=normalize, ACC=_acc_dtype(weight.dtype),
        PRECISION=_precision(weight.dtype))
    return out


@conv_relu.register_fake
def _(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None):
    c_out = weight.shape[0]
    return weight.new_empty((tile_pos.shape[0], in_side // 2, in_side // 2, c_out))


@torch.library.custom_op("scott_kernels::triton_conv_relu_wgrad", mutates_args=())
def conv_relu_wgrad(grad: torch.Tensor, out: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                    slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int, src_is_image: bool,
                    pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu with respect to its (C_out, C_in, k, k) weight."""
    _check_tables("triton_conv_relu_wgrad", src, slot, tile_pos, image=src_is_image)
    if not src_is_image:
        src = src.contiguous()
    c_in, strides = _source_geometry(src, slot, in_side, src_is_image)
    c_out, _, k, _ = weight.shape
    norm, normalize = _norm_args(pixel_norm, src, c_in, grad)
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    rows = num_tiles * side * side
    k_total = k * k * c_in
    if rows == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    splits = reduction_splits(rows, k_total, c_out, src.device, min_rows=512)
    partial = torch.empty((splits, k_total, c_out), dtype=accumulator_dtype(weight.dtype), device=src.device)
    grid = lambda meta: (triton.cdiv(k_total, meta["BLOCK_K"]), triton.cdiv(c_out, meta["BLOCK_N"]), splits)
    _conv_relu_wgrad_kernel[grid](
        src, grad.to(weight.dtype).contiguous(), out.contiguous(), partial, slot.contiguous(), tile_pos.contiguous(),
        num_tiles, slot.numel(), slot.shape[1], slot.shape[2], c_in, c_out, k_total, _bucket(rows), splits, *strides, norm,
        IN_SIDE=in_side, KSIZE=k, SRC_IMAGE=src_is_image, NORMALIZE=normalize, ACC=_acc_dtype(weight.dtype),
        PRECISION=_precision(weight.dtype))
    return weight_from_partials(partial, weight)


@conv_relu_wgrad.register_fake
def _(grad, out, src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("scott_kernels::triton_conv_relu_dgrad", mutates_args=())
def conv_relu_dgrad(grad: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor,
                    tile_pos: torch.Tensor, in_side: int) -> torch.Tensor:
    """Gradient of conv_relu with respect to a compact source -> (M, q, q, C_in)."""
    _check_tables("triton_conv_relu_dgrad", grad, slot, tile_pos)
    c_out, c_in, k, _ = weight.shape
    weight_t = gemm_weight_transposed(weight.to(grad.dtype))
    num_tiles = tile_pos.shape[0]
    dsrc = torch.empty((num_tiles, in_side, in_side, c_in), dtype=grad.dtype, device=grad.device)
    rows = num_tiles * in_side * in_side
    if rows == 0:
        return dsrc
    # four parity classes of input pixels, each reducing over at most ceil(k/2)^2 taps
    k_class_max = ((k + 1) // 2) ** 2 * c_out
    class_rows = rows // 4
    grid = lambda meta: (triton.cdiv(class_rows, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]), 4)
    _conv_relu_dgrad_kernel[grid](
        grad.contiguous(), out.contiguous(), weight_t, dsrc, slot.contiguous(), tile_pos.contiguous(), num_tiles, slot.numel(),
        slot.shape[1], slot.shape[2], c_in, c_out, k_class_max, _bucket(rows), IN_SIDE=in_side, KSIZE=k,
        ACC=_acc_dtype(grad.dtype), PRECISION=_precision(grad.dtype))
    return dsrc


@conv_relu_dgrad.register_fake
def _(grad, out, weight, slot, tile_pos, in_side):
    return grad.new_empty((tile_pos.shape[0], in_side, in_side, weight.shape[1]))




# --------------------------------------------------------------------------------------------
# MaxBlurPool
# --------------------------------------------------------------------------------------------
def _check_compact(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4 or t.shape[1] != t.shape[2] or t.shape[1] % 2:
        raise ValueError(f"{name}: expected a compact (M, s, s, C) tensor with s even, got {tuple(t.shape)}")


@torch.library.custom_op("scott_kernels::triton_max_blur_pool", mutates_args=())
def max_blur_pool(act: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor) -> torch.Tensor:
    """MaxBlurPool of compact (M, s, s, C) activations -> (M, s/2, s/2, C)."""
    _check_tables("triton_max_blur_pool", act, slot, tile_pos)
    _check_compact("triton_max_blur_pool", act)
    act = act.contiguous()
    num_tiles, side, _, channels = act.shape
    out = torch.empty((num_tiles, side // 2, side // 2, channels), dtype=act.dtype, device=act.device)
    rows = num_tiles * (side // 2) ** 2
    if rows == 0:
        return out
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_C"]))
    _max_blur_pool_fwd_kernel[grid](act, out, slot.contiguous(), tile_pos.contiguous(), num_tiles, slot.numel(),
                                    slot.shape[1], slot.shape[2], channels, _bucket(rows), SIDE=side,
                                    ACC=_acc_dtype(act.dtype))
    return out


@max_blur_pool.register_fake
def _(act, slot, tile_pos):
    return act.new_empty((act.shape[0], act.shape[1] // 2, act.shape[2] // 2, act.shape[3]))


@torch.library.custom_op("scott_kernels::triton_max_blur_pool_backward", mutates_args=())
def max_blur_pool_backward(grad: torch.Tensor, act: torch.Tensor, slot: torch.Tensor,
                           tile_pos: torch.Tensor) -> torch.Tensor:
    """Gradient of max_blur_pool with respect to its (M, s, s, C) input."""
    _check_tables("triton_max_blur_pool_backward", act, slot, tile_pos)
    _check_compact("triton_max_blur_pool_backward", act)
    act = act.contiguous()
    num_tiles, side, _, channels = act.shape
    dact = torch.empty_like(act)
    rows = num_tiles * side * side
    if rows == 0:
        return dact
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_C"]))
    _max_blur_pool_bwd_kernel[grid](grad.contiguous(), act, dact, slot.contiguous(), tile_pos.contiguous(),
                                    num_tiles, slot.numel(), slot.shape[1], slot.shape[2], channels, _bucket(rows), SIDE=side,
                                    ACC=_acc_dtype(act.dtype))
    return dact


@max_blur_pool_backward.register_fake
def _(grad, act, slot, tile_pos):
    return torch.empty_like(act, memory_format=torch.contiguous_format)


register_stage_autograd(conv_relu, conv_relu_wgrad, conv_relu_dgrad, max_blur_pool, max_blur_pool_backward)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
def triton_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None,
                    patch_size: int, num_visible: int | None = None, packed: bool = False,
                    pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, D) tokens (masked ones exactly 0), or with ``packed`` the
    (B, num_visible, D) tokens of the visible patches in row-major order. ``pixel_norm``
    ((mean, 1/std) per channel, in the images' units) normalises the images inside the first
    convolution's load, so uint8 images go straight in.

    Inputs are assumed validated (see ``scott_kernels.functional``).
    """
    return tokenize_compact(conv_relu, max_blur_pool, x, weights, keep, patch_size, num_visible, packed, pixel_norm)
