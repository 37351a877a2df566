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
channels (or kernel rows of the packed image), summed by the split that finishes each tile last;
conv dgrad is an implicit GEMM over input pixels that gathers the output gradient through the
neighbour table, run per parity class of input pixel (a stride-2 conv reads a pixel only through
taps of one parity, so each class loops over its own taps only). The gradient ops take the
forward's output for the ReLU mask, or None for a gradient already masked. The tokenizer runs each
stage as conv (``relu=False``) -> pool of relu(conv) (``max_blur_pool(..., relu=True)``; the last
one fused with the token epilogue): the same function, but the pool's backward multiplies by ReLU'
as it writes the conv gradient, so the conv gradients take it as masked and never read the conv
output.
Geometry (channels, sides, kernel size) is compile-time; offsets are 32-bit unless a tensor
reaches 2^30 elements.

Every kernel sits behind a ``torch.library.custom_op`` with a fake implementation and autograd,
so the backend traces under torch.compile. With ``num_visible`` (visible patches per row) given,
the tables are built in one launch, without a host synchronisation, which also builds the first
compact stage's neighbour table and lays out its weight.

Modules: triton_tables (the visible and neighbour tables, the weight layout pass), triton_conv (the
compact-source conv kernels, the weight gradient's split sums and their arrival counters, the
input gradient op), triton_image (the image stage: packing, forward, weight gradient,
``conv_image`` ops), triton_pool (MaxBlurPool and the fused token epilogue), triton_configs
(autotune configs and their pruning). This module holds the stage ops that take either source
(``conv_relu``, ``conv_relu_wgrad``), their autograd wiring and the tokenizer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._device import custom_op
from .compact import compute_dtype, register_stage_autograd, tokenize_compact, visible_tables
from .triton_configs import triton_supports
from .triton_conv import conv_radius, conv_relu_compact, conv_relu_dgrad, conv_relu_wgrad_compact, weight_layouts
from .triton_image import conv_image, conv_image_wgrad, conv_relu_image, conv_relu_wgrad_image  # noqa: F401
from .triton_pool import max_blur_pool, max_blur_pool_backward, pool_tokens_apply
from .triton_tables import neighbour_table, tables_for

__all__ = ["triton_tokenize", "triton_supports", "visible_tables"]
# The backend's op set is importable from here: conv_relu, conv_relu_wgrad (below), conv_relu_dgrad,
# conv_image, conv_image_wgrad, max_blur_pool, max_blur_pool_backward.


# --------------------------------------------------------------------------------------------
# The stage ops: a conv reading images or a compact activation
# --------------------------------------------------------------------------------------------
@custom_op("scott_kernels::triton_conv_relu", mutates_args=())
def conv_relu(src: torch.Tensor, weight: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
              in_side: int, src_is_image: bool, pixel_norm: torch.Tensor | None = None,
              relu: bool = True, nbr: torch.Tensor | None = None, w_gemm: torch.Tensor | None = None,
              w_t: torch.Tensor | None = None) -> torch.Tensor:
    """relu(conv(src, weight, stride 2, pad k//2)) at the visible patches -> (M, q/2, q/2, C_out);
    the plain convolution with ``relu=False``.

    Computes in ``weight.dtype``; ``src`` is the images (B, C, H, W), of that dtype or, with
    ``pixel_norm`` (mean, 1/std per channel), uint8, or a compact (M, q, q, C) activation.
    A compact source's tables and weight layouts, which the autograd keeps for the gradients
    (each built inside when not given): ``nbr`` its neighbour table
    (``triton_tables.neighbour_table``), ``w_gemm`` and ``w_t`` the weight's forward and
    input-gradient GEMM layouts (``triton_conv.weight_layouts``).
    """
    if src_is_image:
        return conv_relu_image(src, weight, slot, tile_pos, in_side, pixel_norm, relu)[0]
    return conv_relu_compact(src, weight, slot, tile_pos, in_side, relu, nbr, w_gemm)


