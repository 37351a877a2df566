"""torch.library custom ops over the native kernels in ``scott_kernels._C``.

``gather_tiles`` copies every visible patch of a source, with its halo, into a dense tile
(zeros where the neighbour is masked or outside the image); ``scatter_tiles`` is its exact
adjoint. Each has a fake (meta) implementation, so the ops trace under torch.compile, and each
is the other's gradient.

Tables (all int64, on the source's device):
  slot      (B, GH, GW)  grid position -> source patch index, or -1 where the patch is masked
  tile_pos  (M,)         tile -> flat grid position (b * GH * GW + gy * GW + gx)
A source is 6-D (S0, S1, S2, C, side, side) with any strides; its patch index is flat over the
first three dimensions. A dense image (B, C, H, W) viewed as
``x.view(B, C, GH, P, GW, P).permute(0, 2, 4, 1, 3, 5)`` and a compact activation
``(M, C, r, r).view(M, 1, 1, C, r, r)`` are both sources, with no copy.
"""

from __future__ import annotations

import torch

from ._device import custom_op

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "scott_kernels._C (the native module) is missing: this import found a source tree that was "
        f"not built ({__file__}). Install with `pip install .` and run from outside the source "
        "directory, or build in place with `pip install -e .`"
    ) from exc

__all__ = ["gather_tiles", "scatter_tiles", "native_supports"]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def native_supports(device: torch.device) -> bool:
    """Whether the native gather/scatter kernels run on ``device``."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(_C.build_info()["cuda"])


def _geometry(channels: int, side: int, slot: torch.Tensor, num_tiles: int, halo_lo: int,
              halo_hi: int, slot_sizes, slot_strides=(0, 0, 0), cyx_strides=(0, 0, 0)) -> "_C.TileGeometry":
    g = _C.TileGeometry()
    g.batch, g.grid_h, g.grid_w = (int(v) for v in slot.shape)
    g.channels, g.side = int(channels), int(side)
    g.halo_lo, g.halo_hi = int(halo_lo), int(halo_hi)
    g.num_tiles = int(num_tiles)
    g.set_slots(tuple(int(v) for v in slot_sizes), tuple(int(v) for v in slot_strides))
    g.c_stride, g.y_stride, g.x_stride = (int(v) for v in cyx_strides)
    return g


def _stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _check_tables(name: str, src: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                  halo_lo: int, halo_hi: int) -> None:
    if src.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {src.dtype}")
    for arg, t, dim in (("slot", slot, 3), ("tile_pos", tile_pos, 1)):
        if t.dtype != torch.int64 or t.dim() != dim:
            raise TypeError(f"{name}: {arg} must be a {dim}-D int64 tensor, got {t.dim()}-D {t.dtype}")
        if t.device != src.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, expected {src.device}")
    if halo_lo < 0 or halo_hi < 0:
        raise ValueError(f"{name}: halos must be non-negative, got {halo_lo}, {halo_hi}")
    if not native_supports(src.device):
        raise RuntimeError(f"{name}: the native kernels do not run on {src.device} "
                           f"(build: {_C.build_info()})")


# --------------------------------------------------------------------------------------------
# gather_tiles
# --------------------------------------------------------------------------------------------
@custom_op("scott_kernels::gather_tiles", mutates_args=())
def gather_tiles(src: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor, halo_lo: int,
                 halo_hi: int) -> torch.Tensor:
    """(S0, S1, S2, C, q, q) source -> (M, C, q+lo+hi, q+lo+hi) tiles around each tile_pos patch."""
    _check_tables("gather_tiles", src, slot, tile_pos, halo_lo, halo_hi)
    if src.dim() != 6 or src.shape[-1] != src.shape[-2]:
        raise ValueError(f"gather_tiles: src must be (S0, S1, S2, C, side, side), got {tuple(src.shape)}")
    channels, side = src.shape[3], src.shape[4]
    tile_pos = tile_pos.contiguous()
    slot = slot.contiguous()
    side_t = side + halo_lo + halo_hi
    tiles = torch.empty((tile_pos.shape[0], channels, side_t, side_t), dtype=src.dtype, device=src.device)
    if tiles.numel() == 0:
        return tiles
    g = _geometry(channels, side, slot, tile_pos.shape[0], halo_lo, halo_hi, src.shape[:3],
                  src.stride()[:3], src.stride()[3:])
    _C.gather_tiles(g, _DTYPE_CODES[src.dtype], src.data_ptr(), slot.data_ptr(), tile_pos.data_ptr(),
                    tiles.data_ptr(), src.is_cuda, _stream_of(src))
    return tiles


@gather_tiles.register_fake
def _(src, slot, tile_pos, halo_lo, halo_hi):
    side_t = src.shape[4] + halo_lo + halo_hi
    return src.new_empty((tile_pos.shape[0], src.shape[3], side_t, side_t))


def _gather_setup_context(ctx, inputs, output):
    src, slot, tile_pos, halo_lo, halo_hi = inputs
    ctx.save_for_backward(slot, tile_pos)
    ctx.slot_sizes = list(src.shape[:3])
    ctx.side = src.shape[4]
    ctx.halo = (halo_lo, halo_hi)


def _gather_backward(ctx, grad_tiles):
    slot, tile_pos = ctx.saved_tensors
    grad_src = scatter_tiles(grad_tiles, slot, tile_pos, ctx.slot_sizes, ctx.side, *ctx.halo)
    return grad_src, None, None, None, None


gather_tiles.register_autograd(_gather_backward, setup_context=_gather_setup_context)


# --------------------------------------------------------------------------------------------
# scatter_tiles
# --------------------------------------------------------------------------------------------
def _inverse_tables(slot: torch.Tensor, tile_pos: torch.Tensor, num_slots: int):
    """slot_pos (S,): slot -> grid position; tile_of (P,): grid position -> tile. -1 = none.

    Built with scatter, never with nonzero, so no host synchronisation.
    """
    positions = slot.numel()
    flat = slot.reshape(-1)
    in_range = (flat >= 0) & (flat < num_slots)
    buffer = torch.full((num_slots + 1,), -1, dtype=torch.int64, device=slot.device)
    # Entries that name no slot land in the spare last element, dropped below.
    buffer.scatter_(0, torch.where(in_range, flat, num_slots),
                    torch.arange(positions, dtype=torch.int64, device=slot.device))
    slot_pos = buffer[:num_slots].contiguous()
    tile_of = torch.full((positions + 1,), -1, dtype=torch.int64, device=slot.device)
    tile_ok = (tile_pos >= 0) & (tile_pos < positions)
    tile_of.scatter_(0, torch.where(tile_ok, tile_pos, positions),
                     torch.arange(tile_pos.shape[0], dtype=torch.int64, device=slot.device))
    return slot_pos, tile_of[:positions].contiguous()


@custom_op("scott_kernels::scatter_tiles", mutates_args=())
def scatter_tiles(grad_tiles: torch.Tensor, slot: torch.Tensor, tile_pos: torch.Tensor,
                  slot_sizes: list[int], side: int, halo_lo: int, halo_hi: int) -> torch.Tensor:
    """Adjoint of gather_tiles: (M, C, T, T) -> contiguous (S0, S1, S2, C, side, side)."""
    _check_tables("scatter_tiles", grad_tiles, slot, tile_pos, halo_lo, halo_hi)
    side_t = side + halo_lo + halo_hi
    if grad_tiles.dim() != 4 or tuple(grad_tiles.shape[2:]) != (side_t, side_t) \
            or grad_tiles.shape[0] != tile_pos.shape[0]:
        raise ValueError(f"scatter_tiles: grad_tiles must be (M={tile_pos.shape[0]}, C, {side_t}, {side_t}), "
                         f"got {tuple(grad_tiles.shape)}")
    if len(slot_sizes) != 3 or min(slot_sizes) < 0 or side <= 0:
        raise ValueError(f"scatter_tiles: expected three non-negative slot sizes and a positive side, "
                         f"got {slot_sizes}, {side}")
    channels = grad_tiles.shape[1]
    out_dtype = grad_tiles.dtype
    work = grad_tiles.contiguous()
    if not work.is_cuda and work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()  # the CPU kernel sums in float32/float64
    slot = slot.contiguous()
    tile_pos = tile_pos.contiguous()
    num_slots = slot_sizes[0] * slot_sizes[1] * slot_sizes[2]
    grad_src = torch.empty((*slot_sizes, channels, side, side), dtype=work.dtype, device=work.device)
    if grad_src.numel() > 0:
        slot_pos, tile_of = _inverse_tables(slot, tile_pos, num_slots)
        g = _geometry(channels, side, slot, tile_pos.shape[0], halo_lo, halo_hi, slot_sizes)
        _C.scatter_tiles(g, _DTYPE_CODES[work.dtype], work.data_ptr(), slot.data_ptr(), slot_pos.data_ptr(),
                         tile_of.data_ptr(), grad_src.data_ptr(), work.is_cuda, _stream_of(work))
    return grad_src.to(out_dtype)


@scatter_tiles.register_fake
def _(grad_tiles, slot, tile_pos, slot_sizes, side, halo_lo, halo_hi):
    return grad_tiles.new_empty((*slot_sizes, grad_tiles.shape[1], side, side))


def _scatter_setup_context(ctx, inputs, output):
    _, slot, tile_pos, _, _, halo_lo, halo_hi = inputs
    ctx.save_for_backward(slot, tile_pos)
    ctx.halo = (halo_lo, halo_hi)


def _scatter_backward(ctx, grad_src):
    slot, tile_pos = ctx.saved_tensors
    return gather_tiles(grad_src, slot, tile_pos, *ctx.halo), None, None, None, None, None, None


scatter_tiles.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)
