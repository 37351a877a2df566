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
so the backend traces under torch.compile. The tokenizer itself is one op per direction
(``tokenizer``, ``tokenizer_backward``), which call the stage bodies directly; the stage ops stay
for callers that compose stages. A plain eager call (no mode, subclass, transform, trace or
profiler: ``_device.dispatch_free``) runs the two ops' bodies itself, without their dispatch, and
from its second step on replays the launch plan recorded for its call signature
(``scott_kernels._replay``): the allocations and launches without the bodies' Python.
With ``num_visible`` (visible patches per row) given, the tables are built in one launch, without
a host synchronisation, which also builds the first compact stage's neighbour table, lays out its
weight and packs the images for the first stage: ten launches per training step.

Modules: triton_tables (the visible and neighbour tables, the weight layout pass), triton_conv (the
compact-source conv kernels, the weight gradient's split sums and their arrival counters, the
input gradient op), triton_image (the image stage: packing, forward, weight gradient,
``conv_image`` ops), triton_pool (MaxBlurPool and the fused token epilogue), triton_configs
(autotune configs and their pruning). This module holds the stage ops that take either source
(``conv_relu``, ``conv_relu_wgrad``), their autograd wiring and the tokenizer's two ops.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from ._device import custom_op, dispatch_free, on_input_device
from ._replay import Plans, global_state, tensor_signature
from .compact import accumulator_dtype, compact_to_image, compute_dtype, register_stage_autograd, visible_tables
from .triton_configs import compile_state, triton_supports
from .triton_conv import (_conv_relu_compact, _conv_relu_dgrad, _conv_relu_wgrad_compact, _weight_layouts, conv_radius,
                          conv_relu_dgrad)
from .triton_image import (_conv_relu_image, _conv_relu_wgrad_image, _image_forward, _image_geometry, _image_wgrad,
                           _norm_args, _packed_geometry, conv_image, conv_image_wgrad)
from .triton_pool import (_max_blur_pool, _max_blur_pool_backward, _pool_tokens, _pool_tokens_backward, max_blur_pool,
                          max_blur_pool_backward)
from .triton_tables import _neighbour_table, _padded_channels, tables_for

__all__ = ["triton_tokenize", "triton_supports", "visible_tables", "tokenizer", "tokenizer_backward", "conv_relu",
           "conv_relu_wgrad", "conv_relu_dgrad", "conv_image", "conv_image_wgrad", "max_blur_pool",
           "max_blur_pool_backward"]


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
        return _conv_relu_image(src, weight, slot, tile_pos, in_side, pixel_norm, relu)[0]
    return _conv_relu_compact(src, weight, slot, tile_pos, in_side, relu, nbr, w_gemm)


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
        return _conv_relu_wgrad_image(grad, out, src, weight, slot, tile_pos, in_side, pixel_norm)
    return _conv_relu_wgrad_compact(grad, out, src, weight, slot, tile_pos, in_side, nbr)


@conv_relu_wgrad.register_fake
def _(grad, out, src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm=None, nbr=None, w_gemm=None,
      w_t=None):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


register_stage_autograd(conv_relu, conv_relu_wgrad, conv_relu_dgrad, max_blur_pool, max_blur_pool_backward)


