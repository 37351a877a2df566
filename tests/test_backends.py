"""Every backend against the dense reference: values and weight gradients, random shapes/masks."""

import pytest
import torch
import torch.nn.functional as F

from scott_kernels import available_backends, reference_tokenize, sparse_conv_tokenize
from scott_kernels.reference import max_blur_pool

from conftest import DEVICES, random_weights

# (batch, height, width, patch, kernels, widths)
CONFIGS = [
    (2, 64, 48, 16, (7, 7), (8, 12)),     # SCOTT stack, non-square grid
    (3, 32, 32, 16, (3, 5), (4, 6)),      # other kernel sizes
    (2, 48, 16, 16, (7, 7), (5, 7)),      # one patch wide
    (2, 16, 20, 4, (7,), (6,)),           # one stage, halo wider than the patch
    (1, 128, 64, 64, (5, 3, 7), (4, 5, 6)),  # three stages
    (1, 16, 16, 16, (7, 7), (4, 4)),      # a single patch
]


def _mask_cases(B, N):
    g = torch.Generator().manual_seed(B * 1000 + N)
    cases = {"none": None, "all_visible": torch.ones(B, N, dtype=torch.bool)}
    for ratio in (0.4, 0.75):
        cases[f"random_{ratio}"] = torch.rand(B, N, generator=g) >= ratio
    mixed = torch.rand(B, N, generator=g) >= 0.5
    mixed[0] = False                      # a fully masked row
    if B > 1:
        mixed[1] = False
        mixed[1, torch.randint(N, (1,), generator=g)] = True   # a single visible patch
    cases["mixed_rows"] = mixed
    cases["all_masked"] = torch.zeros(B, N, dtype=torch.bool)
    return cases


def _compare(backend, cfg, mask_name, dtype, device, rtol):
    B, H, W, P, kernels, widths = cfg
    N = (H // P) * (W // P)
    keep = _mask_cases(B, N)[mask_name]
    keep = None if keep is None else keep.to(device)
    weights = random_weights(3, widths, kernels, dtype=torch.float64, device=device)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, device=device)
    ref = reference_tokenize(x, weights, keep, P)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), weights, allow_unused=True)

    w_low = [w.detach().to(dtype).requires_grad_(True) for w in weights]
    out = sparse_conv_tokenize(x.to(dtype), w_low, keep, patch_size=P, backend=backend)
    assert out.shape == (B, N, widths[-1]) and out.dtype == dtype
    if keep is not None:
        assert (out[~keep] == 0).all(), "masked tokens must be exactly zero"
    grads = torch.autograd.grad((out * probe.to(dtype)).sum(), w_low, allow_unused=True)
    scale = ref.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * scale.item())
    for r, g in zip(ref_grads, grads):
        r = torch.zeros_like(w_low[0], dtype=torch.float64) if r is None else r
        g = torch.zeros_like(r) if g is None else g.double()
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * r.abs().max().clamp_min(1e-30).item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"B{c[0]}_{c[1]}x{c[2]}_P{c[3]}_k{'-'.join(map(str, c[4]))}")
@pytest.mark.parametrize("mask_name", ["none", "all_visible", "random_0.4", "random_0.75", "mixed_rows", "all_masked"])
def test_torch_backend_float64(device, cfg, mask_name):
    _compare("torch", cfg, mask_name, torch.float64, device, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=str)
@pytest.mark.parametrize("mask_name", ["none", "random_0.4", "mixed_rows"])
def test_torch_backend_float32(device, cfg, mask_name):
    _compare("torch", cfg, mask_name, torch.float32, device, rtol=1e-4)


