"""backend="spconv" against the dense reference: values, weight and image gradients, every mask kind.

spconv's native (CPU) kernels run in float64, so the CPU checks are float64 against the float64
reference to rounding, plus float32 with float32 tolerances. Skipped (with the reason) only where
the optional extra is not installed; CI installs it (".[test,spconv]").
"""

import importlib.util

import pytest
import torch

import scott_kernels.spconv_backend as spb
from scott_kernels import available_backends, reference_tokenize, select_backend, sparse_conv_tokenize
from scott_kernels.spconv_backend import spconv_apply, spconv_plan, spconv_supports, spconv_tokenize

from conftest import HAS_CUDA, random_weights

INSTALLED = importlib.util.find_spec("spconv") is not None
needs_spconv = pytest.mark.skipif(not INSTALLED, reason='spconv is not installed (pip install ".[spconv]")')
pytestmark = needs_spconv
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)")

# (batch, height, width, patch, kernels, widths)
CONFIGS = [
    (2, 64, 48, 16, (7, 7), (8, 12)),        # SCOTT stack, non-square grid
    (3, 48, 80, 16, (3, 5), (4, 6)),         # odd grid (3 x 5 patches), other kernel sizes
    (2, 16, 20, 4, (7,), (6,)),              # one stage, halo wider than the patch
    (1, 128, 64, 64, (5, 3, 7), (4, 5, 6)),  # three stages
    (1, 16, 16, 16, (7, 7), (4, 4)),         # a single patch
]


