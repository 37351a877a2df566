"""The compact visible-patch layout shared by the triton and cuda backends: its tables, the
stage driver over a backend's two ops, and the image gradient.

Activations are channel-last blocks of the visible patches only, (M, side, side, C).

  slot      (B, GH, GW) int32   grid position -> tile index, or -1 where the patch is masked
  tile_pos  (M,)        int64   tile index -> flat grid position (b * GH * GW + gy * GW + gx)

Tiles are numbered row-major over batch and patch grid, so with the same number of visible
patches per row, tile t belongs to image t // num_visible.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

__all__ = ["visible_tables", "new_tables", "visible_positions", "compute_dtype", "tokenize_compact", "compact_to_image",
           "register_stage_autograd", "accumulator_dtype", "gemm_weight",
           "gemm_weight_transposed", "weight_from_partials", "reduction_splits", "check_tables"]


def visible_tables(keep: torch.Tensor | None, batch: int, grid_h: int, grid_w: int, device: torch.device,
                   num_visible: int | None = None, num_tiles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, tile_pos) for ``keep``; see the module docstring.

    Without ``num_visible`` the tile count is ``num_tiles`` when given (the caller has read it),
    else read back from the device (one synchronisation);
    with it the tables come from a cumulative sum and a scatter. A ``keep`` whose rows do not
    each hold ``num_visible`` patches fails an asynchronous device assertion; tile indices past
    the end are marked masked in ``slot``, so the kernels never address outside their tensors.
    """
    positions = batch * grid_h * grid_w
    if keep is None:
        slot = torch.arange(positions, dtype=torch.int32, device=device).view(batch, grid_h, grid_w)
        return slot, torch.arange(positions, dtype=torch.int64, device=device)
    flat = keep.reshape(-1)
    index = torch.cumsum(flat, 0, dtype=torch.int64) - 1
    if num_visible is None:
        num_tiles = int(flat.sum()) if num_tiles is None else num_tiles
    else:
        num_tiles = batch * num_visible
        torch._assert_async((keep.sum(1) == num_visible).all(),
                            "keep: every row must hold exactly num_visible visible patches")
    index = torch.where(flat & (index < num_tiles), index, -1)
    tile_pos = torch.zeros(num_tiles + 1, dtype=torch.int64, device=device)
    # masked positions land in the spare last element, dropped below
    tile_pos.scatter_(0, torch.where(index >= 0, index, num_tiles),
                      torch.arange(positions, dtype=torch.int64, device=device))
    return index.to(torch.int32).view(batch, grid_h, grid_w), tile_pos[:num_tiles]


def new_tables(name: str, keep: torch.Tensor, num_visible: int, grid_h: int, grid_w: int, radius: int = -1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the arguments of a one-launch tables op (a (B, GH * GW) bool ``keep``, ``num_visible``
    per row, ``radius`` -1 or >= 0) and returns its uninitialised outputs: slot (B, GH, GW) int32,
    tile_pos (B * num_visible,) int64 and the (B * num_visible, 2r+1, 2r+1) int32 neighbour table
    (empty without a radius). Serves the ops and their fake implementations."""
    if keep.dtype != torch.bool or keep.dim() != 2 or keep.shape[1] != grid_h * grid_w:
        raise ValueError(f"{name}: keep must be a (B, {grid_h * grid_w}) bool tensor, "
                         f"got {tuple(keep.shape)} {keep.dtype}")
    if not 0 <= num_visible <= keep.shape[1]:
        raise ValueError(f"{name}: num_visible must be in [0, {keep.shape[1]}], got {num_visible}")
    if radius < -1:
        raise ValueError(f"{name}: radius must be -1 (no neighbour table) or >= 0, got {radius}")
    batch = keep.shape[0]
    nb = 2 * radius + 1 if radius >= 0 else 0
    return (keep.new_empty((batch, grid_h, grid_w), dtype=torch.int32),
            keep.new_empty((batch * num_visible,), dtype=torch.int64),
            keep.new_empty((batch * num_visible if nb else 0, nb, nb), dtype=torch.int32))


def check_tables(name: str, like: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor) -> None:
    """Raises unless ``slot``/``tile_pos`` have the table dtypes and shapes, on ``like``'s device."""
    if slot.dtype != torch.int32 or slot.dim() != 3:
        raise TypeError(f"{name}: slot must be a 3-D int32 tensor, got {slot.dim()}-D {slot.dtype}")
    if tile_pos.dtype != torch.int64 or tile_pos.dim() != 1:
        raise TypeError(f"{name}: tile_pos must be a 1-D int64 tensor, got {tile_pos.dim()}-D {tile_pos.dtype}")
    if slot.numel() == 0:
        raise ValueError(f"{name}: slot must cover a non-empty (B, GH, GW) grid, got {tuple(slot.shape)}")
    for arg, t in (("slot", slot), ("tile_pos", tile_pos)):
        if t.device != like.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, expected {like.device}")


def visible_positions(keep: torch.Tensor, num_visible: int | None = None) -> torch.Tensor:
    """(B, K) indices of the visible patches of each row, ascending; rows must share K. Passing
    ``num_visible`` (K) avoids reading it back from the device."""
    B = keep.shape[0]
    k = num_visible if num_visible is not None else (int(keep[0].sum()) if B else 0)
    # A stable sort puts the visible (1) entries first, in patch order, with no nonzero().
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return order[:, :k]


# ---- the conv GEMMs' operand layouts and the weight-gradient reduction, shared by the kernels ----
def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 accumulates in float64, every other compute dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k, k) -> the forward GEMM's (k*k*C_in, C_out) operand, K ordered (ky, kx, ci)."""
    c_out, c_in, k, _ = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(k * k * c_in, c_out).contiguous()