@conv_relu.register_fake
def _(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None, relu=True, nbr=None, w_gemm=None,
      w_t=None):
    c_out = weight.shape[0]
    return weight.new_empty((tile_pos.shape[0], in_side // 2, in_side // 2, c_out))


@custom_op("scott_kernels::triton_conv_relu_wgrad", mutates_args=())
def conv_relu_wgrad(grad: torch.Tensor, out: torch.Tensor | None, src: torch.Tensor, weight: torch.Tensor,
                    slot: torch.Tensor, tile_pos: torch.Tensor, in_side: int, src_is_image: bool,
                    pixel_norm: torch.Tensor | None = None, nbr: torch.Tensor | None = None,
                    w_gemm: torch.Tensor | None = None, w_t: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of conv_relu with respect to its (C_out, C_in, k, k) weight. ``out`` is the
    forward's output (for the ReLU mask), or None when ``grad`` is already masked by it. ``nbr``:
    the forward's neighbour table, if it had one (the weight layouts are not read)."""
    if src_is_image:
        return conv_relu_wgrad_image(grad, out, src, weight, slot, tile_pos, in_side, pixel_norm)
    return conv_relu_wgrad_compact(grad, out, src, weight, slot, tile_pos, in_side, nbr)


@conv_relu_wgrad.register_fake
def _(grad, out, src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None, nbr=None, w_gemm=None,
      w_t=None):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


register_stage_autograd(conv_relu, conv_relu_wgrad, conv_relu_dgrad, max_blur_pool, max_blur_pool_backward)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------
# Each stage runs as conv (no ReLU) -> pool of relu(conv): the same function, but the pool's
# backward, which reads the conv output anyway, returns the gradient already multiplied by ReLU',
# so the conv gradients read neither a mask nor the conv output. The image stage keeps its packed
# images for the weight gradient.
def _stage_conv(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm, nbr=None, layouts=None):
    if src_is_image:
        return conv_image(src, weight, slot, tile_pos, in_side, pixel_norm, False)[0]
    # one neighbour table for the stage's forward and both gradients, and the weight's two GEMM
    # layouts in one launch (the input gradient's kept for the backward; made from the weight's
    # value: the weight's own gradient comes from conv_relu's backward), unless the tables
    # launch built them
    if nbr is None:
        nbr = neighbour_table(slot, tile_pos, conv_radius(in_side, weight.shape[-1]))
    w_gemm, w_t = layouts if layouts is not None else weight_layouts(weight.detach())
    return conv_relu(src, weight, slot, tile_pos, in_side, False, pixel_norm, False, nbr, w_gemm, w_t)


def _stage_pool(act, slot, tile_pos):
    return max_blur_pool(act, slot, tile_pos, True)


def _stages(weights: Sequence[torch.Tensor], patch_size: int, dtype: torch.dtype) -> tuple:
    """(tables, conv): the table builder and stage conv of a tokenize_compact run computing in
    ``dtype``. With the visible count given, the tables launch also builds the first compact
    stage's neighbour table (the second conv's, reading the first pool's output: patches of side
    patch_size / 4) and lays out its weight in ``dtype`` for both GEMMs, which that stage's conv
    then uses: one launch fewer than building them apart."""
    if len(weights) < 2:
        return (lambda *args: tables_for(*args)[:2]), _stage_conv
    radius = conv_radius(patch_size // 4, weights[1].shape[-1])
    built = {}

    def tables(keep, batch, grid_h, grid_w, device, num_visible=None):
        slot, tile_pos, built["nbr"], built["layouts"] = tables_for(keep, batch, grid_h, grid_w, device, num_visible,
                                                                    radius, weights[1].detach(), dtype)
        return slot, tile_pos

    def conv(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm):
        first = not src_is_image and in_side == patch_size // 4
        nbr = built.pop("nbr", None) if first else None
        layouts = built.pop("layouts", None) if first else None
        return _stage_conv(src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm, nbr, layouts)

    return tables, conv


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
    tables, stage_conv = _stages(weights, patch_size, compute_dtype(x, weights))
    if norm is None and pos_embed is None and mask_token is None and keep is None:
        return tokenize_compact(stage_conv, _stage_pool, x, weights, keep, patch_size, num_visible, packed,
                                pixel_norm, tables=tables)
    # the last pool writes the tokens in their final layout (masked rows included), so no scatter
    # or zero fill follows it
    dense = keep is None or not packed
    # under autocast the unfused LayerNorm runs (and returns) float32: so do the fused tokens
    out_dtype = torch.float32 if norm is not None and torch.is_autocast_enabled(x.device.type) else None
    fill = mask_token if keep is not None and not packed else None

    def last_pool(act, slot, tile_pos):
        return pool_tokens_apply(act, slot, tile_pos, norm, pos_embed, fill, dense, out_dtype, relu=True)

    return tokenize_compact(stage_conv, _stage_pool, x, weights, keep, patch_size, num_visible, packed, pixel_norm,
                            last_pool=last_pool, tables=tables)
