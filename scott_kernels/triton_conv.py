"""Triton conv GEMMs over compact activations (see triton_backend for the layout and the tables):
the stride-2 convolution of a compact (M, q, q, C_in) source, forward (+ ReLU), its weight
gradient and its input gradient, and the per-tile neighbour table they gather through.

  forward  implicit GEMM (rows = M*s*s output pixels, cols = C_out, K = k*k*C_in) on tensor
           cores, ReLU in the epilogue (unless relu=False); K runs over (tap, channel block), so
           a row's neighbour lookup is one small load per step and each step loads contiguous
           channels.
  wgrad    split-K GEMM over output pixels into float32 partials, with output tiles of one or two
           taps' channels; the split that finishes a tile last sums its partials (in split order)
           into the (C_out, C_in, k, k) gradient, so no reduction launch follows.
  dgrad    implicit GEMM over input pixels that gathers the output gradient through the
           neighbour table, run per parity class of input pixel (a stride-2 conv reads a pixel
           only through taps of one parity, so each class loops over its own taps only).
The gradients take the forward's output for the ReLU mask, or None for a gradient already masked.
The launch helpers here (precision, table checks, 64-bit offsets, SM count) serve the image stage
(triton_image) too.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from ._device import custom_op, on_input_device
from . import _replay, compact
from .compact import accumulator_dtype, check_tables, gemm_weight, gemm_weight_transposed
from .triton_tables import _neighbour_table, _padded_channels, check_neighbours, layouts_args, new_weight_layouts
from .triton_configs import (CONV_KEY, FWD_SHARED, WGRAD_SHARED, accumulator, autotune, cdiv, check_interpretable,
                             conv_dgrad_configs, conv_fwd_configs, conv_wgrad_configs, interpreting, pow2,
                             prune_by_c_in, prune_by_c_out, rows_bucket, triton_supports)

__all__ = ["conv_relu_compact", "conv_relu_wgrad_compact", "conv_relu_dgrad", "weight_layouts"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    from .triton_tables import _weight_layouts_block

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
        """grad * relu'(out); with GRAD_MASKED the gradient comes already multiplied. As in torch's
        ReLU backward, the gradient passes where out is NaN (NaN <= 0 is false)."""
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        if not GRAD_MASKED:
            r = tl.load(out_ptr + offs, mask=mask, other=0.0)
            g = tl.where(~(r <= 0), g, tl.zeros_like(g))
        return g

    @autotune(conv_fwd_configs(), CONV_KEY, prune_by_c_out, shared=FWD_SHARED)
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
            acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)   # NaN stays NaN, as in torch.relu
        tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @autotune(conv_wgrad_configs(), CONV_KEY + ["TAPS"], prune_by_c_out, shared=WGRAD_SHARED)
    @triton.jit
    def _conv_relu_wgrad_kernel(src_ptr, grad_ptr, out_ptr, partial_ptr, nbr_ptr, w_out_ptr, counter_ptr, rows_total,
                                rows_per_cta, splits, ROWS_BUCKET,
                                C_IN: tl.constexpr, C_OUT: tl.constexpr, IN_SIDE: tl.constexpr,
                                KSIZE: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr, TAPS: tl.constexpr,
                                GRAD_MASKED: tl.constexpr, WIDE: tl.constexpr,
                                ACC: tl.constexpr, PRECISION: tl.constexpr, EPI_ROWS: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """partial[split] (k*k*C_in, C_out) = im2col(rows of this split)^T @ (grad * relu'); the
        split that finishes a tile last sums the tile's partials into w_out (C_out, C_in, k, k),
        in its dtype (_last_arrival, _sum_splits).

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
        blocks = rows_per_cta // BLOCK_R   # rows_per_cta: a multiple of every BLOCK_R
        for r0 in range(0, blocks):
            rows, row_ok = _row_block(split * blocks + r0, rows_total, BLOCK_R, WIDE)
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
        KK: tl.constexpr = KSIZE * KSIZE
        part_offs = (tap * C_IN + ch)[:, None] * C_OUT + cols[None, :]
        split_stride = KK * C_IN * C_OUT
        ok = (ch < C_IN)[:, None] & col_ok[None, :]
        tl.store(partial_ptr + split * split_stride + part_offs, acc.to(partial_ptr.dtype.element_ty), mask=ok)
        if TAPS == 2:
            tl.store(partial_ptr + split * split_stride + part_offs + C_IN * C_OUT,
                     acc2.to(partial_ptr.dtype.element_ty), mask=ok & has2)
        counter = counter_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if _last_arrival(counter, splits):
            # EPI_ROWS channels at a time: the accumulators' registers are not needed twice
            for t in tl.static_range(TAPS):
                for c0 in range(0, BLOCK_K, EPI_ROWS):
                    chs = (tl.program_id(0) % CB) * BLOCK_K + c0 + tl.arange(0, EPI_ROWS)
                    k_ok = (chs < C_IN)[:, None] & col_ok[None, :] & (tap + t < KK)
                    w = _sum_splits(partial_ptr, split_stride, splits,
                                    ((tap + t) * C_IN + chs)[:, None] * C_OUT + cols[None, :], k_ok)
                    tl.store(w_out_ptr + cols[None, :] * (C_IN * KK) + chs[:, None] * KK + (tap + t),
                             w.to(w_out_ptr.dtype.element_ty), mask=k_ok)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")   # zero again for the next launch

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

    @autotune(conv_dgrad_configs(), CONV_KEY, prune_by_c_in)
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

    # ---- the weight's GEMM layouts ----------------------------------------------------------------
    # one config, through the package's autotuner: a plan can record its launch (scott_kernels._replay)
    @autotune([triton.Config({}, num_warps=4)], key=[], shared=None)
    @triton.jit
    def _weight_layouts_kernel(w_ptr, gemm_ptr, t_ptr, total, C_OUT: tl.constexpr, C_IN: tl.constexpr,
                               KK: tl.constexpr, CW: tl.constexpr, BLOCK: tl.constexpr):
        """From weight (C_out, C_in, k, k): the forward GEMM's (k*k*C_in, C_out) operand and the
        input gradient's (k*k*C_out, CW) one (channels padded to CW with zeros), in one pass
        over the latter's elements (tap, co, cw)."""
        _weight_layouts_block(w_ptr, gemm_ptr, t_ptr, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), total,
                              C_OUT, C_IN, KK, CW)

    # ---- the weight gradient from its partials, in the split that finishes a tile last -------------
    @triton.jit
    def _last_arrival(counter_ptr, splits):
        """Whether this CTA is the last of the ``splits`` CTAs that share an output tile (and its
        zeroed counter) to finish: their partials are then all in memory. Every thread's partial
        store precedes the CTA's arrival (the barrier), the arrival releases them and the last
        one acquires the others' (acq_rel at GPU scope): the pattern of a serial split-K
        semaphore, no spinning."""
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        return arrived == splits - 1

    @triton.jit
    def _sum_splits(part_ptr, split_stride, splits, offs, ok):
        """The sum over ``splits`` of the partials at ``offs``, in split order whichever CTA sums
        them (deterministic). The loads bypass L1 (.cg): other SMs wrote them."""
        total = tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        for _ in range(1, splits):
            part_ptr += split_stride   # 64-bit pointer arithmetic: no offset overflows
            total += tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        return total


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    # float32 follows torch's convolution setting (TF32 on tensor cores unless disabled; a launch
    # plan's key holds the setting: triton_backend)
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _check_tables(name: str, src: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                  image: bool = False) -> None:
    if src.dtype not in _DTYPES and not (image and src.dtype == torch.uint8):
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {src.dtype}")
    check_interpretable(name, src.dtype)
    check_tables(name, src, slot, tile_pos)
    if not triton_supports(src.device):
        raise RuntimeError(f"{name}: Triton does not run on {src.device} here "
                           "(a CUDA GPU of compute capability 8.0 or newer, or the CPU with TRITON_INTERPRET=1)")


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