def gemm_weight_transposed(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k, k) -> the input-gradient GEMM's (k*k*C_out, C_in) operand, (ky, kx, co) rows."""
    c_out, c_in, k, _ = weight.shape
    return weight.permute(2, 3, 0, 1).reshape(k * k * c_out, c_in).contiguous()


def weight_from_partials(partials: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum of the (splits, k*k*C_in, C_out) weight-gradient partials, as a contiguous
    (C_out, C_in, k, k) tensor in the weight's dtype."""
    c_out, c_in, k, _ = weight.shape
    return partials.sum(0).view(k, k, c_in, c_out).permute(3, 2, 0, 1).to(weight.dtype).contiguous()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_splits(rows: int, k_total: int, c_out: int, device: torch.device, min_rows: int) -> int:
    """How many parts the weight gradient's reduction over ``rows`` output pixels is split into,
    so that the grid fills a GPU (about four 64 x 64 blocks per SM; at most 65535, the grid's z
    limit) with at least ``min_rows`` rows each. Each part writes its own partial, summed
    afterwards: deterministic, no atomics. One part off the GPU."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    tiles = -(-k_total // 64) * -(-c_out // 64)
    return max(1, min(-(-rows // min_rows), -(-4 * sms // tiles), 65535))


def compact_to_image(dsrc: torch.Tensor, tile_pos: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Compact (M, P, P, C) image gradient -> (B, C, H, W), zero at masked patches."""
    B, C, H, W = shape
    P = dsrc.shape[1]
    GH, GW = H // P, W // P
    dense = dsrc.new_zeros((B * GH * GW, P, P, C)).index_copy(0, tile_pos, dsrc)
    return dense.view(B, GH, GW, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


def compute_dtype(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a tokenizer computes in: the autocast dtype when autocast is on, else the images'
    (the weights' for uint8 images)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else weights[0].dtype


def tokenize_compact(conv_relu: Callable, max_blur_pool: Callable, x: torch.Tensor, weights: Sequence[torch.Tensor],
                     keep: torch.Tensor | None, patch_size: int, num_visible: int | None = None,
                     packed: bool = False, pixel_norm: torch.Tensor | None = None,
                     tables: Callable = visible_tables) -> torch.Tensor:
    """The tokenizer from a backend's stage ops ``conv_relu(src, weight, slot, tile_pos, in_side,
    src_is_image, pixel_norm)`` and ``max_blur_pool(act, slot, tile_pos)``: (B, N, D) tokens, masked
    ones exactly 0, or with ``packed`` (B, num_visible, D) visible tokens in row-major order. The
    ReLU may sit in either op: the fast backends run the conv without it and the pool of its
    ReLU (see ``register_stage_autograd``). ``tables`` builds (slot, tile_pos) with ``visible_tables``'s signature (a
    backend may build them in one kernel).

    Computes in the autocast dtype when autocast is on, else in the images' dtype (the weights'
    for uint8 images). Inputs are assumed validated (see ``scott_kernels.functional``).
    """
    B, _, H, W = x.shape
    GH, GW = H // patch_size, W // patch_size
    dtype = compute_dtype(x, weights)
    weights = [w.to(dtype) for w in weights]
    if x.is_floating_point():
        x = x.to(dtype)
    slot, tile_pos = tables(keep, B, GH, GW, x.device, num_visible)
    act, side = x, patch_size
    for i, weight in enumerate(weights):
        act = conv_relu(act, weight, slot, tile_pos, side, i == 0, pixel_norm if i == 0 else None)
        act = max_blur_pool(act, slot, tile_pos)
        side //= 4
    num_tiles, dim = tile_pos.shape[0], act.shape[-1]
    tokens = act.reshape(num_tiles, dim)
    if packed:
        return tokens.view(B, num_tiles // B, dim)
    if keep is None:
        return tokens.view(B, GH * GW, dim)
    dense = tokens.new_zeros((B * GH * GW, dim)).index_copy(0, tile_pos, tokens)
    return dense.view(B, GH * GW, dim)


def register_stage_autograd(conv_relu, conv_relu_wgrad, conv_relu_dgrad, max_blur_pool,
                            max_blur_pool_backward) -> None:
    """Autograd for a backend's stage ops, from its gradient ops (the same wiring for every
    compact backend): conv_relu -> wgrad / dgrad (image sources get their gradient scattered
    back and scaled by the fused normalisation), max_blur_pool -> max_blur_pool_backward.

    Ops may take trailing inputs after the common ones: a conv's first one, when present, is
    ``relu`` (False: the plain convolution, whose gradient the gradient ops get as it is, with
    ``out=None``), and any after it (what a backend builds once per stage: a neighbour table,
    weight layouts) are passed on to both gradient ops as trailing inputs; a pool's are passed on to
    ``max_blur_pool_backward``. A tokenizer stage runs conv(relu=False) -> max_blur_pool(relu=True):
    the pool's backward, which reads the conv output anyway, returns the gradient already multiplied
    by relu' (``relu_mask``), so no pass applies the ReLU mask. A conv called with relu=True masks
    its gradient here: once, with the gradient ops getting ``out=None`` (both reread it), for a
    compact source; for an image source the ops get the forward's output and mask it as they read it
    (images seldom need a gradient, so usually only the weight gradient reads it). The gradient ops
    must accept ``out=None`` for an already-masked gradient."""

    def conv_setup(ctx, inputs, output):
        src, weight, slot, tile_pos, in_side, src_is_image, pixel_norm, *flags = inputs
        ctx.relu = bool(flags[0]) if flags else True
        ctx.extra = len(flags)
        # inputs after relu (a backend's tables for the stage) go to both gradient ops as they are
        ctx.save_for_backward(src, weight, slot, tile_pos, output if ctx.relu else None, pixel_norm, *flags[1:])
        ctx.in_side, ctx.src_is_image = in_side, src_is_image
        ctx.src_shape = tuple(src.shape)

    def conv_backward(ctx, grad):
        src, weight, slot, tile_pos, out, pixel_norm, *tables = ctx.saved_tensors
        if ctx.relu and not ctx.src_is_image:
            grad, out = torch.where(out > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None
        grads = _conv_grads(ctx, conv_relu_wgrad, conv_relu_dgrad, grad, out, src, weight, slot, tile_pos, pixel_norm,
                            tables)
        return *grads, *([None] * ctx.extra)

    def pool_setup(ctx, inputs, output):
        act, slot, tile_pos, *flags = inputs
        ctx.flags = tuple(flags)
        ctx.save_for_backward(act, slot, tile_pos)

    def pool_backward(ctx, grad):
        act, slot, tile_pos = ctx.saved_tensors
        return max_blur_pool_backward(grad, act, slot, tile_pos, *ctx.flags), None, None, *([None] * len(ctx.flags))

    conv_relu.register_autograd(conv_backward, setup_context=conv_setup)
    max_blur_pool.register_autograd(pool_backward, setup_context=pool_setup)


def _conv_grads(ctx, conv_relu_wgrad, conv_relu_dgrad, grad, out, src, weight, slot, tile_pos, pixel_norm,
                tables=()):
    """(grad_src, grad_weight, None x 5) of a conv + ReLU stage from its output gradient (``out``
    None: ``grad`` already multiplied by relu'); image sources get their gradient scattered back and
    scaled by the fused normalisation. ``tables``: the forward's trailing table inputs."""
    grad_src = grad_w = None
    if ctx.needs_input_grad[1]:
        grad_w = conv_relu_wgrad(grad, out, src, weight, slot, tile_pos, ctx.in_side, ctx.src_is_image, pixel_norm,
                                 *tables)
    if ctx.needs_input_grad[0]:
        grad_src = conv_relu_dgrad(grad, out, weight, slot, tile_pos, ctx.in_side, *tables)
        if ctx.src_is_image:
            grad_src = compact_to_image(grad_src, tile_pos, ctx.src_shape)
            if pixel_norm is not None:
                grad_src = grad_src * pixel_norm[1].view(1, -1, 1, 1).to(grad_src.dtype)
            grad_src = grad_src.to(src.dtype)
    return grad_src, grad_w, None, None, None, None, None