@pytest.mark.parametrize("seed", range(12))
def test_torch_backend_random_configs(seed):
    """Random geometry: kernel sizes, widths, grid, mask ratio."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    stages = 1 if seed % 3 == 0 else 2
    P = 4 ** stages
    kernels = tuple(2 * r(0, 4) + 1 for _ in range(stages))
    widths = tuple(r(1, 6) for _ in range(stages))
    cfg = (r(1, 3), P * r(1, 4), P * r(1, 4), P, kernels, widths)
    _compare("torch", cfg, ["random_0.4", "random_0.75", "mixed_rows", "none"][seed % 4], torch.float64, "cpu", 1e-10)


def test_reference_keep_none_is_the_plain_dense_stack():
    """keep=None must be the unmasked SCOTT stack: conv -> ReLU -> MaxBlurPool per stage."""
    weights = random_weights(3, (6, 8), (7, 7))
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    y = x
    for w in weights:
        y = max_blur_pool(torch.relu(F.conv2d(y, w, stride=2, padding=3)))
    expected = y.flatten(2).transpose(1, 2)
    torch.testing.assert_close(reference_tokenize(x, weights, None, 16), expected, rtol=0, atol=0)
    ones = torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(reference_tokenize(x, weights, ones, 16), expected, rtol=1e-12, atol=1e-12)


def test_blur_reads_own_pixel_next_to_a_masked_neighbour():
    """Contract detail (a): the mask is applied after the whole MaxBlurPool, not between its max
    and its blur, so at a visible patch's edge the max-pool value just outside the patch is
    max(0, own first pixel), not zero. A hand-built 1-channel case checks the reference."""
    weights = [torch.zeros(1, 1, 1, 1, dtype=torch.float64)]
    weights[0][0, 0, 0, 0] = 1.0  # 1x1 identity conv, stride 2: picks even pixels
    x = torch.zeros(1, 1, 4, 8, dtype=torch.float64)
    x[0, 0, 0, 4] = 5.0  # first pixel of the right patch (patch 1), conv-output position (0, 2)
    keep = torch.tensor([[False, True]])
    out = reference_tokenize(x, weights, keep, 4).view(-1)
    # conv map a (2x4): a[0,2] = 5. Max-pool m (1x3): m[0,1] = max(a[0:2, 1:3]) = 5 (reads into
    # the masked patch's column 1, which is zero), m[0,2] = 5. Blur output (1x2) at column 1 reads
    # m[-1..1, 1..3] with padding: 2*5/16 + 4*5/16 ... only row 0 exists -> (2*5 + 4*5 + 0)/16 = 30/16
    # (m[0,3] does not exist: zero padding at the border).
    assert out[0] == 0.0
    assert out[1] == pytest.approx(30.0 / 16.0)
    torch.testing.assert_close(sparse_conv_tokenize(x, weights, keep, patch_size=4, backend="torch").view(-1), out)


@pytest.mark.parametrize("backend", ["reference", "torch", "spconv"])
def test_no_leak_from_masked_patches(backend):
    """Changing pixels of masked patches changes nothing: values or weight gradients."""
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run here (spconv: pip install \".[spconv]\")")
    weights = random_weights(3, (6, 8), (7, 7))
    keep = torch.rand(2, 12) >= 0.5
    keep[:, 0] = True
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    pixel_mask = keep.view(2, 1, 3, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    x2 = torch.where(pixel_mask, x, torch.randn_like(x) * 100)
    a = sparse_conv_tokenize(x, weights, keep, patch_size=16, backend=backend)
    b = sparse_conv_tokenize(x2, weights, keep, patch_size=16, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ga = torch.autograd.grad(a.sum(), weights)
    gb = torch.autograd.grad(b.sum(), weights)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-13, atol=1e-13)


def test_image_gradient_matches_reference():
    weights = random_weights(3, (4, 5), (7, 7), requires_grad=False)
    keep = torch.rand(2, 6) >= 0.4
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, requires_grad=True)
    (gr,) = torch.autograd.grad(reference_tokenize(x, weights, keep, 16).sum(), x)
    (gt,) = torch.autograd.grad(sparse_conv_tokenize(x, weights, keep, backend="torch").sum(), x)
    torch.testing.assert_close(gt, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bf16(device):
    """Under autocast the convolutions run in bf16 on both backends; results agree loosely."""
    weights = random_weights(3, (8, 16), (7, 7), dtype=torch.float32, device=device)
    x = torch.randn(2, 3, 32, 32, device=device)
    keep = (torch.rand(2, 4) >= 0.5).to(device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        ref = sparse_conv_tokenize(x, weights, keep, backend="reference")
        out = sparse_conv_tokenize(x, weights, keep, backend="torch")
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = reference_tokenize(x.double(), [w.double() for w in weights], keep, 16)
    err_ref = (ref.double() - exact).abs().max()
    err_out = (out.double() - exact).abs().max()
    assert err_out <= 2 * err_ref + 1e-2 * exact.abs().max()


def _triton_param():
    from scott_kernels.triton_backend import triton_supports

    here = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return pytest.param("triton", marks=pytest.mark.skipif(not triton_supports(here), reason="triton cannot run here"))


@pytest.mark.parametrize("backend", ["reference", "torch", _triton_param()])
@pytest.mark.parametrize("packed", [False, True])
def test_token_epilogue(backend, packed):
    """LayerNorm of visible tokens + position embedding, mask token (+ its position) elsewhere;
    values and gradients of every parameter against the composition by hand."""
    weights = random_weights(3, (5, 8), (7, 7))
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[0, [0, 2, 5]] = True
    keep[1, [1, 3, 4]] = True
    ln_w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    ln_b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    mask_token = torch.randn(8, dtype=torch.float64, requires_grad=True)
    params = [ln_w, ln_b, pos, mask_token, *weights]
    out = sparse_conv_tokenize(x, weights, keep, backend=backend, packed=packed, num_visible=3 if packed else None,
                               norm=(ln_w, ln_b, 1e-6), pos_embed=pos, mask_token=mask_token)
    tokens = reference_tokenize(x, weights, keep, 16)
    normed = F.layer_norm(tokens, (8,), ln_w, ln_b, 1e-6) + pos
    expected = torch.where(keep[..., None], normed, mask_token + pos)
    if packed:
        expected = expected[keep].view(2, 3, 8)
    else:
        assert torch.allclose(out[~keep], (mask_token + pos).expand(2, 6, 8)[~keep])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(out)
    used = [p for p in params if not (packed and p is mask_token)]
    for got, want in zip(torch.autograd.grad((out * probe).sum(), used),
                         torch.autograd.grad((expected * probe).sum(), used)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # without a mask token masked positions stay exactly zero
    plain = sparse_conv_tokenize(x, weights, keep, backend=backend, norm=(None, None, 1e-6), pos_embed=pos)
    assert (plain[~keep] == 0).all()
    with pytest.raises(ValueError, match=r"pos_embed must be \(N, D\)"):
        sparse_conv_tokenize(x, weights, keep, backend=backend, pos_embed=pos[:5])
