"""The cuda backend (csrc/tokenizer*.{h,cpp,cu}) against the dense reference.

Its ops run the CUDA kernels on GPU tensors and their C++ twin on CPU tensors; both call the
same operand and pooling functions (csrc/tokenizer.h), so on a machine without a GPU these tests
check the kernels' index logic through the twin (float32/float64), including a fuzz over 200
random configurations. On a GPU the same tests run the CUDA kernels, plus real shapes in bf16,
fp16 and fp32 (flash-attention rule), CUDA graphs and torch.compile.
"""

import pytest
import torch

from scott_kernels import SparseConvTokenizer, build_info, reference_tokenize, sparse_conv_tokenize
from scott_kernels.compact import visible_tables
from scott_kernels.cuda_backend import (conv_relu, conv_relu_dgrad, conv_relu_wgrad, cuda_tokenize, max_blur_pool,
                                        max_blur_pool_backward)

from conftest import HAS_CUDA, random_weights
from test_backends import CONFIGS, _mask_cases
from test_triton_backend import _assert_flash_rule, _fixed_count_keep, _low_precision_errors

CUDA_BUILT = bool(build_info()["cuda"])
needs_gpu = pytest.mark.skipif(not (HAS_CUDA and CUDA_BUILT),
                               reason="needs a CUDA GPU and a CUDA build of scott_kernels (none present)")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_gpu)]


def _tokenize(device, *args, **kwargs):
    """backend="cuda" on a GPU; the kernels' C++ twin on the CPU."""
    if device == "cuda":
        return sparse_conv_tokenize(*args, backend="cuda", **kwargs)
    x, weights, keep = args
    return cuda_tokenize(x, weights, keep, kwargs.pop("patch_size", 16), **kwargs)


def _compare(device, cfg, keep, dtype=torch.float64, rtol=1e-10, seed=0):
    B, H, W, P, kernels, widths = cfg
    torch.manual_seed(seed)
    keep = None if keep is None else keep.to(device)
    weights = random_weights(3, widths, kernels, device=device)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, device=device)
    ref = reference_tokenize(x, weights, keep, P)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), weights)
    w = [t.detach().to(dtype).requires_grad_(True) for t in weights]
    out = _tokenize(device, x.to(dtype), w, keep, patch_size=P)
    assert out.shape == ref.shape and out.dtype == dtype
    if keep is not None:
        assert (out[~keep] == 0).all()
    grads = torch.autograd.grad((out * probe.to(dtype)).sum(), w)
    scale = ref.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * scale)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * r.abs().max().clamp_min(1e-30).item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"B{c[0]}_{c[1]}x{c[2]}_P{c[3]}_k{'-'.join(map(str, c[4]))}")
