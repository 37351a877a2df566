"""Native gather/scatter of patch tiles against plain torch indexing (CPU always, CUDA if present)."""

import pytest
import torch
import torch.nn.functional as F

from scott_kernels import _C
from scott_kernels.ops import gather_tiles, scatter_tiles

from conftest import DEVICES

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def gather_oracle(src, slot, tile_pos, lo, hi):
    """Assemble the (masked) image from the slot table, zero-pad, slice one window per tile."""
    C, q = src.shape[3], src.shape[4]
    B, GH, GW = slot.shape
    flat = src.reshape(-1, C, q, q)
    s = slot.reshape(-1)
    valid = ((s >= 0) & (s < flat.shape[0]))[:, None, None, None]
    patches = torch.where(valid, flat[s.clamp(0, flat.shape[0] - 1)], torch.zeros((), dtype=src.dtype))
    image = patches.view(B, GH, GW, C, q, q).permute(0, 3, 1, 4, 2, 5).reshape(B, C, GH * q, GW * q)
    image = F.pad(image, (lo, hi, lo, hi))
    T = q + lo + hi
    tiles = []
    for pos in tile_pos.tolist():
        b, gy, gx = pos // (GH * GW), (pos // GW) % GH, pos % GW
        tiles.append(image[b, :, gy * q:gy * q + T, gx * q:gx * q + T])
    return torch.stack(tiles) if tiles else src.new_zeros((0, C, T, T))


def make_case(kind, device, dtype, B=2, GH=3, GW=4, C=3, q=4, keep_ratio=0.5):
    positions = B * GH * GW
    keep = torch.rand(positions) < keep_ratio
    keep[0] = True
    tile_pos = keep.nonzero().squeeze(1)
    if kind == "dense":
        image = torch.randn(B, C, GH * q, GW * q, dtype=torch.float64).to(dtype)
        src = image.view(B, C, GH, q, GW, q).permute(0, 2, 4, 1, 3, 5)
        slot = torch.where(keep, torch.arange(positions), -1).view(B, GH, GW)
    else:
        src = torch.randn(tile_pos.shape[0], 1, 1, C, q, q, dtype=torch.float64).to(dtype)
        slot = torch.full((positions,), -1, dtype=torch.int64)
        slot[tile_pos] = torch.arange(tile_pos.shape[0])
        slot = slot.view(B, GH, GW)
    return src.to(device), slot.to(device), tile_pos.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "compact"])
@pytest.mark.parametrize("halo", [(0, 0), (5, 4), (3, 2), (9, 7)])  # halos up to two patches wide
def test_gather_matches_indexing(device, dtype, kind, halo):
    src, slot, tile_pos = make_case(kind, device, dtype)
    tiles = gather_tiles(src, slot, tile_pos, *halo)
    expected = gather_oracle(src.cpu(), slot.cpu(), tile_pos.cpu(), *halo)
    assert tiles.dtype == dtype and tiles.is_contiguous()
    torch.testing.assert_close(tiles.cpu(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["dense", "compact"])
@pytest.mark.parametrize("halo", [(5, 4), (9, 7)])
def test_scatter_is_adjoint_of_gather(device, dtype, kind, halo):
    src, slot, tile_pos = make_case(kind, device, dtype)
    leaf = src.detach().cpu().to(torch.float64).requires_grad_(True)
    expected_tiles = gather_oracle(leaf, slot.cpu(), tile_pos.cpu(), *halo)
    grad_tiles = torch.randn_like(expected_tiles)
    (expected,) = torch.autograd.grad(expected_tiles, leaf, grad_tiles)
    got = scatter_tiles(grad_tiles.to(device, dtype), slot, tile_pos, list(src.shape[:3]), src.shape[4], *halo)
    assert got.shape == src.shape and got.is_contiguous()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.cpu().double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scatter_half_types(device, dtype):
    src, slot, tile_pos = make_case("compact", device, dtype)
    grad_tiles = torch.randn(tile_pos.shape[0], src.shape[3], 13, 13, dtype=torch.float64)
    expected = scatter_tiles(grad_tiles.to(device), slot, tile_pos, list(src.shape[:3]), 4, 5, 4)
    got = scatter_tiles(grad_tiles.to(device, dtype), slot, tile_pos, list(src.shape[:3]), 4, 5, 4)
    assert got.dtype == dtype
    # Each output sums at most 9 inputs: error of one rounding of the inputs and one of the result.
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_table_entries_read_as_zero(device):
    src, slot, tile_pos = make_case("compact", device, torch.float32)
    bad_slot = slot.clone()
    bad_slot.view(-1)[1] = 10 ** 9
    bad_pos = torch.cat([tile_pos, torch.tensor([10 ** 9, -5], device=device)])
    tiles = gather_tiles(src, bad_slot, bad_pos, 2, 2)
    assert torch.isfinite(tiles).all()
    assert (tiles[-2:] == 0).all()
    grad = scatter_tiles(torch.ones_like(tiles), bad_slot, bad_pos, list(src.shape[:3]), 4, 2, 2)
    assert torch.isfinite(grad).all()


def test_gather_zero_tiles_and_gradcheck():
    src, slot, tile_pos = make_case("dense", "cpu", torch.float64, B=1, GH=2, GW=2, C=2, q=4)
    empty = gather_tiles(src, slot, tile_pos[:0], 5, 4)
    assert empty.shape == (0, 2, 13, 13)
    leaf = src.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: gather_tiles(s, slot, tile_pos, 3, 2), (leaf,))
    grad_tiles = torch.randn(tile_pos.shape[0], 2, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda g: scatter_tiles(g, slot, tile_pos, list(src.shape[:3]), 4, 3, 2), (grad_tiles,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    src, slot, tile_pos = make_case("dense", device, torch.float32)
    leaf = src.detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.scott_kernels.gather_tiles.default, (leaf, slot, tile_pos, 5, 4))
    grad_tiles = torch.randn(tile_pos.shape[0], 3, 13, 13, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.scott_kernels.scatter_tiles.default,
                          (grad_tiles, slot, tile_pos, list(src.shape[:3]), 4, 5, 4))


def test_bad_arguments_are_clear():
    src, slot, tile_pos = make_case("dense", "cpu", torch.float32)
    with pytest.raises(TypeError, match="slot"):
        gather_tiles(src, slot.int(), tile_pos, 1, 1)
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        gather_tiles(src.int(), slot, tile_pos, 1, 1)
    with pytest.raises(ValueError, match="halos"):
        gather_tiles(src, slot, tile_pos, -1, 1)
    with pytest.raises(ValueError, match="src must be"):
        gather_tiles(src.reshape(-1), slot, tile_pos, 1, 1)


def test_build_info_reports_the_build():
    info = _C.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_archs", "compiler"}
    if info["cuda"]:
        assert info["cuda_archs"]