def _k_block(channels: int) -> int:
    """A conv GEMM's K step over one tap's channels: 16 to 64, a power of two."""
    return min(64, max(16, pow2(channels)))


def conv_radius(in_side: int, k: int) -> int:
    """How many patches away a stride-2 k x k window (or its transpose) reaches."""
    return -(-(k // 2) // in_side)


# one zeroed int32 counter per output tile of a split weight gradient, per device, for launches
# on its default stream: the kernels leave every counter at zero, and those launches run in order
_ARRIVAL_COUNTERS: dict = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` zeroed counters for a weight-gradient launch on ``device``'s current
    stream (see _last_arrival). On the default stream one buffer is kept between launches, so a
    backward costs no fill launch. On any other stream each launch gets fresh zeros: that is where
    CUDA graph capture and torch.compile's CUDA-graph warm-up run, with their allocations in a
    graph's private memory pool, and a buffer kept from there could be handed to another of the
    pool's tensors (a capture's own counters are replayed with it)."""
    if device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        return torch.zeros(count, dtype=torch.int32, device=device)
    counters = _ARRIVAL_COUNTERS.get(device)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[device] = counters
    return _replay.persistent(counters)   # a launch plan keeps the buffer (each launch leaves it zeroed)


def _weight_layouts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of ``weight_layouts``, for callers already inside an op."""
    w_gemm, w_t = new_weight_layouts("triton_conv_weight_layouts", weight)
    check_interpretable("triton_conv_weight_layouts", weight.dtype)
    total, block = w_t.numel(), 1024
    if total:
        _weight_layouts_kernel[(cdiv(total, block),)](weight.contiguous(), w_gemm, w_t, total, BLOCK=block,
                                                             **layouts_args(weight))
    return w_gemm, w_t


@custom_op("scott_kernels::triton_conv_weight_layouts", mutates_args=())
def weight_layouts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A compact stage's weight (C_out, C_in, k, k) in its two GEMM layouts (``new_weight_layouts``),
    in one launch. The forward makes them once; the autograd keeps the second for the input
    gradient. (With ``num_visible``, the tables launch lays out the first compact stage's weight
    instead: ``triton_tables.visible_tables``.)"""
    return _weight_layouts(weight)


@weight_layouts.register_fake
def _(weight):
    return new_weight_layouts("triton_conv_weight_layouts", weight)


def _layout(name: str, given: torch.Tensor | None, weight: torch.Tensor, shape: tuple) -> torch.Tensor | None:
    """A weight layout the caller made (checked), or None."""
    if given is None:
        return None
    if tuple(given.shape) != shape or given.dtype != weight.dtype or given.device != weight.device:
        raise ValueError(f"{name}: expected a {weight.dtype} {shape} weight layout on {weight.device} "
                         f"(weight_layouts), got {tuple(given.shape)} {given.dtype} on {given.device}")
    return given.contiguous()


def wgrad_operands(grad: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(grad, out, GRAD_MASKED) for a weight-gradient kernel: the gradient in the weight's dtype,
    and the forward's output for the ReLU mask, or the gradient again when already masked."""
    grad = grad.to(weight.dtype).contiguous()
    if out is None:
        return grad, grad, True
    return grad, out.contiguous(), False


def _stage_neighbours(name: str, nbr: torch.Tensor | None, slot: torch.Tensor, tile_pos: torch.Tensor,
                      radius: int) -> torch.Tensor:
    """The stage's neighbour table: the one given (checked), or built now."""
    if nbr is None:
        return _neighbour_table(slot, tile_pos, radius)
    return check_neighbours(name, nbr, tile_pos, radius)


def _sm_count(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return compact._multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def _rows_per_cta(rows: int, tiles: int, device: torch.device) -> int:
    """Output pixels each weight-gradient CTA reduces over: a multiple of 128 (every BLOCK_R),
    as many parts as keep ``tiles`` x parts CTAs within one wave at two per SM, with the rows
    spread evenly over them (the wave lasts as long as its longest CTA). Each part writes its own
    float32 partial; the last part to finish a tile sums them in part order: deterministic (the
    only atomic is the arrival count). One part off the GPU."""
    sms = _sm_count(device)
    parts = 1 if sms is None else max(1, 2 * sms // tiles)
    return max(128, -(-(-(-rows // parts)) // 128) * 128)


# --------------------------------------------------------------------------------------------
# conv + ReLU of a compact source (the ops in triton_backend take images too)
# --------------------------------------------------------------------------------------------
def _conv_relu_compact(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                       in_side: int, relu: bool = True, nbr: torch.Tensor | None = None,
                       w_gemm: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv(src, weight, stride 2, pad k//2)) of a compact (M, q, q, C) source at the visible
    patches -> (M, q/2, q/2, C_out); the plain convolution with ``relu=False``. ``nbr``: the
    stage's neighbour table (triton_tables.neighbour_table), built here when not given; ``w_gemm``
    the weight's forward layout (weight_layouts), likewise."""
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
    radius = conv_radius(in_side, k)
    nbr = _stage_neighbours("triton_conv_relu", nbr, slot, tile_pos, radius)
    w_gemm = _layout("triton_conv_relu", w_gemm, weight, (k * k * c_in, c_out))
    if w_gemm is None:
        w_gemm = gemm_weight(weight)
    grid = lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_N"]))
    _conv_relu_fwd_kernel[grid](
        src, w_gemm, out, nbr, rows, rows_bucket(rows), C_IN=c_in, C_OUT=c_out, IN_SIDE=in_side, KSIZE=k,
        R=radius, BLOCK_K=_k_block(c_in), WIDE=_wide(src, out), RELU=relu, ACC=accumulator(weight.dtype),
        PRECISION=_precision(weight.dtype))
    return out


# exported: launches on its inputs' device when called directly too
conv_relu_compact = on_input_device(_conv_relu_compact)


def _conv_relu_wgrad_compact(grad: torch.Tensor, out: torch.Tensor | None, src: torch.Tensor, weight: torch.Tensor,
                             slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int,
                             nbr: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu_compact with respect to its (C_out, C_in, k, k) weight. ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it."""
    _check_tables("triton_conv_relu_wgrad", src, slot, tile_pos)
    src = src.contiguous()
    c_in = _source_geometry(src, slot, in_side, False)
    c_out, _, k, _ = weight.shape
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    rows = num_tiles * side * side
    if rows == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    grad, out, masked = wgrad_operands(grad, out, weight)
    acc, precision = accumulator(weight.dtype), _precision(weight.dtype)
    part_dtype = accumulator_dtype(weight.dtype)
    radius = conv_radius(in_side, k)
    nbr = _stage_neighbours("triton_conv_relu_wgrad", nbr, slot, tile_pos, radius)
    block_k = _k_block(c_in)
    # two taps per CTA where a tap's channels fit one block (the gradient tile then serves both)
    taps = 2 if c_in <= block_k and k > 1 else 1
    k_tiles = cdiv(k * k, taps) * cdiv(c_in, block_k)
    per_cta = _rows_per_cta(rows, k_tiles * cdiv(c_out, 128), src.device)
    splits = cdiv(rows, per_cta)
    partial = torch.empty((splits, k * k * c_in, c_out), dtype=part_dtype, device=src.device)
    w_grad = torch.empty((c_out, c_in, k, k), dtype=weight.dtype, device=src.device)
    counters = arrival_counters(src.device, k_tiles * cdiv(c_out, 16))   # BLOCK_N >= 16
    grid = lambda meta: (k_tiles, cdiv(c_out, meta["BLOCK_N"]), splits)
    _conv_relu_wgrad_kernel[grid](
        src, grad, out, partial, nbr, w_grad, counters, rows, per_cta, splits, rows_bucket(rows),
        C_IN=c_in, C_OUT=c_out, IN_SIDE=in_side, KSIZE=k, R=radius, BLOCK_K=block_k, TAPS=taps, GRAD_MASKED=masked,
        WIDE=_wide(src, grad), ACC=acc, PRECISION=precision, EPI_ROWS=16)
    return w_grad


# exported: launches on its inputs' device when called directly too
conv_relu_wgrad_compact = on_input_device(_conv_relu_wgrad_compact)


def _conv_relu_dgrad(grad: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, slot: torch.Tensor,
                     tile_pos: torch.Tensor, in_side: int, nbr: torch.Tensor | None = None,
                     w_gemm: torch.Tensor | None = None, w_t: torch.Tensor | None = None) -> torch.Tensor:
    """The body of ``conv_relu_dgrad``, for callers already inside an op."""
    _check_tables("triton_conv_relu_dgrad", grad, slot, tile_pos)
    c_out, c_in, k, _ = weight.shape
    c_w = _padded_channels(c_in)   # weight rows of whole 16-byte vectors
    weight_t = _layout("triton_conv_relu_dgrad", w_t, weight, (k * k * c_out, c_w))
    if weight_t is None or weight.dtype != grad.dtype:
        weight_t = gemm_weight_transposed(weight.to(grad.dtype))
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
    radius = conv_radius(in_side, k)
    nbr = _stage_neighbours("triton_conv_relu_dgrad", nbr, slot, tile_pos, radius)
    class_rows = rows // 4
    grid = lambda meta: (cdiv(class_rows, meta["BLOCK_M"]), cdiv(c_in, meta["BLOCK_N"]), 4)
    _conv_relu_dgrad_kernel[grid](
        grad, out, weight_t, dsrc, nbr, class_rows, rows_bucket(rows), C_IN=c_in, CW=c_w, C_OUT=c_out, IN_SIDE=in_side,
        KSIZE=k, R=radius, GRAD_MASKED=masked, WIDE=_wide(grad, dsrc), INTERPRET=interpreting(),
        ACC=accumulator(grad.dtype), PRECISION=_precision(grad.dtype))
    return dsrc


@custom_op("scott_kernels::triton_conv_relu_dgrad", mutates_args=())
def conv_relu_dgrad(grad: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, slot: torch.Tensor,
                    tile_pos: torch.Tensor, in_side: int, nbr: torch.Tensor | None = None,
                    w_gemm: torch.Tensor | None = None, w_t: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu with respect to a compact source -> (M, q, q, C_in). ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it. ``nbr``
    and ``w_t`` (the weight's input-gradient layout, weight_layouts) are the forward's, when it
    made them; ``w_gemm`` (its forward layout) is not read."""
    return _conv_relu_dgrad(grad, out, weight, slot, tile_pos, in_side, nbr, w_gemm, w_t)


@conv_relu_dgrad.register_fake
def _(grad, out, weight, slot, tile_pos, in_side, nbr=None, w_gemm=None, w_t=None):
    return grad.new_empty((tile_pos.shape[0], in_side, in_side, weight.shape[1]))