def _masks(B, N, g):
    mixed = torch.rand(B, N, generator=g) >= 0.5
    mixed[0] = False                                          # a fully masked row
    if B > 1:
        mixed[1] = False
        mixed[1, torch.randint(N, (1,), generator=g)] = True  # a single visible patch
    single = torch.zeros(B, N, dtype=torch.bool)
    single[B - 1, N // 2] = True                              # one visible patch in the whole batch
    return {"none": None, "all_visible": torch.ones(B, N, dtype=torch.bool),
            "random_0.4": torch.rand(B, N, generator=g) >= 0.4, "random_0.75": torch.rand(B, N, generator=g) >= 0.75,
            "mixed_rows": mixed, "single_patch": single, "all_masked": torch.zeros(B, N, dtype=torch.bool)}


def _check(cfg, keep, dtype, rtol, device="cpu", seed=0, autocast=None):
    """spconv tokens and gradients (weights and image) against the float64 reference."""
    torch.manual_seed(seed)
    B, H, W, P, kernels, widths = cfg
    weights = random_weights(3, widths, kernels, dtype=torch.float64, device=device)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, device=device, requires_grad=True)
    keep = None if keep is None else keep.to(device)
    ref = reference_tokenize(x, weights, keep, P)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *weights])

    x_low = x.detach().to(dtype).requires_grad_(True)
    w_low = [w.detach().to(dtype).requires_grad_(True) for w in weights]
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        out = sparse_conv_tokenize(x_low, w_low, keep, patch_size=P, backend="spconv")
    assert out.shape == (B, (H // P) * (W // P), widths[-1])
    assert out.dtype == (autocast or dtype)
    if keep is not None:
        assert (out[~keep] == 0).all(), "masked tokens must be exactly zero"
    grads = torch.autograd.grad((out * probe.to(out.dtype)).sum(), [x_low, *w_low], allow_unused=True)
    scale = ref.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * scale)
    for name, r, g in zip(["images", *[f"weights[{i}]" for i in range(len(weights))]], ref_grads, grads):
        g = torch.zeros_like(r) if g is None else g.double()
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * r.abs().max().clamp_min(1e-30).item(),
                                   msg=lambda m: f"{name} gradient: {m}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"B{c[0]}_{c[1]}x{c[2]}_P{c[3]}_k{'-'.join(map(str, c[4]))}")
@pytest.mark.parametrize("mask_name", ["none", "all_visible", "random_0.4", "random_0.75", "mixed_rows",
                                       "single_patch", "all_masked"])
def test_float64_matches_reference(cfg, mask_name):
    B, H, W, P = cfg[:4]
    keep = _masks(B, (H // P) * (W // P), torch.Generator().manual_seed(B * 100 + H))[mask_name]
    _check(cfg, keep, torch.float64, rtol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=str)
@pytest.mark.parametrize("mask_name", ["none", "random_0.4", "mixed_rows"])
def test_float32_matches_reference(cfg, mask_name):
    """float32: spconv accumulates each output over k*k*C_in products in float32, so errors are
    a few float32 epsilons (1.2e-7) times sqrt of that count, relative to the largest value;
    1e-4 is the bound the torch backend is held to as well."""
    B, H, W, P = cfg[:4]
    keep = _masks(B, (H // P) * (W // P), torch.Generator().manual_seed(7))[mask_name]
    _check(cfg, keep, torch.float32, rtol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_random_configs(seed):
    """Random geometry: patch 4 or 16, kernel sizes, widths, odd grids, mask ratio; float32 and float64."""
    g = torch.Generator().manual_seed(seed)
    P = (4, 16)[seed % 2]
    stages = 1 if P == 4 else 2
    GH, GW = (int(v) for v in torch.randint(1, 5, (2,), generator=g))
    kernels = tuple(int(v) for v in torch.randint(0, 4, (stages,), generator=g) * 2 + 1)   # 1, 3, 5, 7
    widths = tuple(int(v) for v in torch.randint(1, 9, (stages,), generator=g))
    B = int(torch.randint(1, 4, (1,), generator=g))
    ratio = float(torch.rand(1, generator=g))
    keep = torch.rand(B, GH * GW, generator=g) >= ratio
    cfg = (B, GH * P, GW * P, P, kernels, widths)
    _check(cfg, keep, torch.float64, rtol=1e-10, seed=seed)
    _check(cfg, keep, torch.float32, rtol=1e-4, seed=seed)


def test_blur_reads_own_pixel_next_to_a_masked_neighbour():
    """Design detail (a) through spconv's max-pool: at the left edge of a visible patch whose left
    neighbour is masked, the max-pool position just outside the patch is the patch's own pixel;
    with the neighbour visible it is the real maximum."""
    w = [torch.ones(1, 1, 1, 1, dtype=torch.float64)]          # 1x1 identity conv, stride 2
    x = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    x[0, 0, 0, 4] = 5.0       # first pixel of patch 1
    x[0, 0, 0, 2] = 7.0       # last conv-output pixel of patch 0
    for keep in (torch.tensor([[False, True]]), torch.tensor([[True, True]])):
        out = sparse_conv_tokenize(x, w, keep, patch_size=4, backend="spconv")
        torch.testing.assert_close(out, reference_tokenize(x, w, keep, 4), rtol=0, atol=1e-15)
    # masked neighbour: (2*5 + 4*5) / 16; visible neighbour: the max reads 7 at column 1
    assert out.view(-1)[1].item() == pytest.approx((2 * 7 + 4 * 5) / 16)


def test_native_rulebook_computes_visible_outputs_only():
    """The narrowed native rulebook: every pair lands on a visible output pixel, and there are
    fewer outputs than in spconv's own output set (which rings into the masked patches)."""
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, 5] = True
    plan = spconv_plan(keep, 1, 64, 64, 16, (7, 7), "cpu")
    pixels = keep.view(1, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)
    coords = pixels.nonzero().int().contiguous()
    sp = spb.require_spconv()
    own, _, _ = sp.ops.get_indice_pairs(coords, 1, [64, 64], sp.ConvAlgo.Native, [7, 7], [2, 2], [3, 3],
                                        [1, 1], [0, 0], False, False)
    assert plan.stages[0]["conv"][2] == 64 < own.shape[0]      # 8x8 visible outputs; spconv's: 11x11
    for stage, side in zip(plan.stages, (8, 2)):
        pairs, counts, n_out = stage["conv"]
        assert n_out == side * side
        for tap in range(pairs.shape[1]):
            n = int(counts[tap])
            assert ((pairs[1, tap, :n] >= 0) & (pairs[1, tap, :n] < n_out)).all()
            assert (pairs[:, tap, n:] == -1).all()


def test_plan_reuse_and_mismatch():
    weights = random_weights(3, (4, 6), (7, 7))
    keep = torch.rand(2, 6) >= 0.5
    keep[0, 0] = True
    plan = spconv_plan(keep, 2, 32, 48, 16, (7, 7), "cpu")
    for seed in range(2):
        x = torch.randn(2, 3, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(spconv_apply(x, weights, plan), spconv_tokenize(x, weights, keep, 16),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="plan was built for 2x32x48"):
        spconv_apply(torch.randn(2, 3, 32, 32, dtype=torch.float64), weights, plan)
    with pytest.raises(ValueError, match="implicit_gemm' needs a CUDA device"):
        spconv_plan(keep, 2, 32, 48, 16, (7, 7), "cpu", algo="implicit_gemm")


def test_registered_as_a_peer_not_auto():
    assert spconv_supports(torch.device("cpu"))
    assert available_backends("cpu")[-1] == "spconv"
    assert select_backend("auto", "cpu") != "spconv"
    assert select_backend("spconv", "cpu") == "spconv"


def test_missing_spconv_names_the_extra(monkeypatch):
    monkeypatch.setattr(spb, "_SPCONV", ImportError("No module named 'spconv'"))
    assert "spconv" not in available_backends("cpu")
    with pytest.raises(ImportError, match=r"scott-kernels\[spconv\]"):
        sparse_conv_tokenize(torch.randn(1, 3, 16, 16), [torch.randn(4, 3, 7, 7), torch.randn(8, 4, 7, 7)],
                             backend="spconv")


def test_epilogue_packed_and_pixel_norm():
    """The functional extras (packed tokens, uint8 images with normalisation) work with spconv."""
    weights = random_weights(3, (4, 6), (7, 7), dtype=torch.float32)
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, :3] = True
    x = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    kw = dict(patch_size=16, packed=True, pixel_mean=(120.0, 110.0, 100.0), pixel_std=(60.0, 55.0, 50.0))
    a = sparse_conv_tokenize(x, weights, keep, backend="spconv", **kw)
    b = sparse_conv_tokenize(x, weights, keep, backend="reference", **kw)
    assert a.shape == (2, 3, 6)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_computes_in_float16_and_bfloat16_is_refused():
    """spconv has no bfloat16 kernels: under autocast it computes in float16 (spconv's own rule)
    and returns the autocast dtype; bfloat16 tensors outside autocast get a clear error."""
    cfg = (2, 32, 32, 16, (7, 7), (8, 16))
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    _check(cfg, keep, torch.float32, rtol=2e-2, autocast=torch.bfloat16)
    w = [torch.randn(4, 3, 7, 7, dtype=torch.bfloat16), torch.randn(8, 4, 7, 7, dtype=torch.bfloat16)]
    with pytest.raises(TypeError, match="no bfloat16 kernels"):
        sparse_conv_tokenize(torch.randn(1, 3, 16, 16, dtype=torch.bfloat16), w, backend="spconv")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("algo", ["implicit_gemm", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu(algo, dtype):
    """On CUDA: spconv's implicit GEMM (the default there) and its native path, float32 and float16."""
    cfg = (2, 64, 48, 16, (7, 7), (16, 32))
    keep = _masks(2, 12, torch.Generator().manual_seed(3))["mixed_rows"].cuda()
    torch.manual_seed(0)
    weights = random_weights(3, cfg[5], cfg[4], dtype=torch.float64, device="cuda")
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64, device="cuda")
    ref = reference_tokenize(x, weights, keep, 16)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), weights)
    w_low = [w.detach().to(dtype).requires_grad_(True) for w in weights]
    plan = spconv_plan(keep, 2, 64, 48, 16, (7, 7), "cuda", algo=algo)
    out = spconv_apply(x.to(dtype), w_low, plan)
    grads = torch.autograd.grad((out * probe.to(dtype)).sum(), w_low)
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    for r, g in zip(ref_grads, grads):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * r.abs().max().item())


@needs_gpu
@pytest.mark.gpu
def test_gpu_autocast_bf16():
    cfg = (2, 64, 48, 16, (7, 7), (16, 32))
    keep = _masks(2, 12, torch.Generator().manual_seed(4))["random_0.4"]
    _check(cfg, keep, torch.float32, rtol=2e-2, device="cuda", autocast=torch.bfloat16)
