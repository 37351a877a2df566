"""The triton backend against the dense reference: values, weight and image gradients, masks,
layouts, the custom ops (opcheck), torch.compile; real shapes and bf16 on a GPU.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) at small shapes;
the interpreter has no bf16 (NumPy has none; the ops refuse it there), so bf16 runs only on a GPU.
"""

import os

import pytest
import torch

from scott_kernels import SparseConvTokenizer, reference_tokenize, sparse_conv_tokenize
from scott_kernels.triton_backend import (conv_image, conv_image_wgrad, conv_relu, conv_relu_dgrad, conv_relu_wgrad,
                                          max_blur_pool, max_blur_pool_backward, triton_supports, visible_tables)

from conftest import DEVICES, HAS_CUDA, RecordingMode, random_weights
from test_backends import CONFIGS, _compare, _mask_cases

pytestmark = pytest.mark.skipif(not triton_supports(torch.device("cuda" if HAS_CUDA else "cpu")),
                                reason="triton is not installed (or TRITON_INTERPRET=1 is unset on a CPU machine)")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present); bf16 and real shapes")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"B{c[0]}_{c[1]}x{c[2]}_P{c[3]}_k{'-'.join(map(str, c[4]))}")
@pytest.mark.parametrize("mask_name", ["none", "all_visible", "random_0.4", "random_0.75", "mixed_rows", "all_masked"])
def test_triton_float64(device, cfg, mask_name):
    _compare("triton", cfg, mask_name, torch.float64, device, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=str)