@pytest.mark.parametrize("mask_name", ["none", "all_visible", "random_0.4", "random_0.75", "mixed_rows", "all_masked"])
def test_cuda_kernels_float64(device, cfg, mask_name):
    B, H, W, P = cfg[:4]
    _compare(device, cfg, _mask_cases(B, (H // P) * (W // P))[mask_name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_name", ["none", "mixed_rows"])
def test_cuda_kernels_float32(device, mask_name):
    cfg = CONFIGS[0]
    _compare(device, cfg, _mask_cases(cfg[0], 12)[mask_name], dtype=torch.float32, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_200_configurations(device):
    """200 random geometries, widths, kernel sizes and masks (float64, exact)."""
    g = torch.Generator().manual_seed(2024)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    for case in range(200):
        stages = 1 if case % 4 == 0 else 2
        P = 4 ** stages
        kernels = tuple(2 * r(0, 4) + 1 for _ in range(stages))
        widths = tuple(r(1, 9) for _ in range(stages))
        B, GH, GW = r(1, 3), r(1, 4), r(1, 4)
        cfg = (B, P * GH, P * GW, P, kernels, widths)
        ratio = [0.0, 0.3, 0.6, 0.9, None][case % 5]
        keep = None if ratio is None else torch.rand(B, GH * GW, generator=g) >= ratio
        _compare(device, cfg, keep, seed=case)


@pytest.mark.parametrize("device", DEVICES)
def test_num_visible_packed_and_image_gradient(device):
    weights = random_weights(3, (6, 10), (7, 7), device=device)
    x = torch.randn(3, 3, 48, 64, dtype=torch.float64, device=device, requires_grad=True)
    keep = _fixed_count_keep(3, 12, 5, device)
    ref = reference_tokenize(x, weights, keep, 16)
    packed = _tokenize(device, x, weights, keep, num_visible=5, packed=True)
    torch.testing.assert_close(packed, ref[keep].view(3, 5, 10), rtol=1e-10, atol=1e-12)
    (gx,) = torch.autograd.grad(packed.square().sum(), x)
    (ex,) = torch.autograd.grad(ref[keep].square().sum(), x)
    torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_images_with_normalisation(device):
    weights = random_weights(3, (6, 8), (7, 7), device=device)
    raw = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, device=device)
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    keep = (torch.rand(2, 6) >= 0.4).to(device)
    table = torch.tensor([mean, [1 / s for s in std]], dtype=torch.float64, device=device)
    normalised = (raw.double() - table[0].view(1, 3, 1, 1)) * table[1].view(1, 3, 1, 1)
    expected = reference_tokenize(normalised, weights, keep, 16)
    if device == "cuda":
        out = sparse_conv_tokenize(raw, weights, keep, backend="cuda", pixel_mean=mean, pixel_std=std)
    else:
        out = cuda_tokenize(raw, weights, keep, 16, pixel_norm=table)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.sum(), weights), torch.autograd.grad(expected.sum(), weights)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _op_cases(device="cpu"):
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]], device=device)
    slot, tile_pos = visible_tables(keep, 2, 2, 2, keep.device)
    image = torch.randn(2, 2, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    src = torch.randn(4, 4, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    act = torch.rand(4, 2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    return slot, tile_pos, image, src, w, act


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_gradcheck(device):
    slot, tile_pos, image, src, w, act = _op_cases(device)
    out = conv_relu(src, w, slot, tile_pos, 4, False).detach()
    g = torch.randn_like(out)
    for op, args in [
        (conv_relu, (src, w, slot, tile_pos, 4, False)),
        (conv_relu, (image, w, slot, tile_pos, 4, True)),
        (conv_relu_wgrad, (g, out, src.detach(), w.detach(), slot, tile_pos, 4, False)),
        (conv_relu_dgrad, (g, out, w.detach(), slot, tile_pos, 4)),
        (max_blur_pool, (act, slot, tile_pos)),
        (max_blur_pool_backward, (torch.randn(4, 1, 1, 3, dtype=torch.float64, device=device), act.detach(), slot,
                                  tile_pos)),
    ]:
        torch.library.opcheck(op, args)
    torch.autograd.gradcheck(lambda a, b: conv_relu(a, b, slot, tile_pos, 4, False), (src, w))
    torch.autograd.gradcheck(lambda a, b: conv_relu(a, b, slot, tile_pos, 4, True), (image, w))
    torch.autograd.gradcheck(lambda a: max_blur_pool(a, slot, tile_pos), (act,))


def test_ops_reject_bad_input():
    slot, tile_pos, image, src, w, act = _op_cases()
    with pytest.raises(ValueError, match="expected a compact"):
        conv_relu(src[:, :3], w, slot, tile_pos, 4, False)
    with pytest.raises(TypeError, match="slot must be a 3-D int32"):
        max_blur_pool(act, slot.long(), tile_pos)
    with pytest.raises(TypeError, match="float32 or float64"):
        max_blur_pool(act.half(), slot, tile_pos)
    with pytest.raises(TypeError, match="uint8 images need pixel_norm"):
        conv_relu(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), w, slot, tile_pos, 4, True)


def test_corrupt_tables_read_nothing_outside():
    """A tile position outside the grid or a slot naming no tile reads as masked, never past the end."""
    slot, tile_pos, image, src, w, act = _op_cases()
    bad_pos = tile_pos.clone()
    bad_pos[0] = 10 ** 12
    bad_slot = slot.clone()
    bad_slot.view(-1)[0] = 10 ** 6
    out = conv_relu(src.detach(), w.detach(), bad_slot, bad_pos, 4, False)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    assert torch.isfinite(max_blur_pool(act.detach(), bad_slot, bad_pos)).all()


def test_cuda_backend_offered_only_on_cuda():
    from scott_kernels import available_backends

    assert "cuda" not in available_backends("cpu")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="does not run on cpu"):
            sparse_conv_tokenize(torch.randn(1, 3, 16, 16, dtype=torch.float64), random_weights(3, (4, 4), (7, 7)),
                                 backend="cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("ratio", [None, 0.6, 0.9])
def test_real_shapes_gpu(dtype, ratio):
    keep = None if ratio is None else torch.rand(64, 196, device="cuda") >= ratio
    _assert_flash_rule(*_low_precision_errors(dtype, "cuda", 64, 224, (64, 384), keep, backend_under_test="cuda"))


@needs_gpu
@pytest.mark.parametrize("tensor_cores", [True, False])
def test_tensor_core_and_simt_paths_gpu(tensor_cores):
    from scott_kernels.cuda_backend import use_tensor_cores

    use_tensor_cores(tensor_cores)
    try:
        keep = torch.rand(16, 196, device="cuda") >= 0.6
        _assert_flash_rule(*_low_precision_errors(torch.bfloat16, "cuda", 16, 224, (64, 384), keep,
                                                  backend_under_test="cuda"))
    finally:
        use_tensor_cores(True)


@needs_gpu
def test_cuda_graph_and_compile_gpu():
    tok = SparseConvTokenizer(embed_dim=384, backend="cuda").cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    keep = _fixed_count_keep(8, 196, 78, "cuda")
    out = tok(x, keep, num_visible=78)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = tok(x, keep, num_visible=78)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static, out, rtol=0, atol=0)
    compiled = torch.compile(lambda a, k: tok(a, k, num_visible=78, packed=True), fullgraph=True)
    torch.testing.assert_close(compiled(x, keep), out[keep].view(8, 78, 384), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_through_the_native_ops():
    """With num_visible the native ops trace into one graph through their fake kernels (CPU twin)."""
    torch._dynamo.reset()
    weights = random_weights(3, (4, 8), (7, 7))
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    keep = _fixed_count_keep(2, 6, 4)
    compiled = torch.compile(lambda a, k: cuda_tokenize(a, weights, k, 16, num_visible=4, packed=True),
                             fullgraph=True, backend="aot_eager")
    out = compiled(x, keep)
    ref = reference_tokenize(x, weights, keep, 16)[keep].view(2, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    (got,) = torch.autograd.grad(out.square().sum(), weights[1])
    (want,) = torch.autograd.grad(ref.square().sum(), weights[1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
