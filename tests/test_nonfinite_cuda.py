"""NaN and Inf through the cuda backend's kernels, checked on their C++ twin (CPU tensors): the same
ReLU and max-pool functions (stage_common.h, pool_ops.h) put NaN and Inf exactly where the reference
(torch's conv, ReLU and max-pool, masking by selection) puts them, in the tokens, in the weight
gradients and in the image gradient (which pixel of a pool window holding a NaN the gradient is
routed to), on both GEMM paths and both pool paths."""

from unittest import mock

import pytest
import torch

from scott_kernels import functional, sparse_conv_tokenize
from scott_kernels.cuda_backend import cuda_tokenize, use_implicit_gemm, use_tiled_pool
from scott_kernels.reference import reference_tokenize

from conftest import random_weights

GRID, P = 4, 16
NAN, INF = float("nan"), float("inf")


def _images_with(value, at_patches, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, GRID * P, GRID * P, dtype=torch.float64, generator=g)
    for n in at_patches:
        gy, gx = divmod(n, GRID)
        x[0, 0, gy * P + 5, gx * P + 5] = value
    return x.to(dtype)


def _keep(masked):
    keep = torch.ones(1, GRID * GRID, dtype=torch.bool)
    keep[0, list(masked)] = False
    return keep


def _run(backend, x, weights, keep):
    x = x.detach().clone().requires_grad_(True)
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    with mock.patch.dict(functional.BACKENDS, {"cuda": (cuda_tokenize, lambda device: True)}):
        out = sparse_conv_tokenize(x, weights, keep, patch_size=P, backend=backend)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * probe).sum(), [x, *weights])
    return out.detach(), grads


def _same_nonfinite(out, ref, what, rtol):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN positions differ"
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf), f"{what}: Inf positions differ"
    assert torch.equal(out[inf], ref[inf]), f"{what}: Inf signs differ"
    finite = torch.isfinite(ref)
    scale = ref[finite].abs().max().item() if finite.any() else 1.0
    torch.testing.assert_close(out[finite], ref[finite], rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=[True, False], ids=["implicit", "gather"])
def gemm_path(request):
    use_implicit_gemm(request.param)
    yield request.param
    use_implicit_gemm(True)


@pytest.fixture(params=[True, False], ids=["tiled-pool", "element-pool"])
def pool_path(request):
    use_tiled_pool(request.param)
    yield request.param
    use_tiled_pool(True)


# Masked patches for a non-finite pixel in visible patch 0: "far" ones lie out of its reach through
# the second conv's input, "near" ones (patch 5, diagonal to 0) read it there.
MASKED = {"far": [10, 15], "near": [5, 10]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("where", ["visible", "masked"])
def test_cuda_twin_puts_nonfinite_where_the_reference_does(dtype, value, where, gemm_path, pool_path):
    # 8 and 16 channels: multiples of 8, so the tiled pool takes both pools when it is on
    weights = [w.to(dtype) for w in random_weights(3, (8, 16), (7, 7))]
    keep = _keep(MASKED["far"] if where == "visible" else [5, 10])
    x = _images_with(value, [0] if where == "visible" else [5], dtype)
    ref, ref_grads = _run("reference", x, weights, keep)
    out, grads = _run("cuda", x, weights, keep)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    if where == "visible" and value != value:
        assert torch.isnan(ref[0, 0]).any()  # the NaN reaches its own token
    if where == "masked":
        assert torch.isfinite(ref).all() and all(torch.isfinite(r).all() for r in ref_grads)
    _same_nonfinite(out, ref, "tokens", rtol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        _same_nonfinite(g, r, "image gradient" if i == 0 else f"weight {i - 1} gradient", rtol)


@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_next_to_a_masked_patch(value, gemm_path, pool_path):
    """A non-finite pixel in a visible patch whose neighbour is masked: tokens and the image gradient
    as the reference's. The dense reference's second-conv weight gradient also sums its masked
    outputs, whose gradient is 0, against the NaN/Inf they would read (0 * NaN = NaN), terms no
    sparse backend computes: there the weight gradients are the torch backend's (the same sparse
    function on torch's ops), and the reference's NaN only adds positions to them."""
    dtype = torch.float64
    weights = [w.to(dtype) for w in random_weights(3, (8, 16), (7, 7))]
    keep = _keep(MASKED["near"])
    x = _images_with(value, [0], dtype)
    ref, ref_grads = _run("reference", x, weights, keep)
    sparse, sparse_grads = _run("torch", x, weights, keep)
    out, grads = _run("cuda", x, weights, keep)
    _same_nonfinite(out, ref, "tokens", 1e-10)
    _same_nonfinite(grads[0], ref_grads[0], "image gradient", 1e-10)
    for i, (g, s, r) in enumerate(zip(grads[1:], sparse_grads[1:], ref_grads[1:])):
        _same_nonfinite(g, s, f"weight {i} gradient", 1e-10)
        assert not (torch.isnan(g) & ~torch.isnan(r)).any(), f"weight {i} gradient: NaN the reference lacks"


@pytest.mark.parametrize("value", [NAN, INF])
def test_nan_and_inf_pixels_in_one_pool_window(value, pool_path):
    """Two non-finite pixels of one visible patch, a few pixels apart: 2x2 max windows of
    the first pool holds both after the first conv spreads them, so the gradient's routing inside a
    window with several NaN (torch: the last) or Inf (torch: the first) is checked."""
    dtype = torch.float64
    weights = [w.to(dtype) for w in random_weights(3, (8, 16), (7, 7))]
    keep = _keep([3, 15])  # out of reach of patch 5, where the pixels are
    x = _images_with(0.0, [], dtype)
    x[0, 1, 21, 21] = value
    x[0, 2, 23, 25] = -value if value == INF else value
    ref, ref_grads = _run("reference", x, weights, keep)
    out, grads = _run("cuda", x, weights, keep)
    _same_nonfinite(out, ref, "tokens", 1e-10)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        _same_nonfinite(g, r, "image gradient" if i == 0 else f"weight {i - 1} gradient", 1e-10)


@pytest.mark.parametrize("value", [NAN, INF])
def test_nonfinite_pixel_in_an_even_image_column(value, gemm_path):
    """The image stage's implicit GEMM reads taps in pairs of columns, padding a 7-tap row with an
    eighth tap of weight 0; the eighth column of an output is an even column of the image, and a
    NaN or Inf there must not reach that output as 0 * NaN (the 7x7 window does not connect them)."""
    dtype = torch.float64
    weights = [w.to(dtype) for w in random_weights(3, (8, 16), (7, 7))]
    keep = _keep([3, 15])  # out of reach of patch 5, where the pixel is
    x = _images_with(0.0, [], dtype)
    x[0, 0, 20, 20] = value
    ref, ref_grads = _run("reference", x, weights, keep)
    out, grads = _run("cuda", x, weights, keep)
    _same_nonfinite(out, ref, "tokens", 1e-10)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        _same_nonfinite(g, r, "image gradient" if i == 0 else f"weight {i - 1} gradient", 1e-10)