@pytest.mark.parametrize("mask_name", ["none", "mixed_rows"])
def test_triton_float32(device, cfg, mask_name):
    _compare("triton", cfg, mask_name, torch.float32, device, rtol=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_triton_random_configs(seed):
    """Random geometry: kernel sizes, widths, grid, mask ratio (float64, exact)."""
    g = torch.Generator().manual_seed(100 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    stages = 1 if seed % 3 == 0 else 2
    P = 4 ** stages
    kernels = tuple(2 * r(0, 4) + 1 for _ in range(stages))
    widths = tuple(r(1, 20) for _ in range(stages))
    cfg = (r(1, 3), P * r(1, 4), P * r(1, 4), P, kernels, widths)
    _compare("triton", cfg, ["random_0.4", "random_0.75", "mixed_rows", "none"][seed % 4], torch.float64,
             "cuda" if HAS_CUDA else "cpu", 1e-10)


def _low_precision_errors(dtype, device, B, size, widths, keep, autocast=False, backend_under_test="triton"):
    """Max errors (values, each weight gradient) of a backend and of the reference run in
    ``dtype``, both against the float64 reference."""
    N = (size // 16) ** 2
    weights = random_weights(3, widths, (7, 7), dtype=torch.float64, device=device)
    x = torch.randn(B, 3, size, size, dtype=torch.float64, device=device)
    exact = reference_tokenize(x, weights, keep, 16)
    probe = torch.randn_like(exact)
    exact_grads = torch.autograd.grad((exact * probe).sum(), weights)
    errors = {}
    for backend in ("reference", backend_under_test):
        if autocast:
            w = [t.detach().float().requires_grad_(True) for t in weights]
            with torch.autocast(device_type=device, dtype=dtype):
                out = sparse_conv_tokenize(x.float(), w, keep, backend=backend)
        else:
            w = [t.detach().to(dtype).requires_grad_(True) for t in weights]
            out = sparse_conv_tokenize(x.to(dtype), w, keep, backend=backend)
        assert out.dtype == dtype and out.shape == (B, N, widths[-1])
        grads = torch.autograd.grad((out.double() * probe).sum(), w)
        errors[backend] = [(out.double() - exact).abs().max().item()] + \
                          [(g.double() - e).abs().max().item() for g, e in zip(grads, exact_grads)]
    scales = [exact.abs().max().item()] + [e.abs().max().item() for e in exact_grads]
    return errors[backend_under_test], errors["reference"], scales


def _assert_flash_rule(ours, theirs, scales, atol=1e-3):
    """Our error at most 2x the error of the dense reference in the same precision, plus a small atol."""
    for o, t, s in zip(ours, theirs, scales):
        assert o <= 2 * t + atol * s, f"error {o:.3e} vs reference-in-low-precision {t:.3e} (scale {s:.3e})"


@pytest.mark.parametrize("mask_name", ["none", "random_0.4"])
def test_triton_float16_small(mask_name):
    device = "cuda" if HAS_CUDA else "cpu"
    keep = _mask_cases(2, 9)[mask_name]
    keep = None if keep is None else keep.to(device)
    _assert_flash_rule(*_low_precision_errors(torch.float16, device, 2, 48, (8, 16), keep))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ratio", [None, 0.6, 0.9])
def test_triton_real_shapes_gpu(dtype, ratio):
    """B=64, 224x224, SCOTT widths (64, 384): the flash-attention rule in every dtype."""
    keep = None if ratio is None else torch.rand(64, 196, device="cuda") >= ratio
    _assert_flash_rule(*_low_precision_errors(dtype, "cuda", 64, 224, (64, 384), keep))


@needs_gpu
def test_triton_autocast_bf16_gpu():
    keep = torch.rand(8, 196, device="cuda") >= 0.6
    _assert_flash_rule(*_low_precision_errors(torch.bfloat16, "cuda", 8, 224, (64, 384), keep, autocast=True))


def _fixed_count_keep(B, N, k, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(B, N, generator=g).argsort(1)
    keep = torch.zeros(B, N, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], True)
    return keep.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_num_visible_and_packed_layout(device):
    """num_visible (no host read-back) gives the same tokens; packed = visible rows in order."""
    weights = random_weights(3, (6, 10), (7, 7), device=device)
    x = torch.randn(3, 3, 48, 64, dtype=torch.float64, device=device)
    keep = _fixed_count_keep(3, 12, 5, device)
    ref = reference_tokenize(x, weights, keep, 16)
    out = sparse_conv_tokenize(x, weights, keep, backend="triton", num_visible=5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    packed = sparse_conv_tokenize(x, weights, keep, backend="triton", num_visible=5, packed=True)
    assert packed.shape == (3, 5, 10) and packed.is_contiguous()
    torch.testing.assert_close(packed, ref[keep].view(3, 5, 10), rtol=1e-10, atol=1e-12)
    # the same layout from the other backends, and without num_visible
    for backend in ("reference", "torch", "triton"):
        other = sparse_conv_tokenize(x, weights, keep, backend=backend, packed=True)
        torch.testing.assert_close(other, packed, rtol=1e-10, atol=1e-12)
    # gradients through the packed layout
    probe = torch.randn_like(packed)
    got = torch.autograd.grad((packed * probe).sum(), weights)
    expected = torch.autograd.grad((ref[keep].view(3, 5, 10) * probe).sum(), weights)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_bad_num_visible():
    weights = random_weights(3, (4, 4), (7, 7))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _fixed_count_keep(2, 4, 2)
    with pytest.raises(ValueError, match="num_visible must be in"):
        sparse_conv_tokenize(x, weights, keep, backend="triton", num_visible=5)
    with pytest.raises(TypeError, match="num_visible must be an int"):
        sparse_conv_tokenize(x, weights, keep, backend="triton", num_visible=2.0)
    with pytest.raises(ValueError, match="keep is None"):
        sparse_conv_tokenize(x, weights, None, backend="triton", num_visible=2)
    uneven = keep.clone()
    uneven[0] = True
    with pytest.raises(ValueError, match="same number of visible patches"):
        sparse_conv_tokenize(x, weights, uneven, backend="triton", packed=True)
    # a keep that contradicts num_visible: on a CPU a ValueError naming the row; below the check,
    # the tables' device-side assertion (what a GPU raises), never a read out of bounds
    with pytest.raises(ValueError, match="row 0 holds 4 visible patches but num_visible=2"):
        sparse_conv_tokenize(x, weights, uneven, backend="triton", num_visible=2)
    with pytest.raises(RuntimeError, match="num_visible"):
        visible_tables(uneven, 2, 2, 2, uneven.device, num_visible=2)


def test_visible_tables_without_read_back():
    keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    slot, tile_pos = visible_tables(keep, 2, 2, 2, keep.device, num_visible=2)
    assert slot.dtype == torch.int32 and tile_pos.dtype == torch.int64
    assert slot.view(-1).tolist() == [0, -1, 1, -1, -1, 2, 3, -1]
    assert tile_pos.tolist() == [0, 2, 5, 6]


def test_no_leak_from_masked_patches():
    weights = random_weights(3, (6, 8), (7, 7))
    keep = torch.rand(2, 12) >= 0.5
    keep[:, 0] = True
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    pixel_mask = keep.view(2, 1, 3, 4).repeat_interleave(16, 2).repeat_interleave(16, 3)
    x2 = torch.where(pixel_mask, x, torch.randn_like(x) * 100)
    a = sparse_conv_tokenize(x, weights, keep, backend="triton")
    b = sparse_conv_tokenize(x2, weights, keep, backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("keep_kind", ["none", "random"])
def test_image_gradient(keep_kind):
    weights = random_weights(3, (4, 5), (7, 7), requires_grad=False)
    keep = None if keep_kind == "none" else torch.rand(2, 6) >= 0.4
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(reference_tokenize(x, weights, keep, 16).sum(), x)
    (got,) = torch.autograd.grad(sparse_conv_tokenize(x, weights, keep, backend="triton").sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_module_with_triton_backend():
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, backend="triton").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = _fixed_count_keep(2, 4, 3)
    out = tok(x, keep, num_visible=3)
    torch.testing.assert_close(out, reference_tokenize(x, tok.weights, keep, 16), rtol=1e-10, atol=1e-12)
    assert tok(x, keep, num_visible=3, packed=True).shape == (2, 3, 8)


# --- the custom ops themselves ------------------------------------------------------------------
def _op_samples(device="cpu"):
    keep = torch.tensor([[True, False, True, True, False, True], [False, False, True, False, True, True]],
                        device=device)
    slot, tile_pos = visible_tables(keep, 2, 2, 3, keep.device)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, device=device, requires_grad=True)
    w1 = torch.randn(5, 3, 7, 7, dtype=torch.float64, device=device, requires_grad=True)
    w2 = torch.randn(6, 5, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    a1 = conv_relu(x, w1, slot, tile_pos, 16, True)
    p1 = max_blur_pool(a1, slot, tile_pos).detach().requires_grad_(True)
    a2 = conv_relu(p1, w2, slot, tile_pos, 4, False)
    return dict(x=x, w1=w1, w2=w2, a1=a1.detach().requires_grad_(True), p1=p1, a2=a2.detach(),
                slot=slot, tile_pos=tile_pos)


def test_opcheck_triton_ops():
    s = _op_samples()
    g1 = torch.randn_like(s["a1"])
    g2 = torch.randn_like(s["a2"])
    cases = [
        (conv_relu, (s["x"], s["w1"], s["slot"], s["tile_pos"], 16, True)),
        (conv_relu, (s["p1"], s["w2"], s["slot"], s["tile_pos"], 4, False)),
        (max_blur_pool, (s["a1"], s["slot"], s["tile_pos"])),
        (max_blur_pool_backward, (torch.randn_like(s["p1"]), s["a1"].detach(), s["slot"], s["tile_pos"])),
        (conv_relu_wgrad, (g2, s["a2"], s["p1"].detach(), s["w2"].detach(), s["slot"], s["tile_pos"], 4, False)),
        (conv_relu_wgrad, (g1, s["a1"].detach(), s["x"].detach(), s["w1"].detach(), s["slot"], s["tile_pos"], 16,
                           True)),
        (conv_relu_dgrad, (g2, s["a2"], s["w2"].detach(), s["slot"], s["tile_pos"], 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_gradcheck_ops():
    """Each op's backward is the exact adjoint of its forward (finite differences, float64)."""
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])   # 2x2 grids of 4x4 patches
    slot, tile_pos = visible_tables(keep, 2, 2, 2, keep.device)
    src = torch.randn(4, 4, 4, 2, dtype=torch.float64, requires_grad=True)        # compact (M, 4, 4, C)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: conv_relu(a, b, slot, tile_pos, 4, False), (src, w))
    image = torch.randn(2, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: conv_relu(a, b, slot, tile_pos, 4, True), (image, w))
    act = torch.rand(4, 2, 2, 3, dtype=torch.float64, requires_grad=True)        # post-ReLU: non-negative
    torch.autograd.gradcheck(lambda a: max_blur_pool(a, slot, tile_pos), (act,))


def test_stage_ops_without_relu_and_pool_of_relu():
    """conv_relu(relu=False) is the plain convolution (its relu is conv_relu's output); the pool
    with relu=True is the pool of relu(act), and its gradient the composition's exactly, ReLU' 0
    at 0 as torch's relu (the tokenizer runs its stages this way: no mask pass in the backward)."""
    s = _op_samples()
    x, w1, w2, p1 = s["x"].detach(), s["w1"].detach(), s["w2"].detach(), s["p1"].detach()
    slot, tile_pos = s["slot"], s["tile_pos"]
    y1 = conv_relu(x, w1, slot, tile_pos, 16, True, None, False)
    assert (y1 < 0).any()
    torch.testing.assert_close(y1.clamp(min=0), conv_relu(x, w1, slot, tile_pos, 16, True), rtol=0, atol=0)
    y2 = conv_relu(p1, w2, slot, tile_pos, 4, False, None, False)
    torch.testing.assert_close(y2.clamp(min=0), conv_relu(p1, w2, slot, tile_pos, 4, False), rtol=0, atol=0)
    y1 = y1.clone()
    y1[0, 0, :, :] = 0.0     # exact zeros, where ReLU' is 0
    y = y1.clone().requires_grad_(True)
    yc = y1.clone().requires_grad_(True)
    fused = max_blur_pool(y, slot, tile_pos, True)
    composed = max_blur_pool(torch.relu(yc), slot, tile_pos)
    torch.testing.assert_close(fused, composed, rtol=0, atol=0)
    g = torch.randn_like(fused)
    torch.testing.assert_close(torch.autograd.grad(fused, y, g)[0], torch.autograd.grad(composed, yc, g)[0],
                               rtol=0, atol=0)
    torch.library.opcheck(max_blur_pool, (y1.requires_grad_(True), slot, tile_pos, True))
    torch.library.opcheck(conv_relu, (s["p1"], s["w2"], slot, tile_pos, 4, False, None, False))


def test_conv_image_keeps_the_packed_images():
    """conv_image is conv_relu of the images plus the packed copy it read; the weight gradient
    from that copy, and the autograd through it, are conv_relu's."""
    s = _op_samples()
    x, w1, slot, tile_pos = s["x"].detach(), s["w1"].detach(), s["slot"], s["tile_pos"]
    out, packed = conv_image(x, w1, slot, tile_pos, 16)
    torch.testing.assert_close(out, conv_relu(x, w1, slot, tile_pos, 16, True), rtol=0, atol=0)
    g = torch.randn_like(out)
    torch.testing.assert_close(conv_image_wgrad(g, out, packed, w1, slot, tile_pos, 16),
                               conv_relu_wgrad(g, out, x, w1, slot, tile_pos, 16, True), rtol=0, atol=0)
    xa, wa = x.clone().requires_grad_(True), w1.clone().requires_grad_(True)
    xb, wb = x.clone().requires_grad_(True), w1.clone().requires_grad_(True)
    got = torch.autograd.grad(conv_image(xa, wa, slot, tile_pos, 16)[0], (xa, wa), g)
    want = torch.autograd.grad(conv_relu(xb, wb, slot, tile_pos, 16, True), (xb, wb), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(conv_image, (s["x"], s["w1"], slot, tile_pos, 16))
    torch.library.opcheck(conv_image_wgrad, (g, out, packed, w1, slot, tile_pos, 16))
    with pytest.raises(ValueError, match="packed must be"):
        conv_image_wgrad(g, out, packed[:, 1:], w1, slot, tile_pos, 16)


def test_corrupt_tables_stay_in_bounds():
    """A tile position outside the grid or a slot naming no tile never reads past a tensor."""
    s = _op_samples()
    bad_pos = s["tile_pos"].clone()
    bad_pos[0] = 10 ** 12
    bad_slot = s["slot"].clone()
    bad_slot.view(-1)[1] = 10 ** 6
    out = conv_relu(s["x"].detach(), s["w1"].detach(), bad_slot, bad_pos, 16, True)
    assert torch.isfinite(out).all()
    assert torch.isfinite(max_blur_pool(s["a1"].detach(), bad_slot, bad_pos)).all()


def test_ops_reject_bad_tables():
    s = _op_samples()
    with pytest.raises(TypeError, match="slot must be a 3-D int32"):
        max_blur_pool(s["a1"], s["slot"].long(), s["tile_pos"])
    with pytest.raises(ValueError, match="expected a compact"):
        max_blur_pool(s["a1"][:, :3], s["slot"], s["tile_pos"])


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_with_num_visible(device):
    """With num_visible the whole forward and backward trace into one graph (no read-back)."""
    torch._dynamo.reset()
    tok = SparseConvTokenizer(img_size=32, embed_dim=8, hidden_channels=4, backend="triton").double().to(device)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64, device=device)
    keep = _fixed_count_keep(2, 6, 4, device)
    tok.strict_img_size = False
    compiled = torch.compile(lambda a, k: tok(a, k, num_visible=4, packed=True), fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(x, keep)
    ref = reference_tokenize(x, tok.weights, keep, 16)[keep].view(2, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(out.square().sum(), tok.convs[0].weight)
    (expected,) = torch.autograd.grad(ref.square().sum(), tok.convs[0].weight)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


@needs_gpu
def test_cuda_graph_capture():
    tok = SparseConvTokenizer(embed_dim=384, backend="triton").cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    keep = _fixed_count_keep(8, 196, 78, "cuda")
    out = tok(x, keep, num_visible=78)          # warm-up: compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = tok(x, keep, num_visible=78)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static, out, rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="only Triton's CPU interpreter lacks bfloat16")
def test_bfloat16_under_the_interpreter_is_refused():
    """Triton's CPU interpreter computes on NumPy arrays, which have no bfloat16: its results there
    were silently wrong (errors of 1e11 against the reference), so every op refuses bfloat16 there
    with an error naming the op, and the tokenizer (autocast to bfloat16 included) raises it."""
    weights = random_weights(3, (8, 16), (7, 7), dtype=torch.float32)
    x = torch.randn(2, 3, 32, 48)
    keep = _fixed_count_keep(2, 6, 3)
    for num_visible in (3, None):
        with pytest.raises(TypeError, match=r"triton_\w+: bfloat16 does not run under Triton's CPU interpreter"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                sparse_conv_tokenize(x, weights, keep, backend="triton", num_visible=num_visible)
        with pytest.raises(TypeError, match="bfloat16 does not run under Triton's CPU interpreter"):
            sparse_conv_tokenize(x.bfloat16(), [w.bfloat16() for w in weights], keep, backend="triton",
                                 num_visible=num_visible)
    s = _op_samples()
    with pytest.raises(TypeError, match="triton_max_blur_pool: bfloat16 does not run"):
        max_blur_pool(s["a2"].detach().bfloat16(), s["slot"], s["tile_pos"])


@needs_gpu
def test_reduce_overhead_compile_across_shapes(monkeypatch):
    """The README's capture recipe, torch.compile(mode="reduce-overhead") (CUDA graph trees), with
    two batch sizes in turn: each shape's warm-up and capture allocate from the graphs' private
    pool, where no weight-gradient counter buffer may be kept between calls. Values and weight
    gradients equal the float64 reference on every call of either shape."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # float32 GEMMs in IEEE float32
    torch._dynamo.reset()
    torch.manual_seed(0)
    tok = SparseConvTokenizer(img_size=64, embed_dim=64, hidden_channels=32, backend="triton").cuda()
    weights = [tok.convs[0].weight, tok.convs[1].weight]

    def step(x, keep):
        out = tok(x, keep, num_visible=6, packed=True)
        return out, torch.autograd.grad(out.square().sum(), weights)

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):
        for batch in (4, 2):
            x = torch.randn(batch, 3, 64, 64, device="cuda")
            keep = _fixed_count_keep(batch, 16, 6, "cuda")
            out, grads = compiled(x, keep)
            out, grads = out.clone(), [g.clone() for g in grads]
            ref_weights = [w.detach().double().requires_grad_(True) for w in weights]
            ref = reference_tokenize(x.double(), ref_weights, keep, 16)[keep].view(batch, 6, 64)
            ref_grads = torch.autograd.grad(ref.square().sum(), ref_weights)
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item())
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.float64])
def test_fused_pixel_normalisation(backend, image_dtype):
    """uint8 (or float) images with per-channel mean/std: equal to normalising first, then the
    float64 reference; masked patches contribute nothing."""
    weights = random_weights(3, (6, 8), (7, 7))
    raw = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    keep = torch.rand(2, 6) >= 0.4
    normalised = (raw.double() - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    expected = reference_tokenize(normalised, weights, keep, 16)
    out = sparse_conv_tokenize(raw.to(image_dtype), weights, keep, backend=backend, pixel_mean=mean, pixel_std=std)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(out.sum(), weights)
    want = torch.autograd.grad(expected.sum(), weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_pixel_normalisation_errors():
    weights = random_weights(3, (4, 4), (7, 7))
    raw = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="pixel_mean and pixel_std go together"):
        sparse_conv_tokenize(raw, weights, pixel_mean=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="one value per image channel"):
        sparse_conv_tokenize(raw, weights, pixel_mean=[0.0], pixel_std=[1.0])
    with pytest.raises(ValueError, match="pixel_std must be positive"):
        sparse_conv_tokenize(raw, weights, pixel_mean=[0.0] * 3, pixel_std=[1.0, 0.0, 1.0])
    with pytest.raises(TypeError, match="images must be uint8, float16"):
        sparse_conv_tokenize(raw.to(torch.int32), weights)


def test_gradient_ops_take_a_masked_gradient():
    """out=None: the gradient comes already multiplied by relu'(out); the same result."""
    s = _op_samples()
    g1 = torch.randn_like(s["a1"])
    g2 = torch.randn_like(s["a2"])
    masked2 = torch.where(s["a2"] > 0, g2, 0.0)
    masked1 = torch.where(s["a1"] > 0, g1, 0.0).detach()
    p1, w2 = s["p1"].detach(), s["w2"].detach()
    torch.testing.assert_close(conv_relu_wgrad(masked2, None, p1, w2, s["slot"], s["tile_pos"], 4, False),
                               conv_relu_wgrad(g2, s["a2"], p1, w2, s["slot"], s["tile_pos"], 4, False),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_relu_dgrad(masked2, None, w2, s["slot"], s["tile_pos"], 4),
                               conv_relu_dgrad(g2, s["a2"], w2, s["slot"], s["tile_pos"], 4), rtol=1e-12, atol=1e-12)
    x, w1 = s["x"].detach(), s["w1"].detach()
    torch.testing.assert_close(conv_relu_wgrad(masked1, None, x, w1, s["slot"], s["tile_pos"], 16, True),
                               conv_relu_wgrad(g1, s["a1"].detach(), x, w1, s["slot"], s["tile_pos"], 16, True),
                               rtol=1e-12, atol=1e-12)


def test_wide_offsets(monkeypatch):
    """The 64-bit offset variant (used for tensors of 2^30 elements or more) computes the same."""
    from scott_kernels import triton_conv, triton_image
    for module in (triton_conv, triton_image):   # the compact-source and the image-stage launches
        monkeypatch.setattr(module, "_wide", lambda *tensors: True)
    _compare("triton", (2, 32, 48, 16, (7, 5), (6, 10)), "random_0.4", torch.float64, "cpu", 1e-10)


# --- the last pool fused with the token epilogue ---------------------------------------------
from scott_kernels.functional import token_epilogue                       # noqa: E402
from scott_kernels.reference import max_blur_pool as dense_max_blur_pool  # noqa: E402
from scott_kernels.triton_pool import pool_tokens, pool_tokens_apply, pool_tokens_backward  # noqa: E402

_EPILOGUE_PARTS = {
    "all": dict(norm="wb", pos=True, mask_token=True),
    "norm": dict(norm="wb", pos=False, mask_token=False),
    "norm_no_affine": dict(norm="", pos=True, mask_token=False),
    "norm_weight_only": dict(norm="w", pos=False, mask_token=True),
    "pos": dict(norm=None, pos=True, mask_token=False),
    "mask_token": dict(norm=None, pos=False, mask_token=True),
}


def _epilogue_keep(kind, B, N, packed, g):
    if kind == "none":
        return None
    if packed:   # the same count in every row
        k = {"all_visible": N, "all_masked": 0, "random": N // 2, "single": 1}[kind]
        order = torch.rand(B, N, generator=g).argsort(1)
        return torch.zeros(B, N, dtype=torch.bool).scatter_(1, order[:, :k], True)
    keep = _mask_cases(B, N)[{"all_visible": "all_visible", "all_masked": "all_masked", "random": "random_0.4",
                              "single": "mixed_rows"}[kind]]
    return keep


# every mask kind, packed or not, with the whole epilogue; each part alone or partial on a mask
# with fully masked rows and a single visible patch (dense), and on a random one (packed)
_EPILOGUE_CASES = ([("all", kind, packed) for kind in ("none", "all_visible", "random", "single", "all_masked")
                    for packed in (False, True)]
                   + [(parts, "single", False) for parts in _EPILOGUE_PARTS if parts != "all"]
                   + [(parts, "random", True) for parts in _EPILOGUE_PARTS if parts != "all"])


@pytest.mark.parametrize("parts,mask_kind,packed", _EPILOGUE_CASES, ids=lambda v: str(v))
def test_pool_tokens_matches_composition(parts, mask_kind, packed):
    """pool_tokens (last MaxBlurPool + LayerNorm + pos_embed + mask token, one kernel) against
    MaxBlurPool -> token_epilogue in float64: values and the gradients of the activations and
    of every epilogue parameter, for every mask kind, packed or not, each part on or off."""
    g = torch.Generator().manual_seed(7)
    B, GH, GW, D = 2, 3, 4, 6
    N = GH * GW
    keep = _epilogue_keep(mask_kind, B, N, packed, g)
    slot, tile_pos = visible_tables(keep, B, GH, GW, torch.device("cpu"))
    M = tile_pos.shape[0]
    act = torch.rand(M, 2, 2, D, dtype=torch.float64, generator=g)
    act = torch.where(act < 0.25, torch.zeros_like(act), act).requires_grad_(True)   # ReLU outputs, ties at 0
    spec = _EPILOGUE_PARTS[parts]
    p = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(True)
    ln_w, ln_b = p(D), p(D)
    norm = None if spec["norm"] is None else (ln_w if "w" in spec["norm"] else None,
                                               ln_b if "b" in spec["norm"] else None, 1e-5)
    pos = p(N, D) if spec["pos"] else None
    mask_token = p(D) if spec["mask_token"] else None
    dense = keep is None or not packed
    fill = mask_token if keep is not None and not packed else None

    out = pool_tokens_apply(act, slot, tile_pos, norm, pos, fill, dense)
    # the composition: dense MaxBlurPool of the scattered activations, masked, then the epilogue
    grid = act.new_zeros((B * N, 2, 2, D)).index_copy(0, tile_pos, act)
    image = grid.view(B, GH, GW, 2, 2, D).permute(0, 5, 1, 3, 2, 4).reshape(B, D, 2 * GH, 2 * GW)
    tokens = dense_max_blur_pool(image).flatten(2).transpose(1, 2)
    if keep is not None:
        tokens = tokens * keep.unsqueeze(-1)
        if packed:
            tokens = tokens[keep].view(B, -1, D)
    expected = token_epilogue(tokens, keep, packed, norm, pos, mask_token)
    assert out.shape == expected.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    params = [t for t in (act, ln_w, ln_b, pos, mask_token) if t is not None and t.requires_grad]
    probe = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((out * probe).sum(), params, allow_unused=True)
    want = torch.autograd.grad((expected * probe).sum(), params, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or (a == 0).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fill_rows", [3, 64])
def test_pool_tokens_fill_shares(monkeypatch, fill_rows):
    """The dense fused last pool: every program pools its tiles and fills the masked rows of its
    share of the (B, N) rows. With few visible patches the grid grows past the pooling programs
    (FILL_ROWS 3: shares of 1-2 rows, most programs pool nothing; 64: shares longer than a row
    block, several loop trips). Every row is written once, equal to the composition."""
    from scott_kernels import triton_pool
    monkeypatch.setattr(triton_pool, "FILL_ROWS", fill_rows)
    g = torch.Generator().manual_seed(11)
    B, GH, GW, D = 3, 5, 7, 5
    N = GH * GW
    for k in (0, 1, 17, N):
        keep = torch.zeros(B, N, dtype=torch.bool)
        keep.scatter_(1, torch.rand(B, N, generator=g).argsort(1)[:, :k], True)
        slot, tile_pos = visible_tables(keep, B, GH, GW, torch.device("cpu"))
        act = torch.randn(B * k, 2, 2, D, dtype=torch.float64, generator=g)
        pos = torch.randn(N, D, dtype=torch.float64, generator=g)
        mtok = torch.randn(D, dtype=torch.float64, generator=g)
        out = pool_tokens_apply(act, slot, tile_pos, None, pos, mtok, True)
        grid = act.new_zeros((B * N, 2, 2, D)).index_copy(0, tile_pos, act)
        image = grid.view(B, GH, GW, 2, 2, D).permute(0, 5, 1, 3, 2, 4).reshape(B, D, 2 * GH, 2 * GW)
        tokens = dense_max_blur_pool(image).flatten(2).transpose(1, 2) * keep.unsqueeze(-1)
        expected = token_epilogue(tokens, keep, False, None, pos, mtok)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_pool_tokens_opcheck():
    """The fused op and its backward as custom ops: schema, fake tensors, autograd registration.
    (Gradient exactness is checked against float64 autograd of the composition above.)"""
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    slot, tile_pos = visible_tables(keep, 2, 2, 2, keep.device)
    act = torch.rand(4, 2, 2, 3, dtype=torch.float64)
    w, b, pos, mtok = (torch.randn(*s, dtype=torch.float64) for s in ((3,), (3,), (4, 3), (3,)))
    args = (act, slot, tile_pos, w, b, pos, mtok, 1e-5, True, True, torch.float64)
    torch.library.opcheck(pool_tokens, args)
    tokens, x, stats = pool_tokens(*args)
    torch.library.opcheck(pool_tokens_backward, (torch.randn_like(tokens), act, x, stats, slot, tile_pos, w, True,
                                                 True, True, True, False))
    torch.library.opcheck(pool_tokens, (act - 0.5, *args[1:], True))


def test_pool_tokens_of_relu():
    """relu=True: the fused pool and epilogue of relu(act), values and gradients exactly the
    composition's (the tokenizer's last stage)."""
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    slot, tile_pos = visible_tables(keep, 2, 2, 2, keep.device)
    act = torch.randn(4, 2, 2, 3, dtype=torch.float64)
    act[0, 0] = 0.0
    norm = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), 1e-5)
    pos, mtok = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    a, b = act.clone().requires_grad_(True), act.clone().requires_grad_(True)
    fused = pool_tokens_apply(a, slot, tile_pos, norm, pos, mtok, True, relu=True)
    composed = pool_tokens_apply(torch.relu(b), slot, tile_pos, norm, pos, mtok, True)
    torch.testing.assert_close(fused, composed, rtol=0, atol=0)
    g = torch.randn_like(fused)
    torch.testing.assert_close(torch.autograd.grad(fused, a, g)[0], torch.autograd.grad(composed, b, g)[0],
                               rtol=0, atol=0)


def test_pool_backward_relu_mask():
    """relu_mask=True: the pool's input gradient times (act > 0), the gradient before the ReLU."""
    s = _op_samples()
    act = s["a1"].detach()
    grad = torch.randn_like(s["p1"])
    plain = max_blur_pool_backward(grad, act, s["slot"], s["tile_pos"])
    masked = max_blur_pool_backward(grad, act, s["slot"], s["tile_pos"], True)
    assert (act == 0).any() and (plain[act == 0] != 0).any()     # the case the mask is for
    torch.testing.assert_close(masked, plain * (act > 0), rtol=0, atol=0)
    torch.library.opcheck(max_blur_pool_backward, (grad, act, s["slot"], s["tile_pos"], True))


def test_token_epilogue_end_to_end_fp32_autocast_dtype():
    """Through sparse_conv_tokenize: the fused epilogue returns what the unfused one does, in
    float32 (and the LayerNorm's float32 under autocast)."""
    weights = random_weights(3, (5, 8), (7, 7), dtype=torch.float32)
    x = torch.randn(2, 3, 32, 48)
    keep = _fixed_count_keep(2, 6, 3)
    ln = (torch.randn(8), torch.randn(8), 1e-6)
    pos, mtok = torch.randn(6, 8), torch.randn(8)
    for packed in (False, True):
        out = sparse_conv_tokenize(x, weights, keep, backend="triton", packed=packed, num_visible=3, norm=ln,
                                   pos_embed=pos, mask_token=mtok)
        tokens = sparse_conv_tokenize(x, weights, keep, backend="torch", packed=packed, num_visible=3)
        expected = token_epilogue(tokens, keep, packed, ln, pos, mtok)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_visible_tables_one_launch(monkeypatch):
    """The one-launch tables equal compact.visible_tables for random masks (all-visible,
    all-masked and single-visible rows included, rows longer than a block), with the neighbour
    table and a weight's two GEMM layouts built in the same launch (more layout blocks than rows,
    and fewer; several blocks per program; cast to the layout dtype), and stay inside their tables
    when a row holds the wrong count."""
    from scott_kernels import triton_tables
    from scott_kernels.compact import visible_tables as torch_tables
    from scott_kernels.triton_conv import weight_layouts
    from scott_kernels.triton_tables import neighbour_table, visible_tables as kernel_tables
    monkeypatch.setattr(triton_tables, "_LAYOUT_PROGRAMS", 5)   # 16 layout blocks: up to 4 per program
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=g),       # 1 block of 1024
               torch.randn(40, 12, 5, 5, generator=g)]                           # 16 blocks, float32
    for batch, gh, gw, k in ((3, 4, 4, 16), (3, 4, 4, 0), (2, 3, 5, 1), (2, 2, 3, 4), (2, 40, 30, 700)):
        keep = torch.zeros(batch, gh * gw, dtype=torch.bool)
        keep.scatter_(1, torch.rand(batch, gh * gw, generator=g).argsort(1)[:, :k], True)
        want_slot, want_pos = torch_tables(keep, batch, gh, gw, keep.device, k)
        for radius in (-1, 0, 1, 2):
            weight = weights[radius % 2] if radius >= 0 else None
            slot, tile_pos, nbr, w_gemm, w_t = kernel_tables(keep, k, gh, gw, radius, weight, torch.float64)
            assert torch.equal(slot, want_slot) and torch.equal(tile_pos, want_pos), (batch, gh, gw, k)
            if radius < 0:
                assert nbr.numel() == 0 and w_gemm.numel() == 0 and w_t.numel() == 0
            else:   # the neighbour table and the weight layouts built in the same launch
                assert torch.equal(nbr, neighbour_table(want_slot, want_pos, radius)), (batch, gh, gw, k, radius)
                want = weight_layouts(weight.double())
                assert w_gemm.dtype == w_t.dtype == torch.float64
                assert torch.equal(w_gemm, want[0]) and torch.equal(w_t, want[1]), (batch, gh, gw, k, radius)
    # a float32 weight laid out in float16 (as under autocast): the same rounding as torch's cast
    _, _, _, w_gemm, w_t = kernel_tables(keep, k, gh, gw, 1, weights[1], torch.float16)
    want = weight_layouts(weights[1].half())
    assert w_gemm.dtype == torch.float16 and torch.equal(w_gemm, want[0]) and torch.equal(w_t, want[1])
    torch.library.opcheck(kernel_tables, (keep, 700, 40, 30))
    torch.library.opcheck(kernel_tables, (keep, 700, 40, 30, 1))
    torch.library.opcheck(kernel_tables, (keep, 700, 40, 30, 1, weights[1], torch.float64))
    torch.library.opcheck(neighbour_table, (want_slot, want_pos, 1))
    # rows with one patch too many and one too few: the first K numbered, the extra one masked,
    # the missing tile at the row's first position; on a GPU a device assertion also fires
    # (compiled in, debug=True: test_codegen; the interpreter skips device assertions)
    keep = torch.tensor([[True, True, True, False], [True, False, False, False]])
    slot, tile_pos, *_ = kernel_tables(keep, 2, 2, 2)
    assert slot.flatten().tolist() == [0, 1, -1, -1, 2, -1, -1, -1]
    assert tile_pos.tolist() == [0, 1, 4, 4]
    with pytest.raises(ValueError, match="weight must be a floating"):
        kernel_tables(keep, 2, 2, 2, 1, torch.ones(4, 4))


def test_pool_tokens_without_epilogue():
    """The last pool writing (B, N, D) or packed tokens directly, no epilogue: equal to the pool
    followed by the scatter, values and gradients; nothing is saved for a LayerNorm."""
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    slot, tile_pos = visible_tables(keep, 2, 2, 2, keep.device)
    act = (torch.rand(4, 2, 2, 3, dtype=torch.float64) - 0.3).requires_grad_(True)
    for dense in (True, False):
        tokens, x, stats = pool_tokens(act, slot, tile_pos, None, None, None, None, 0.0, False, dense,
                                       torch.float64, True)
        assert x.shape == (0, 3) and stats.shape == (0, 2)
        pooled = max_blur_pool(act, slot, tile_pos, True).reshape(4, 3)
        want = pooled.new_zeros(8, 3).index_copy(0, tile_pos, pooled).view(2, 4, 3) if dense else pooled.view(2, 2, 3)
        torch.testing.assert_close(tokens, want, rtol=0, atol=0)
        g = torch.randn_like(tokens)
        got, = torch.autograd.grad(tokens, act, g)
        ref, = torch.autograd.grad(want, act, g)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # the dense token gradient read in place by the pool's backward
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.library.opcheck(max_blur_pool_backward, (g, act.detach(), slot, tile_pos, True, True))
    with pytest.raises(ValueError, match="grad must be"):
        max_blur_pool_backward(g[:, :3], act.detach(), slot, tile_pos, True, True)


def test_weight_layouts_one_launch():
    """Both GEMM layouts of a weight from one kernel equal the torch layouts (channels padded to 8
    with zeros for the input gradient), and the input gradient computed from them equals the one
    that lays the weight out itself."""
    from scott_kernels.compact import gemm_weight, gemm_weight_transposed
    from scott_kernels.triton_conv import weight_layouts
    for c_out, c_in, k in ((6, 5, 5), (16, 8, 7), (3, 1, 3)):
        w = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
        w_gemm, w_t = weight_layouts(w)
        assert torch.equal(w_gemm, gemm_weight(w))
        c_w = -(-c_in // 8) * 8
        assert torch.equal(w_t, torch.nn.functional.pad(gemm_weight_transposed(w), (0, c_w - c_in)))
    torch.library.opcheck(weight_layouts, (w,))
    s = _op_samples()
    g = torch.randn_like(s["a2"])
    w2 = s["w2"].detach()
    w_gemm, w_t = weight_layouts(w2)
    want = conv_relu_dgrad(g, None, w2, s["slot"], s["tile_pos"], 4)
    got = conv_relu_dgrad(g, None, w2, s["slot"], s["tile_pos"], 4, None, w_gemm, w_t)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight layout"):
        conv_relu_dgrad(g, None, w2, s["slot"], s["tile_pos"], 4, None, w_gemm, w_t[:-1])


def _wgrad_cases(device, dtype, B, GH, GW, visible, patch, hidden, dim, g):
    """[(run, float64 reference)] for the compact and the image weight gradient ops at a random
    mask with ``visible`` patches per image: the reference is float64 autograd of the dense
    convolution of the masked source at the visible patches (the gradients are compact)."""
    import torch.nn.functional as F
    from scott_kernels import compact
    from scott_kernels.triton_image import conv_relu_wgrad_image

    keep = torch.zeros(B, GH * GW, dtype=torch.bool)
    keep.scatter_(1, torch.rand(B, GH * GW, generator=g).argsort(1)[:, :visible], True)
    slot, tile_pos = (t.to(device) for t in visible_tables(keep, B, GH, GW, keep.device))
    M = tile_pos.shape[0]
    q, side = patch // 2, patch // 4   # the compact source's side (a pooled stage), its conv's output side
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g).to(device)

    def dense_wgrad(image, weight, grad):
        w = weight.detach().double().clone().requires_grad_(True)
        out = F.conv2d(image.double(), w, stride=2, padding=w.shape[-1] // 2)
        s = out.shape[-1] // GW
        tiles = out.view(B, w.shape[0], GH, s, GW, s).permute(0, 2, 4, 3, 5, 1).reshape(-1, s, s, w.shape[0])
        return torch.autograd.grad((tiles[tile_pos] * grad.double()).sum(), w)[0]

    src, w2 = rand(M, q, q, hidden).to(dtype), rand(dim, hidden, 5, 5).to(dtype)
    grad2 = rand(M, side, side, dim).to(dtype)
    x, w1, grad1 = rand(B, 3, patch * GH, patch * GW).to(dtype), rand(hidden, 3, 7, 7).to(dtype), \
        rand(M, q, q, hidden).to(dtype)
    pixels = keep.to(device).view(B, 1, GH, 1, GW, 1).expand(B, 1, GH, patch, GW, patch).reshape(
        B, 1, patch * GH, patch * GW)
    return [
        (lambda: conv_relu_wgrad(grad2, None, src, w2, slot, tile_pos, q, False),
         dense_wgrad(compact.compact_to_image(src, tile_pos, (B, hidden, q * GH, q * GW)), w2, grad2)),
        (lambda: conv_relu_wgrad_image(grad1, None, x, w1, slot, tile_pos, patch),
         dense_wgrad(x * pixels, w1, grad1)),
    ]


@pytest.mark.parametrize("sms", [None, 64])
def test_weight_gradient_split_sums(monkeypatch, sms):
    """The weight gradients split over output pixels into partials that the split finishing each
    output tile last sums (one launch, no reduction kernel): with ``sms`` set, the splits a GPU of
    that many SMs gets (several per tile), else one. Equal to float64 autograd of the dense
    convolution of the masked source, for an image and a compact source; the arrival counters are
    all zero again afterwards, and a second call gives the same bits."""
    from scott_kernels import triton_conv

    if sms is not None:
        monkeypatch.setattr(triton_conv, "_sm_count", lambda device: sms)
    # compact source (M, 8, 8, 5), 5x5 kernel: 384 output pixels; images (2, 3, 64, 64), 7x7: 1536
    cases = _wgrad_cases("cpu", torch.float64, 2, 4, 4, 12, 16, 5, 6, torch.Generator().manual_seed(5))
    for run, want in cases:
        got = run()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert torch.equal(run(), got)
        assert not triton_conv._ARRIVAL_COUNTERS[torch.device("cpu")].any()
    if sms is not None:   # the case is the one it says: several splits per tile
        assert triton_conv._rows_per_cta(384, 13, torch.device("cpu")) < 384
        assert triton_conv._rows_per_cta(1536, 4, torch.device("cpu")) < 1536


def test_arrival_counter_buffers(monkeypatch):
    """One zeroed counter buffer per device (for its default stream), reused while large enough,
    grown when a launch needs more."""
    from scott_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_ARRIVAL_COUNTERS", {})
    cpu = torch.device("cpu")
    counters = triton_conv.arrival_counters(cpu, 10)
    assert list(triton_conv._ARRIVAL_COUNTERS) == [cpu]
    assert counters.dtype == torch.int32 and counters.numel() >= 10 and not counters.any()
    assert triton_conv.arrival_counters(cpu, 5) is counters
    bigger = triton_conv.arrival_counters(cpu, counters.numel() + 1)
    assert bigger.numel() > counters.numel() and not bigger.any()
    assert list(triton_conv._ARRIVAL_COUNTERS.values()) == [bigger]


@needs_gpu
def test_arrival_counters_off_the_default_stream(monkeypatch):
    """Only the default stream's launches share a kept buffer: a side stream (where CUDA graph
    capture and torch.compile's CUDA-graph warm-up allocate from a graph's private pool) gets
    fresh zeros every time, and keeps nothing."""
    from scott_kernels import triton_conv

    monkeypatch.setattr(triton_conv, "_ARRIVAL_COUNTERS", {})
    device = torch.device("cuda", torch.cuda.current_device())
    kept = triton_conv.arrival_counters(device, 8)
    assert triton_conv.arrival_counters(device, 8) is kept
    with torch.cuda.stream(torch.cuda.Stream()):
        first = triton_conv.arrival_counters(device, 8)
        second = triton_conv.arrival_counters(device, 8)
    assert first is not kept and second is not first
    torch.cuda.synchronize()
    assert not first.any() and not second.any()
    assert list(triton_conv._ARRIVAL_COUNTERS.values()) == [kept]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_weight_gradient_split_sums_gpu(dtype):
    """On the GPU, where the splits' CTAs run concurrently and the last to arrive sums: the weight
    gradients at headline-like shapes (several splits per tile) against float64, bit-identical
    run to run, the counters back at zero, the same bits from two streams at once and from a
    CUDA graph's replays (which get counters of their own)."""
    from scott_kernels import triton_conv

    device = torch.device("cuda")
    cases = _wgrad_cases(device, dtype, 16, 14, 14, 78, 16, 64, 192, torch.Generator().manual_seed(9))
    for run, want in cases:
        got = run()
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * scale)
        for _ in range(3):
            assert torch.equal(run(), got)
        torch.cuda.synchronize()
        assert not any(c.any() for c in triton_conv._ARRIVAL_COUNTERS.values())
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        outs = [None, None]
        torch.cuda.synchronize()
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                outs[i] = run()
        torch.cuda.synchronize()
        assert all(torch.equal(o, got) for o in outs)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            run()                     # warm-up on the capture stream (compiles, tunes)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            captured = run()
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, got)


# --- the tokenizer's two ops (what sparse_conv_tokenize runs: one op per direction) -----------------
from scott_kernels.triton_backend import tokenizer, tokenizer_backward  # noqa: E402


def _tokenizer_inputs(keep, num_visible=None, packed=False, epilogue=False, stages=2):
    """(inputs of the tokenizer op, the tensors to differentiate, the dense reference's tokens)."""
    patch = 4 ** stages
    x = torch.randn(2, 3, 2 * patch, 3 * patch, dtype=torch.float64, requires_grad=True)
    weights = random_weights(3, (5, 6, 4)[:stages], (7, 5, 3)[:stages])
    D, N = weights[-1].shape[0], 6
    ln_weight = ln_bias = pos = mask_token = None
    if epilogue:
        ln_weight, ln_bias = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
        pos, mask_token = torch.randn(N, D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
        for t in (ln_weight, ln_bias, pos, mask_token):
            t.requires_grad_(True)
    num_tiles = 2 * N if keep is None else int(keep.sum())
    fill = mask_token if keep is not None and not packed else None
    args = (x, weights, keep, None, ln_weight, ln_bias, pos, fill, patch, num_tiles, num_visible,
            keep is not None and not packed, 1e-5 if epilogue else None, torch.float64, torch.float64)
    want = reference_tokenize(x, weights, keep, patch)
    if epilogue or (keep is not None and packed):
        want = token_epilogue(want if not packed else want[keep].view(2, -1, D), keep, packed,
                              (ln_weight, ln_bias, 1e-5) if epilogue else None, pos, mask_token if epilogue else None)
    params = [x, *weights] + ([ln_weight, ln_bias, pos] + ([mask_token] if fill is not None else []) if epilogue else [])
    return args, params, want


_TOKENIZER_CASES = [
    dict(keep=_fixed_count_keep(2, 6, 3), num_visible=3),
    dict(keep=_fixed_count_keep(2, 6, 3), num_visible=3, packed=True, epilogue=True),
    dict(keep=torch.tensor([[True, False, False, True, True, False], [False] * 6]), epilogue=True),
    dict(keep=None, epilogue=True),
    dict(keep=_fixed_count_keep(2, 6, 1), num_visible=1, stages=1),
]


@pytest.mark.parametrize("case", range(len(_TOKENIZER_CASES)))
def test_tokenizer_ops(case):
    """The forward op's tokens and its registered autograd (what a caller of the op gets) against the
    float64 reference, values and every gradient; opcheck of both ops (fake shapes and strides,
    autograd registration, torch.compile)."""
    args, params, want = _tokenizer_inputs(**_TOKENIZER_CASES[case])
    out = tokenizer(*args)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-12)
    g = torch.randn(want.shape, dtype=want.dtype)
    for got, ref in zip(torch.autograd.grad(out[0], params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    torch.library.opcheck(tokenizer, args)
    x, weights, keep, pixel_norm, ln_weight, ln_bias, pos, fill, patch, *_, dense, eps, dtype, _ = args
    needs = [True] * (1 + len(weights)) + [t is not None for t in (ln_weight, ln_bias, pos, fill)]
    saved = [t.detach() for t in out[1:]]
    torch.library.opcheck(tokenizer_backward, (g, saved, x.detach(), [w.detach() for w in weights], pixel_norm,
                                               [None if t is None else t.detach() for t in (ln_weight, ln_bias, pos, fill)],
                                               patch, dense, eps is not None, dtype, needs))


def test_tokenizer_backward_with_a_frozen_weight():
    """A gradient not asked for is an empty tensor of the gradient's dtype, in the op and in its
    fake alike, also when the weights' dtype differs from the compute dtype (float32 images,
    float64 weights; the wanted gradients come in the weights' dtype)."""
    args, _, _ = _tokenizer_inputs(_fixed_count_keep(2, 6, 3), num_visible=3)
    x, weights = args[0].detach().float(), [w.detach() for w in args[1]]
    args = (x, weights, *args[2:13], torch.float32, torch.float32)
    out = tokenizer(*args)
    g = torch.randn_like(out[0])
    needs = [False, False, True, False, False, False, False]
    bwd_args = (g, [t.detach() for t in out[1:]], x, weights, None, [None] * 4, 16, True, False, torch.float32, needs)
    grads = tokenizer_backward(*bwd_args)
    assert grads[0].shape == grads[1].shape == (0,) and grads[0].dtype == grads[1].dtype == torch.float32
    assert grads[2].dtype == torch.float64 and grads[2].shape == weights[1].shape
    torch.library.opcheck(tokenizer_backward, bwd_args)


def test_eager_calls_run_the_op_bodies(monkeypatch):
    """A plain eager call (plain tensors or parameters, no mode, transform or profiler) runs the two
    ops' bodies without dispatching the ops; under a dispatch mode or the profiler it calls the ops,
    which the mode and the profiler then see; either way the same tokens and gradients, bit for bit."""
    from scott_kernels import triton_backend
    calls = []

    def counted(op, name):
        def call(*args):
            calls.append(name)
            return op(*args)
        return call

    monkeypatch.setattr(triton_backend, "tokenizer", counted(tokenizer, "forward"))
    monkeypatch.setattr(triton_backend, "tokenizer_backward", counted(tokenizer_backward, "backward"))

    keep = _fixed_count_keep(2, 6, 3)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    weights = [torch.nn.Parameter(w) for w in random_weights(3, (5, 6), (7, 5))]

    def step():
        tokens = triton_backend.triton_tokenize(x, weights, keep, 16, num_visible=3)
        return tokens, torch.autograd.grad(tokens, weights, torch.ones_like(tokens))

    plain = step()
    assert calls == []
    mode = RecordingMode()
    with mode:
        moded = step()
    assert calls == ["forward", "backward"]
    assert {"scott_kernels.triton_tokenizer.default", "scott_kernels.triton_tokenizer_backward.default"} <= set(mode.ops)
    calls.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        profiled = step()
    assert calls == ["forward", "backward"]
    for other in (moded, profiled):
        torch.testing.assert_close(other[0], plain[0], rtol=0, atol=0)
        for a, b in zip(other[1], plain[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_of_the_backward_refuses():
    """The backward op has no derivative: a gradient taken with create_graph=True refuses a second
    backward (through the op, which the eager path calls with grad mode on), never silently
    dropping the terms through it."""
    from scott_kernels import triton_backend
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    weights = [w.requires_grad_(True) for w in random_weights(3, (5, 6), (7, 5))]
    tokens = triton_backend.triton_tokenize(x, weights, _fixed_count_keep(2, 6, 3), 16, num_visible=3)
    grads = torch.autograd.grad(tokens.square().sum(), weights, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), weights)


def test_tables_launch_packs_the_images():
    """The tables launch's packing (every program packing every num_programs-th row, visibility
    read from keep) writes the packed images and the image GEMM's padded weight exactly as the
    packing launch does from the slot table: float64, float32 images cast to float16 as they are
    stored, uint8 images normalised; more rows than programs, and fewer; no visible patch."""
    from scott_kernels import triton_tables
    from scott_kernels.triton_image import _pack_image
    from scott_kernels.triton_tables import _visible_tables
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(5, 3, 7, 7, generator=g)
    norm = torch.tensor([[120.0, 110.0, 100.0], [1 / 60, 1 / 55, 1 / 50]])
    cases = [(torch.randn(3, 3, 32, 48, generator=g, dtype=torch.float64), None, torch.float64),
             (torch.randn(3, 3, 32, 48, generator=g), None, torch.float16),
             (torch.randint(0, 256, (3, 3, 32, 48), generator=g, dtype=torch.uint8), norm, torch.float32)]
    for programs in (5, 1024):
        triton_tables._PACK_PROGRAMS = programs
        try:
            for k in (3, 0):
                keep = _fixed_count_keep(3, 6, k, seed=k)
                slot, _ = visible_tables(keep, 3, 2, 3, keep.device, k)
                for x, table, dtype in cases:
                    normalize = table is not None
                    table_or_any = table if normalize else weight
                    *_, packed = _visible_tables(keep, k, 2, 3, -1, None, None,
                                                 (x, table_or_any, normalize, weight, 16, dtype))
                    want, _, want_w = _pack_image(x, slot, 3 * k, 16, 7, table_or_any, normalize, dtype,
                                                  weight.to(dtype))
                    assert packed[0].dtype == dtype and torch.equal(packed[0], want), (programs, k, dtype)
                    assert torch.equal(packed[1], want_w), (programs, k, dtype)
                    assert packed[0].any() == (k > 0)
        finally:
            triton_tables._PACK_PROGRAMS = 1024
