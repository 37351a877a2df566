"""Triton kernels of the image stage (the first convolution, reading the images; see
triton_backend for the compact layout and the tables).

The images are packed once (masked patches zeroed, uint8 normalised, channels padded to a power
of two, zero border) into (B, H + 2p, W', CP), so a kernel row of a window is one contiguous run
of elements. The forward is an implicit GEMM whose K step is one kernel row of the packed image,
ReLU in the epilogue (unless relu=False); ``conv_image`` returns the packed copy too, and its
autograd keeps it (not the images) for the weight gradient, a split-K GEMM over output pixels into
float32 partials with output tiles of kernel rows of the packed image (the split that finishes a
tile last sums them into the gradient). The packing launch also writes the GEMM's weight. The
input gradient (of float images) is the compact one (triton_conv.conv_relu_dgrad), scattered back
to the images.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

from ._device import custom_op, on_input_device
from . import compact
from .compact import accumulator_dtype
from .triton_configs import (IMAGE_FWD_SHARED, IMAGE_KEY, IMAGE_WGRAD_SHARED, accumulator, autotune, cdiv, check_interpretable,
                             image_fwd_configs, image_wgrad_configs, prune_by_c_out, prune_image_wgrad,
                             rows_bucket)
from .triton_conv import (_check_tables, _precision, _rows_per_cta, _source_geometry, _wide, arrival_counters,
                          conv_relu_dgrad, wgrad_operands)
from .triton_tables import _packed_geometry, new_packed

__all__ = ["conv_image", "conv_image_wgrad", "conv_relu_image", "conv_relu_wgrad_image"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    from .triton_conv import _last_arrival, _relu_grad, _row_block, _sum_splits
    from .triton_tables import _image_weight_block, _pack_block

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

    @autotune(image_fwd_configs(), IMAGE_KEY, prune_by_c_out, shared=IMAGE_FWD_SHARED)
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
        # the taps past KSIZE have zero weights but read real pixels, and 0 * Inf or 0 * NaN is
        # NaN: they load as 0, so a non-finite pixel reaches only the outputs torch's conv feeds
        TAIL: tl.constexpr = KSIZE * CP < KROW
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for ky in range(KSIZE):
            if TAIL:
                a = tl.load(packed_ptr + (base + ky * ROW_STRIDE)[:, None] + kc[None, :],
                            mask=(kc < KSIZE * CP)[None, :], other=0.0)
            else:
                a = tl.load(packed_ptr + (base + ky * ROW_STRIDE)[:, None] + kc[None, :])
            w = tl.load(w_ptr + (ky * KROW + kc)[:, None] * C_OUT + cols[None, :], mask=col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
        if RELU:
            acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)   # NaN stays NaN, as in torch.relu
        tl.store(out_ptr + rows[:, None] * C_OUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    # one config, through the package's autotuner: a plan can record its launch (scott_kernels._replay)
    @autotune([triton.Config({}, num_warps=4)], key=[], shared=None)
    @triton.jit
    def _pack_image_kernel(x_ptr, packed_ptr, slot_ptr, norm_ptr, w_ptr, w_out_ptr, num_tiles, GH, GW, H, W, HP, WP,
                           s_b, s_c, s_h, s_w, w_total, w_share, C: tl.constexpr, CP: tl.constexpr, P: tl.constexpr,
                           PAD: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK_W: tl.constexpr,
                           WEIGHT: tl.constexpr, C_OUT: tl.constexpr, KSIZE: tl.constexpr, KXE: tl.constexpr,
                           W_BLOCK: tl.constexpr):
        """packed (B, HP, WP, CP)[b, y + PAD, x + PAD, c] = image[b, c, y, x] (normalised with
        NORMALIZE) where (y, x) is in the image and its patch visible, else 0: the image stage's
        masking, padding and normalisation, done once. With WEIGHT each program also writes its
        share (w_share elements) of the GEMM's weight: w_out (k, KXE, CP, C_out) = weight
        (C_out, C_in, k, k) at (ky, kx, ci, co), 0 at the padded taps (kx >= k) and channels
        (ci >= C_in); one launch instead of two."""
        if WEIGHT:
            first = (tl.program_id(0) * tl.cdiv(WP, BLOCK_W) + tl.program_id(1)) * w_share
            for e0 in range(first, first + w_share, W_BLOCK):
                _image_weight_block(w_ptr, w_out_ptr, e0 + tl.arange(0, W_BLOCK), w_total, first + w_share, C, CP,
                                    C_OUT, KSIZE, KXE)
        _pack_block(x_ptr, packed_ptr, slot_ptr, norm_ptr, tl.program_id(0), tl.program_id(1) * BLOCK_W, num_tiles,
                    GH, GW, H, W, HP, WP, s_b, s_c, s_h, s_w, C, CP, P, PAD, NORMALIZE, ACC, BLOCK_W, False)

    @autotune(image_wgrad_configs(), IMAGE_KEY, prune_image_wgrad, shared=IMAGE_WGRAD_SHARED)
    @triton.jit
    def _conv_relu_image_wgrad_kernel(packed_ptr, grad_ptr, out_ptr, partial_ptr, tile_pos_ptr, rows_total, num_pos,
                                      ROWS_BUCKET, rows_per_cta, w_out_ptr, counter_ptr, splits,
                                      CELLS: tl.constexpr, GW: tl.constexpr, ROW_STRIDE: tl.constexpr,
                                      IMG_STRIDE: tl.constexpr, C_OUT: tl.constexpr, OUT_SIDE: tl.constexpr,
                                      KYP: tl.constexpr, CP: tl.constexpr, KROW: tl.constexpr,
                                      C_IN: tl.constexpr, KSIZE: tl.constexpr,
                                      GRAD_MASKED: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr,
                                      PRECISION: tl.constexpr, EPI_ROWS: tl.constexpr,
                                      BLOCK_KY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """partial[split] (KYP * KROW, C_out): the image stage's weight gradient over the packed
        image's kernel rows, over rows_per_cta output pixels (a multiple of BLOCK_R) per split; the
        split that finishes a tile last sums the tile's partials at the real taps and channels
        into w_out (C_out, C_in, k, k), in its dtype (triton_conv._last_arrival, _sum_splits)."""
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
        part_offs = k_rows[:, None] * C_OUT + cols[None, :]
        split_stride = KYP * KROW * C_OUT
        tl.store(partial_ptr + split * split_stride + part_offs, acc.to(partial_ptr.dtype.element_ty),
                 mask=col_ok[None, :])
        counter = counter_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if _last_arrival(counter, splits):
            # EPI_ROWS rows at a time (the accumulator's registers are not needed twice); a packed
            # kernel row is KROW // CP taps of CP channels, and only the real ones are weights
            for r0 in range(0, BK, EPI_ROWS):
                w_rows = tl.program_id(0) * BK + r0 + tl.arange(0, EPI_ROWS)
                ky = w_rows // KROW
                kx = (w_rows % KROW) // CP
                ci = w_rows % CP
                ok = ((ky < KSIZE) & (kx < KSIZE) & (ci < C_IN))[:, None] & col_ok[None, :]
                w = _sum_splits(partial_ptr, split_stride, splits, w_rows[:, None] * C_OUT + cols[None, :], ok)
                w_offs = cols[None, :] * (C_IN * KSIZE * KSIZE) + ((ci * KSIZE + ky) * KSIZE + kx)[:, None]
                tl.store(w_out_ptr + w_offs, w.to(w_out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")   # zero again for the next launch


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
# ---- the image stage: a packed, padded, masked copy of the images ----------------------------
def _pack_image(x: torch.Tensor, slot: torch.Tensor, num_tiles: int, in_side: int, k: int,
                norm: torch.Tensor, normalize: bool, dtype: torch.dtype, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """(packed images, their geometry, the GEMM's (k * KROW, C_out) weight, zero at the padded
    taps and channels, when ``weight`` is given: written by the same launch)."""
    B, C, H, W = x.shape
    # a packed row per program: few, busy programs
    packed, w_out, geo, block = new_packed(x, k, dtype, None if weight is None else weight.shape[0])
    grid = (B * geo["hp"], cdiv(geo["wp"], block))
    w_total, w_share, w_block = 0, 0, 64
    if weight is not None:
        w_total = w_out.numel()
        w_share = -(-w_total // (max(1, grid[0] * grid[1]) * w_block)) * w_block   # whole W_BLOCKs per program
    _pack_image_kernel[grid](
        x, packed, slot, norm, packed if weight is None else weight.contiguous(), packed if w_out is None else w_out,
        num_tiles, slot.shape[1], slot.shape[2], H, W, geo["hp"], geo["wp"], *x.stride(), w_total, w_share,
        C=C, CP=geo["cp"], P=in_side, PAD=geo["pad"], NORMALIZE=normalize, ACC=accumulator(dtype), BLOCK_W=block,
        WEIGHT=weight is not None, C_OUT=1 if weight is None else weight.shape[0], KSIZE=k, KXE=geo["kxe"],
        W_BLOCK=w_block)
    return packed, geo, w_out


def _image_args(packed: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, rows: int, geo: dict) -> tuple:
    return (tile_pos, rows, slot.numel(), rows_bucket(rows))


def _image_consts(slot: torch.Tensor, geo: dict) -> dict:
    """The image kernels' compile-time geometry: grid cells per image and per row, packed strides."""
    _, GH, GW = slot.shape
    hp, wp, cp = geo["hp"], geo["wp"], geo["cp"]
    return dict(CELLS=GH * GW, GW=GW, ROW_STRIDE=wp * cp, IMG_STRIDE=hp * wp * cp)