# --------------------------------------------------------------------------------------------
# The tokenizer: one op per direction
# --------------------------------------------------------------------------------------------
# The whole forward is one custom op and the whole backward another, each calling the stage
# bodies directly: an op per stage would pay the dispatcher's custom-op and autograd layers
# (about 25 us of host time each on a CPU core) ten times per training step, more than the GPU
# work of a small batch. The forward returns, after the tokens, what the backward reads:
#   slot, tile_pos, packed images, the L conv outputs (before ReLU), the L - 1 pooled
#   activations, per compact stage its neighbour table and input-gradient weight layout, and
#   the LayerNorm's input and (mean, 1/std) (empty without a norm).
# Each stage runs as conv (no ReLU) -> pool of relu(conv): the pool's backward, which reads the
# conv output anyway, returns the gradient already multiplied by ReLU', so the conv gradients
# read neither a mask nor the conv output.
def _stage_sides(patch_size: int, stages: int) -> list[int]:
    """Each stage's input patch side: the patch, then a quarter of it per stage."""
    return [patch_size // 4 ** i for i in range(stages)]


def _unpack_saved(saved: Sequence[torch.Tensor], stages: int) -> tuple:
    slot, tile_pos, packed_images = saved[:3]
    convs = saved[3:3 + stages]
    pooled = saved[3 + stages:2 + 2 * stages]
    tables = saved[2 + 2 * stages:2 * stages + 2 * stages]
    ln_x, stats = saved[4 * stages:4 * stages + 2]
    nbrs, w_ts = [None, *tables[0::2]], [None, *tables[1::2]]
    return slot, tile_pos, packed_images, convs, pooled, nbrs, w_ts, ln_x, stats


def _tokenize_forward(x, weights, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, patch_size, num_tiles,
                      num_visible, dense, eps, dtype, out_dtype) -> list[torch.Tensor]:
    B, _, H, W = x.shape
    GH, GW = H // patch_size, W // patch_size
    sides = _stage_sides(patch_size, len(weights))
    first = None
    if len(weights) > 1:   # the tables launch also builds the first compact stage's tables
        first = (conv_radius(sides[1], weights[1].shape[-1]), weights[1].detach(), dtype)
    # and packs the images (casting them and the image weight to the compute dtype as it stores)
    norm_table, normalize = _norm_args(pixel_norm, x, x.shape[1], weights[0])
    images = (x.detach(), norm_table, normalize, weights[0].detach(), patch_size, dtype)
    slot, tile_pos, first_nbr, first_layouts, packed = tables_for(keep, B, GH, GW, x.device, num_visible,
                                                                  *(first or (-1, None, None)), num_tiles=num_tiles,
                                                                  images=images)
    convs, pooled, tables = [], [], []
    for i, (weight, side) in enumerate(zip(weights, sides)):
        weight = weight if i == 0 and packed is not None else weight.to(dtype)   # (a no-op unless autocast)
        if i == 0 and packed is not None:
            packed_images, w_image, geo = packed
            out = _image_forward(packed_images, w_image, geo, slot, tile_pos, side, False)
        elif i == 0:
            act = x.to(dtype) if x.is_floating_point() else x
            out, packed_images = _conv_relu_image(act, weight, slot, tile_pos, side, pixel_norm, False)
        else:
            nbr, layouts = (first_nbr, first_layouts) if i == 1 else (None, None)
            if nbr is None:
                nbr = _neighbour_table(slot, tile_pos, conv_radius(side, weight.shape[-1]))
            if layouts is None:
                layouts = _weight_layouts(weight.detach())
            out = _conv_relu_compact(act, weight, slot, tile_pos, side, False, nbr, layouts[0])
            tables += [nbr, layouts[1]]
        convs.append(out)
        if i < len(weights) - 1:
            act = _max_blur_pool(out, slot, tile_pos, True)
            pooled.append(act)
    norm = eps is not None
    tokens, ln_x, stats = _pool_tokens(convs[-1], slot, tile_pos, ln_weight, ln_bias, pos_embed, mask_token,
                                       eps if norm else 0.0, norm, dense, out_dtype, True)
    return [tokens, slot, tile_pos, packed_images, *convs, *pooled, *tables, ln_x, stats]


@custom_op("scott_kernels::triton_tokenizer", mutates_args=())
def tokenizer(x: torch.Tensor, weights: list[torch.Tensor], keep: torch.Tensor | None,
              pixel_norm: torch.Tensor | None, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
              pos_embed: torch.Tensor | None, mask_token: torch.Tensor | None, patch_size: int, num_tiles: int,
              num_visible: int | None, dense: bool, eps: float | None, dtype: torch.dtype,
              out_dtype: torch.dtype) -> list[torch.Tensor]:
    """The triton tokenizer's forward in one op: [tokens, what its backward reads...] (see above).

    ``keep`` (B, N) bool or None (all visible), with ``num_tiles`` visible patches in all and, when
    given, ``num_visible`` in every row (then the tables take one launch and no host
    synchronisation). The token epilogue: a LayerNorm over D of epsilon ``eps`` (None: none; its
    weight and bias optional), ``pos_embed`` (N, D), ``mask_token`` (D,) filling the masked rows.
    Tokens (B, N, D) when ``dense``, else (B, num_visible, D), in ``out_dtype``; the convolutions
    compute in ``dtype``."""
    return _tokenize_forward(x, weights, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, patch_size,
                             num_tiles, num_visible, dense, eps, dtype, out_dtype)


@tokenizer.register_fake
def _(x, weights, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, patch_size, num_tiles, num_visible,
      dense, eps, dtype, out_dtype):
    B, C, H, W = x.shape
    GH, GW = H // patch_size, W // patch_size
    M, D = num_tiles, weights[-1].shape[0]
    sides = _stage_sides(patch_size, len(weights))
    new = functools.partial(x.new_empty, dtype=dtype)
    geo = _packed_geometry(H, W, weights[0].shape[-1], C)
    rows = B * GH * GW if dense else M
    convs = [new((M, s // 2, s // 2, w.shape[0])) for w, s in zip(weights, sides)]
    pooled = [new((M, s // 4, s // 4, w.shape[0])) for w, s in zip(weights[:-1], sides)]
    tables = []
    for w, s in zip(weights[1:], sides[1:]):
        nb = 2 * conv_radius(s, w.shape[-1]) + 1
        c_out, c_in, k, _ = w.shape
        tables += [x.new_empty((M, nb, nb), dtype=torch.int32), new((k * k * c_out, _padded_channels(c_in)))]
    saved = M if eps is not None else 0
    return [x.new_empty((B, rows // B, D), dtype=out_dtype), x.new_empty((B, GH, GW), dtype=torch.int32),
            x.new_empty((M,), dtype=torch.int64), new((B, geo["hp"], geo["wp"], geo["cp"])), *convs, *pooled, *tables,
            new((saved, D)), x.new_empty((saved, 2), dtype=accumulator_dtype(dtype))]


def _tokenize_backward(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs):
    """The body of ``tokenizer_backward``: None where a gradient is not wanted."""
    stages = len(weights)
    slot, tile_pos, packed_images, convs, pooled, nbrs, w_ts, ln_x, stats = _unpack_saved(saved, stages)
    ln_weight, _, pos_embed, mask_token = epilogue
    sides = _stage_sides(patch_size, stages)
    need_x, need_w, need_epilogue = needs[0], needs[1:1 + stages], needs[1 + stages:]
    epilogue_grads = [None] * 4
    last = convs[-1]
    if norm or pos_embed is not None or mask_token is not None:
        dact, *parts = _pool_tokens_backward(grad, last, ln_x, stats, slot, tile_pos, ln_weight, norm, dense,
                                             pos_embed is not None, mask_token is not None, True)
        epilogue_grads = [g.to(p.dtype) if p is not None and need else None
                          for g, p, need in zip(parts, epilogue, need_epilogue)]
    elif dense:   # the pool's backward reads each tile's row of the (B, N, D) gradient
        dact = _max_blur_pool_backward(grad, last, slot, tile_pos, True, True)
    else:
        dact = _max_blur_pool_backward(grad.reshape(last.shape[0], 1, 1, last.shape[3]), last, slot, tile_pos, True)
    grad_x, grad_w = None, [None] * stages
    for i in reversed(range(stages)):
        weight = weights[i].to(dtype)
        if need_w[i] and i == 0:
            geo = _image_geometry("triton_tokenizer_backward", slot, sides[0], weight, packed_images)
            grad_w[0] = _image_wgrad(dact, None, packed_images, geo, weight, slot, tile_pos, sides[0])
        elif need_w[i]:
            grad_w[i] = _conv_relu_wgrad_compact(dact, None, pooled[i - 1], weight, slot, tile_pos, sides[i], nbrs[i])
        if need_w[i]:
            grad_w[i] = grad_w[i].to(weights[i].dtype)
        if i and (need_x or any(need_w[:i])):
            dsrc = _conv_relu_dgrad(dact, None, weight, slot, tile_pos, sides[i], nbrs[i], None, w_ts[i])
            dact = _max_blur_pool_backward(dsrc, convs[i - 1], slot, tile_pos, True)
        elif not i and need_x:
            grad_x = compact_to_image(_conv_relu_dgrad(dact, None, weight, slot, tile_pos, sides[0]), tile_pos,
                                      x.shape)
            if pixel_norm is not None:
                grad_x = grad_x * pixel_norm[1].view(1, -1, 1, 1).to(grad_x.dtype)
            grad_x = grad_x.to(x.dtype)
    return [grad_x, *grad_w, *epilogue_grads]


@custom_op("scott_kernels::triton_tokenizer_backward", mutates_args=())
def tokenizer_backward(grad: torch.Tensor, saved: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                       pixel_norm: torch.Tensor | None, epilogue: list[torch.Tensor | None], patch_size: int,
                       dense: bool, norm: bool, dtype: torch.dtype, needs: list[bool]) -> list[torch.Tensor]:
    """Gradients of ``tokenizer`` from the tokens' gradient and its saved outputs: [images,
    *weights, LayerNorm weight, bias, pos_embed, mask token], each in its input's dtype, or an
    empty tensor where ``needs`` (one flag per gradient) says it is not wanted."""
    grads = _tokenize_backward(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs)
    # a fresh empty one each: an op's outputs may not alias one another
    return [g if g is not None else grad.new_empty((0,)) for g in grads]


@tokenizer_backward.register_fake
def _(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs):
    like = [x, *weights, *epilogue]
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else grad.new_empty((0,))
            for t, need in zip(like, needs)]


def _tokenizer_setup(ctx, inputs, output):
    x, weights, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, patch_size, _, _, dense, eps, dtype, \
        _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    _save(ctx, x, pixel_norm, weights, (ln_weight, ln_bias, pos_embed, mask_token), output, patch_size, dense, eps,
          dtype)


def _save(ctx, x, pixel_norm, weights, epilogue, output, patch_size, dense, eps, dtype):
    ctx.save_for_backward(x, pixel_norm, *weights, *epilogue, *output[1:])
    ctx.geometry = (len(weights), patch_size, dense, eps is not None, dtype)


def _grads(ctx, grad, needs_x, needs_w, needs_epilogue) -> tuple:
    """(d images, [d weights], [d epilogue tensors]) through the backward op; None where not wanted."""
    if grad is None or not (needs_x or any(needs_w) or any(needs_epilogue)):
        return None, [None] * len(needs_w), [None] * 4
    stages, patch_size, dense, norm, dtype = ctx.geometry
    x, pixel_norm, *rest = ctx.saved_tensors
    weights, epilogue, saved = rest[:stages], rest[stages:stages + 4], rest[stages + 4:]
    needs = [bool(needs_x), *map(bool, needs_w), *map(bool, needs_epilogue)]
    if dispatch_free(grad, x, pixel_norm, *weights, *epilogue):
        out = _backward_body(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs,
                             getattr(ctx, "forward_key", None))   # (set by an eager forward)
    else:
        out = tokenizer_backward(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs)
    out = [g if need else None for g, need in zip(out, needs)]
    return out[0], out[1:1 + stages], out[1 + stages:]


def _tokenizer_grads(ctx, grads):
    needs_x, needs_w, _, _, *needs_epilogue = ctx.needs_input_grad[:8]
    grad_x, grad_w, grad_epilogue = _grads(ctx, grads[0], needs_x, needs_w, needs_epilogue)
    return grad_x, grad_w, None, None, *grad_epilogue, *([None] * 7)


tokenizer.register_autograd(_tokenizer_grads, setup_context=_tokenizer_setup)


# Calls that need no dispatch run the ops' bodies under the inputs' device, replaying a launch
# plan recorded for the call's signature (scott_kernels._replay): the key holds every tensor's
# signature, the other arguments and the global state the bodies read; the backward's, its
# forward's key (which fixes the saved tensors) too.
_FORWARD_PLANS, _BACKWARD_PLANS = Plans(), Plans()


def _settings() -> tuple:
    """What the stage bodies read besides their arguments and ``global_state``: Triton's compile
    settings and torch's float32 convolution precision (TF32 or not)."""
    return (*compile_state(), torch.backends.cudnn.allow_tf32)


@on_input_device
def _forward_body(x, weights, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, *options):
    """(the forward op's outputs, the key of the call's plan)."""
    inputs = (x, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, *weights)
    key = (options, global_state(x.device), _settings(), *map(tensor_signature, inputs))
    return _FORWARD_PLANS.run(key, inputs, _tokenize_forward, x, weights, keep, pixel_norm, ln_weight, ln_bias,
                              pos_embed, mask_token, *options), key


@on_input_device
def _backward_body(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs, forward_key):
    if forward_key is None or not _FORWARD_PLANS.planned(forward_key):   # no plan fixes the saved tensors
        return _tokenize_backward(grad, saved, x, weights, pixel_norm, epilogue, patch_size, dense, norm, dtype, needs)
    inputs = (grad, x, pixel_norm, *weights, *epilogue, *saved)
    key = (forward_key, tuple(needs), global_state(grad.device), _settings(), tensor_signature(grad),
           *map(tensor_signature, inputs[1:3 + len(weights) + len(epilogue)]))
    return _BACKWARD_PLANS.run(key, inputs, _tokenize_backward, grad, saved, x, weights, pixel_norm, epilogue,
                               patch_size, dense, norm, dtype, needs)


def _saved_tensor_hooks() -> bool:
    """Whether default saved-tensor hooks are set (``torch.autograd.graph.saved_tensors_hooks``)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):   # no such query in this torch: assume hooks
        return True


class _Tokenize(torch.autograd.Function):
    """The tokenizer's autograd for the package's eager calls: the forward op with grad off, then the
    backward op, the same wiring as the op's registered autograd (which torch.compile traces, and
    callers of the op get). The registered one flattens the weight list and refills default
    arguments on every call, tens of microseconds of host time per step; this takes the weights as
    separate inputs. Where the call needs nothing but the op's body (``dispatch_free``: plain
    tensors, no mode, transform or profiler), it runs the bodies directly, saving each op's
    dispatch (about 50 us of host time per op on a 2-core CPU), through their launch plans (the
    bodies' own Python, about 0.2 ms per step there, once per signature); otherwise it calls the
    ops."""

    @staticmethod
    def forward(ctx, x, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, options, *weights):
        if dispatch_free(x, keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, *weights):
            out, forward_key = _forward_body(x, list(weights), keep, pixel_norm, ln_weight, ln_bias, pos_embed,
                                             mask_token, *options)
            # the backward's plan takes the saved tensors as the forward made them: not under
            # saved-tensor hooks, whose unpacking may give them another dtype, device or offset
            if not _saved_tensor_hooks():
                ctx.forward_key = forward_key
        else:
            out = tokenizer(x, list(weights), keep, pixel_norm, ln_weight, ln_bias, pos_embed, mask_token, *options)
        patch_size, _, _, dense, eps, dtype, _ = options
        ctx.set_materialize_grads(False)
        _save(ctx, x, pixel_norm, weights, (ln_weight, ln_bias, pos_embed, mask_token), out, patch_size, dense, eps,
              dtype)
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad
        grad_x, grad_w, grad_epilogue = _grads(ctx, grad, needs[0], needs[8:], needs[3:7])
        return grad_x, None, None, *grad_epilogue, None, *grad_w


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

    Computes in the autocast dtype when autocast is on, else in the images' dtype (the weights'
    for uint8 images). Inputs are assumed validated (see ``scott_kernels.functional``).
    """
    B, _, H, W = x.shape
    positions = (H // patch_size) * (W // patch_size)
    keep = None if keep is None else keep.reshape(B, positions)
    if keep is None:
        num_tiles = B * positions
    elif num_visible is not None:
        num_tiles = B * num_visible
    else:   # read back once, as the tables would
        num_tiles = int(keep.sum())
    dtype = compute_dtype(x, weights)
    # under autocast the unfused LayerNorm runs (and returns) float32: so do the fused tokens
    out_dtype = torch.float32 if norm is not None and torch.is_autocast_enabled(x.device.type) else dtype
    ln_weight, ln_bias, eps = norm if norm is not None else (None, None, None)
    # the mask token fills the masked rows of (B, N, D) tokens; packed tokens have none
    fill = mask_token if keep is not None and not packed else None
    # with every patch visible, the packed token layout is the (B, N, D) one: no masked rows to fill
    options = (patch_size, num_tiles, num_visible, keep is not None and not packed,
               None if eps is None else float(eps), dtype, out_dtype)
    if torch.compiler.is_compiling():   # traced once: the op's registered autograd costs nothing per step
        return tokenizer(x, list(weights), keep, pixel_norm, ln_weight, ln_bias, pos_embed, fill, *options)[0]
    return _Tokenize.apply(x, keep, pixel_norm, ln_weight, ln_bias, pos_embed, fill, options, *weights)