# --------------------------------------------------------------------------------------------
# conv + ReLU of the images
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


def _conv_relu_image(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                     in_side: int, pixel_norm: torch.Tensor | None, relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The image stage: packs the images, then the conv (+ ReLU) GEMM -> (out, packed)."""
    _check_tables("triton_conv_image", src, slot, tile_pos, image=True)
    c_in = _source_geometry(src, slot, in_side, True)
    c_out, _, k, _ = weight.shape
    if src.dtype != weight.dtype and src.dtype != torch.uint8:
        raise TypeError(f"triton_conv_image: src is {src.dtype} but weight is {weight.dtype}")
    check_interpretable("triton_conv_image", weight.dtype)
    num_tiles = tile_pos.shape[0]
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    norm, normalize = _norm_args(pixel_norm, src, c_in, weight)
    packed, geo, w_image = _pack_image(src, slot, num_tiles, in_side, k, norm, normalize, weight.dtype, weight)
    return _image_forward(packed, w_image, geo, slot, tile_pos, in_side, relu), packed


def _image_forward(packed: torch.Tensor, w_image: torch.Tensor, geo: dict, slot: torch.Tensor, tile_pos: torch.Tensor,
                   in_side: int, relu: bool) -> torch.Tensor:
    """The image stage's conv (+ ReLU) GEMM of packed images and the padded weight (in the compute
    dtype, as ``_pack_image`` writes them) -> (M, s, s, C_out)."""
    num_tiles, c_out, k = tile_pos.shape[0], w_image.shape[1], w_image.shape[0] // geo["krow"]
    side = in_side // 2
    rows = num_tiles * side * side
    out = torch.empty((num_tiles, side, side, c_out), dtype=w_image.dtype, device=packed.device)
    if rows == 0:
        return out
    grid = lambda meta: (cdiv(rows, meta["BLOCK_M"]), cdiv(c_out, meta["BLOCK_N"]))
    _conv_relu_image_fwd_kernel[grid](
        packed, w_image, out, *_image_args(packed, slot, tile_pos, rows, geo),
        **_image_consts(slot, geo), C_OUT=c_out, OUT_SIDE=side, KSIZE=k, CP=geo["cp"], KROW=geo["krow"],
        WIDE=_wide(packed, out), RELU=relu, ACC=accumulator(w_image.dtype), PRECISION=_precision(w_image.dtype))
    return out


# exported: launches on its inputs' device when called directly too
conv_relu_image = on_input_device(_conv_relu_image)


@custom_op("scott_kernels::triton_conv_image", mutates_args=())
def conv_image(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int,
               pixel_norm: torch.Tensor | None = None, relu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_relu of the images (B, C, H, W) -> (out, packed): ``packed`` (B, HP, WP, CP) is the
    masked, normalised, zero-padded copy of the images the kernels read, kept by the autograd for
    the weight gradient so that the backward does not pack the images again."""
    return _conv_relu_image(src, weight, slot, tile_pos, in_side, pixel_norm, relu)


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
    grad, out, masked = wgrad_operands(grad, out, weight)
    kyp, krow = geo["kyp"], geo["krow"]
    # sized for the two-kernel-row tiles that win at C_out = 64
    per_cta = _rows_per_cta(rows, max(1, kyp // 2) * cdiv(c_out, 64), packed.device)
    splits = cdiv(rows, per_cta)
    partial = torch.empty((splits, kyp * krow, c_out), dtype=accumulator_dtype(weight.dtype), device=packed.device)
    w_grad = torch.empty((c_out, c_in, k, k), dtype=weight.dtype, device=packed.device)
    counters = arrival_counters(packed.device, kyp * cdiv(c_out, 16))   # BLOCK_KY >= 1, BLOCK_N >= 16
    grid = lambda meta: (kyp // meta["BLOCK_KY"], cdiv(c_out, meta["BLOCK_N"]), splits)
    _conv_relu_image_wgrad_kernel[grid](
        packed, grad, out, partial, *_image_args(packed, slot, tile_pos, rows, geo), per_cta, w_grad, counters, splits,
        **_image_consts(slot, geo), C_OUT=c_out, OUT_SIDE=side, KYP=kyp, CP=geo["cp"], KROW=krow, C_IN=c_in, KSIZE=k,
        GRAD_MASKED=masked, WIDE=_wide(packed, grad), ACC=accumulator(weight.dtype), PRECISION=_precision(weight.dtype),
        EPI_ROWS=16)
    return w_grad


@custom_op("scott_kernels::triton_conv_image_wgrad", mutates_args=())
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


def _conv_relu_wgrad_image(grad: torch.Tensor, out: torch.Tensor | None, src: torch.Tensor, weight: torch.Tensor,
                           slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int,
                           pixel_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu_image with respect to its weight, packing the images (B, C, H, W)
    again (``conv_image_wgrad`` reuses the forward's packed copy instead). ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it."""
    _check_tables("triton_conv_relu_wgrad", src, slot, tile_pos, image=True)
    check_interpretable("triton_conv_relu_wgrad", weight.dtype)
    c_in = _source_geometry(src, slot, in_side, True)
    c_out, _, k, _ = weight.shape
    num_tiles = tile_pos.shape[0]
    side = in_side // 2
    rows = num_tiles * side * side
    if rows == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    slot, tile_pos = slot.contiguous(), tile_pos.contiguous()
    norm, normalize = _norm_args(pixel_norm, src, c_in, weight)
    packed, geo, _ = _pack_image(src, slot, num_tiles, in_side, k, norm, normalize, weight.dtype)
    return _image_wgrad(grad, out, packed, geo, weight, slot, tile_pos, in_side)


# exported: launches on its inputs' device when called directly too
conv_relu_wgrad_image = on_input_device(_conv_relu_wgrad_image)
