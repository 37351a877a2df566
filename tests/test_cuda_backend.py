"""The cuda backend (csrc/: the CUDA kernels, their C++ twin and headers) against the dense reference.

Its ops run the CUDA kernels on GPU tensors and their C++ twin on CPU tensors; both call the
same operand and pooling functions (csrc/conv_operands.h, csrc/pool_ops.h), so on a machine
without a GPU these tests check the kernels' index logic through the twin (float32/float64),
including a fuzz over 200 random configurations. On a GPU the same tests run the CUDA kernels,
plus real shapes in bf16, fp16 and fp32 (flash-attention rule), CUDA graphs and torch.compile.
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
        # a tokenizer stage: conv without its ReLU, the pool of its ReLU, whose backward passes the
        # gradient on already masked (out=None)
        (conv_relu, (src, w, slot, tile_pos, 4, False, None, False)),
        (conv_relu, (image, w, slot, tile_pos, 4, True, None, False)),
        (max_blur_pool, (act - 0.5, slot, tile_pos, True)),
        (conv_relu_wgrad, (g * (out > 0), None, src.detach(), w.detach(), slot, tile_pos, 4, False)),
        (conv_relu_dgrad, (g * (out > 0), None, w.detach(), slot, tile_pos, 4)),
        (max_blur_pool_backward, (torch.randn(4, 1, 1, 3, dtype=torch.float64, device=device), act.detach() - 0.5,
                                  slot, tile_pos, True)),
    ]:
        torch.library.opcheck(op, args)
    torch.autograd.gradcheck(lambda a, b: conv_relu(a, b, slot, tile_pos, 4, False), (src, w))
    torch.autograd.gradcheck(lambda a, b: conv_relu(a, b, slot, tile_pos, 4, True), (image, w))
    torch.autograd.gradcheck(lambda a: max_blur_pool(a, slot, tile_pos), (act,))
    # a tokenizer stage, compact and image sources (the ReLU in the pool)
    stage = lambda a, b, image_src: max_blur_pool(conv_relu(a, b, slot, tile_pos, 4, image_src, None, False), slot,
                                                  tile_pos, True)
    torch.autograd.gradcheck(lambda a, b: stage(a, b, False), (src, w))
    torch.autograd.gradcheck(lambda a, b: stage(a, b, True), (image, w))


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


# ---- the implicit GEMM path (compact stages) ----------------------------------------------------------
from scott_kernels import _C  # noqa: E402
from scott_kernels.cuda_backend import conv_gemm_path, use_implicit_gemm  # noqa: E402


def _geometry(num_tiles=6, batch=2, grid=(2, 3), in_side=4, k=7, c_in=8, c_out=16, image=False):
    g = _C.StageGeometry()
    g.num_tiles, g.batch, (g.grid_h, g.grid_w) = num_tiles, batch, grid
    g.in_side, g.ksize, g.c_in, g.c_out, g.src_image = in_side, k, c_in, c_out, image
    return g


def test_implicit_path_rules():
    """The rule the CUDA kernels and the twin share: compact sources, channels in 16-byte vectors,
    a reach of at most one neighbouring patch, every offset within 31 bits."""
    assert conv_gemm_path(_geometry(), torch.float64, on_cuda=False) == "implicit"
    assert conv_gemm_path(_geometry(k=9), torch.float64, on_cuda=False) == "implicit"  # pad 4 == in_side
    assert "pad > in_side" in conv_gemm_path(_geometry(k=11), torch.float64, on_cuda=False)
    assert "multiples of 8" in conv_gemm_path(_geometry(c_in=12), torch.float64, on_cuda=False)
    assert "multiples of 8" in conv_gemm_path(_geometry(c_out=4), torch.float64, on_cuda=False)
    assert "4 image channels" in conv_gemm_path(_geometry(c_in=8, image=True), torch.float64, on_cuda=False)
    image = _geometry(num_tiles=6, in_side=16, c_in=3, c_out=64, image=True)
    image.s_b, image.s_c, image.s_h, image.s_w = 3 * 32 * 48, 32 * 48, 48, 1
    assert conv_gemm_path(image, torch.float64, on_cuda=False) == "implicit"
    assert conv_gemm_path(image, torch.float64, on_cuda=False, op="wgrad") == "implicit"
    assert "gather" in conv_gemm_path(image, torch.float64, on_cuda=False, op="dgrad")
    image.ksize = 3  # padded tap rows 3 * 2 * 8 = 48: the forward takes it, the weight gradient not
    assert conv_gemm_path(image, torch.float64, on_cuda=False) == "implicit"
    assert "multiple of 32" in conv_gemm_path(image, torch.float64, on_cuda=False, op="wgrad")
    image.ksize = 5  # 3 tap pairs per kernel row: an odd count of 16-byte K halves
    assert "even number of tap pairs" in conv_gemm_path(image, torch.float64, on_cuda=False)
    if not CUDA_BUILT:
        assert conv_gemm_path(_geometry(), torch.bfloat16, on_cuda=True).startswith("gather")


def test_implicit_path_32bit_guard():
    """A stage with a tensor of 2^31 elements or more (activations, or the split weight-gradient
    partials) takes the gather GEMM's 64-bit path."""
    per_tile = 4 * 4 * 64
    fits = _geometry(num_tiles=(2 ** 31 - 1) // per_tile, batch=64, grid=(2 ** 15, 2 ** 10), c_in=64, c_out=64)
    assert conv_gemm_path(fits, torch.float64, on_cuda=False) == "implicit"
    over = _geometry(num_tiles=fits.num_tiles + 1, batch=64, grid=(2 ** 15, 2 ** 10), c_in=64, c_out=64)
    assert "2^31" in conv_gemm_path(over, torch.float64, on_cuda=False)
    wide = _geometry(c_in=512, c_out=512)  # 7*7*512*512 = 12.8M weights: 168 splits pass 2^31
    assert conv_gemm_path(wide, torch.float64, on_cuda=False, splits=167) == "implicit"
    assert "2^31" in conv_gemm_path(wide, torch.float64, on_cuda=False, splits=168)


def test_fast_division():
    """The kernels' multiply-shift division by row counts, against //, near every power of two."""
    numerators = sorted({n for p in range(31) for n in (2 ** p - 1, 2 ** p, 2 ** p + 1) if n < 2 ** 31}
                        | {2 ** 31 - 1, 12345, 19967, 19968, 65535})
    for d in list(range(1, 70)) + [255, 256, 257, 4096, 99991, 2 ** 30, 2 ** 31 - 1]:
        for n in numerators:
            assert _C.fast_div(d, n) == n // d, (n, d)


def test_tile_neighbours_table():
    """3x3 neighbour slots of each tile against the grid, with masked, border and corrupt entries."""
    keep = torch.rand(2, 12) >= 0.4
    keep[0, 5] = True
    slot, tile_pos = visible_tables(keep, 2, 3, 4, torch.device("cpu"))
    bad_slot = slot.clone()
    bad_slot[0, 0, 0] = 10 ** 6  # names no tile
    bad_pos = tile_pos.clone()
    bad_pos[-1] = 10 ** 12
    M = tile_pos.shape[0]
    for t in range(M):
        got = _C.tile_neighbours(bad_slot.data_ptr(), bad_pos.data_ptr(), t, 2, 3, 4, M)
        pos = int(bad_pos[t])
        if pos >= 2 * 12:
            assert got == [-1] * 9
            continue
        b, gy, gx = pos // 12, pos % 12 // 4, pos % 4
        want = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                y, x = gy + dy, gx + dx
                v = int(bad_slot[b, y, x]) if 0 <= y < 3 and 0 <= x < 4 else -1
                want.append(v if 0 <= v < M else -1)
        assert got == want, t


# ---- the visible tables in one launch (scott_visible_tables, its twin on CPU tensors) ----------------
def _row_tables(keep, k, grid_w, radius=-1):
    """The tables scott_visible_tables writes, in plain Python: per row its first k visible patches,
    missing tiles at the row's first position; the neighbour table from the row's own slots."""
    B, N = keep.shape
    grid_h = N // grid_w
    slot = torch.full((B, N), -1, dtype=torch.int32)
    tile_pos = torch.empty(B * k, dtype=torch.int64)
    for b in range(B):
        seen = 0
        for n in range(N):
            if keep[b, n]:
                if seen < k:
                    slot[b, n] = b * k + seen
                    tile_pos[b * k + seen] = b * N + n
                seen += 1
        for j in range(seen, k):
            tile_pos[b * k + j] = b * N
    nb = 2 * radius + 1 if radius >= 0 else 0
    nbr = torch.full((B * k if nb else 0, nb, nb), -1, dtype=torch.int32)
    for t in range(nbr.shape[0]):
        b = t // k
        n = int(tile_pos[t]) - b * N
        for dy in range(nb):
            for dx in range(nb):
                y, x = n // grid_w + dy - radius, n % grid_w + dx - radius
                if 0 <= y < grid_h and 0 <= x < grid_w:
                    nbr[t, dy, dx] = slot[b, y * grid_w + x]
    return slot, tile_pos, nbr


def _tables_cases():
    """(keep, k, grid_h, grid_w): fixed-count random masks, all visible, all masked (k = 0), a single
    visible patch, one patch per row, long rows (several chunks of the kernel's 256 threads)."""
    cases = [(_fixed_count_keep(3, 12, 5), 5, 3, 4),
             (torch.ones(2, 12, dtype=torch.bool), 12, 3, 4),
             (torch.zeros(2, 12, dtype=torch.bool), 0, 4, 3),
             (_fixed_count_keep(4, 20, 1, seed=1), 1, 4, 5),
             (torch.ones(3, 1, dtype=torch.bool), 1, 1, 1),
             (_fixed_count_keep(2, 1500, 611, seed=2), 611, 30, 50),
             (_fixed_count_keep(2, 1024, 1024, seed=3), 1024, 32, 32),
             (_fixed_count_keep(1, 1025, 257, seed=4), 257, 25, 41)]
    return cases


@pytest.mark.parametrize("case", range(8))
def test_visible_tables_op_matches_torch_tables(case):
    """One launch's (slot, tile_pos) equal compact.visible_tables' (the torch ops), and its neighbour
    tables of radius 0..2 the tiles' neighbours (radius 1: the conv kernels' 3x3 tile_neighbours)."""
    from scott_kernels.cuda_backend import visible_tables as one_launch

    keep, k, gh, gw = _tables_cases()[case]
    B = keep.shape[0]
    want_slot, want_pos = visible_tables(keep, B, gh, gw, keep.device, k)
    for radius in (-1, 0, 1, 2):
        slot, tile_pos, nbr = one_launch(keep, k, gh, gw, radius)
        assert slot.dtype == torch.int32 and tile_pos.dtype == torch.int64 and nbr.dtype == torch.int32
        assert torch.equal(slot, want_slot) and torch.equal(tile_pos, want_pos)
        nb = 2 * radius + 1 if radius >= 0 else 0
        assert nbr.shape == (B * k if nb else 0, nb, nb)
        if radius >= 0 and B * gh * gw <= 64:
            assert torch.equal(nbr, _row_tables(keep, k, gw, radius)[2])
        if radius == 1:
            M = tile_pos.shape[0]
            for t in range(0, M, max(1, M // 40)):
                assert nbr[t].view(-1).tolist() == _C.tile_neighbours(slot.data_ptr(), tile_pos.data_ptr(), t, B, gh,
                                                                      gw, M), t


def test_visible_tables_wrong_counts_stay_in_range():
    """Rows holding more or fewer than k visible patches: the op raises (on a GPU the launch fails
    on the device), and the tables it wrote are the kernel's: each row's first k patches, missing
    tiles at the row's first position, every index inside its table."""
    from scott_kernels.cuda_backend import visible_tables as one_launch

    g = torch.Generator().manual_seed(5)
    for B, gh, gw, k in [(4, 3, 4, 5), (3, 30, 40, 400), (2, 2, 2, 0), (2, 2, 3, 6)]:
        N = gh * gw
        keep = torch.rand(B, N, generator=g) < torch.rand(B, 1, generator=g)
        keep[0] = True   # too many (unless k = N)
        keep[-1] = False  # too few (unless k = 0)
        with pytest.raises(RuntimeError, match="every row must hold exactly num_visible"):
            one_launch(keep, k, gh, gw, 1)
        want = _row_tables(keep, k, gw, 1 if B * N <= 64 else -1)
        slot = torch.empty(B, gh, gw, dtype=torch.int32)
        tile_pos = torch.empty(B * k, dtype=torch.int64)
        nbr = torch.empty(B * k, 3, 3, dtype=torch.int32)
        wrong = _C.visible_tables(keep.data_ptr(), B, N, k, gw, 1, slot.data_ptr(), tile_pos.data_ptr(),
                                  nbr.data_ptr(), False, 0)
        counts = keep.sum(1)
        assert wrong == int((counts != k).sum()) > 0
        assert torch.equal(slot.view(B, N), want[0]) and torch.equal(tile_pos, want[1])
        if B * N <= 64:
            assert torch.equal(nbr, want[2])
        assert ((slot >= -1) & (slot < B * k)).all() and ((tile_pos >= 0) & (tile_pos < B * N)).all()
        assert ((nbr >= -1) & (nbr < B * k)).all()
        # every tile's position lies in its own row
        rows = torch.arange(B * k) // max(k, 1)
        assert torch.equal(tile_pos // N, rows)


def test_visible_tables_op_checks_and_opcheck():
    from scott_kernels.cuda_backend import visible_tables as one_launch

    keep = _fixed_count_keep(3, 12, 5)
    for radius in (-1, 0, 1):
        torch.library.opcheck(one_launch, (keep, 5, 3, 4, radius))
    torch.library.opcheck(one_launch, (torch.zeros(2, 6, dtype=torch.bool), 0, 2, 3))
    with pytest.raises(ValueError, match="bool tensor"):
        one_launch(keep.int(), 5, 3, 4)
    with pytest.raises(ValueError, match="bool tensor"):
        one_launch(keep, 5, 4, 4)
    with pytest.raises(ValueError, match="num_visible"):
        one_launch(keep, 13, 3, 4)
    with pytest.raises(ValueError, match="radius"):
        one_launch(keep, 5, 3, 4, -2)
    empty = one_launch(torch.zeros(0, 12, dtype=torch.bool), 5, 3, 4, 1)
    assert [tuple(t.shape) for t in empty] == [(0, 3, 4), (0,), (0, 3, 3)]


def test_tokenizer_builds_its_tables_in_one_launch(monkeypatch):
    """With num_visible the tokenizer takes its tables from the one-launch op (the torch ops of
    compact.visible_tables are not called), and the tokens are those of the read-back path."""
    from scott_kernels import cuda_backend as cb

    weights = random_weights(3, (6, 10), (7, 7))
    x = torch.randn(3, 3, 48, 64, dtype=torch.float64)
    keep = _fixed_count_keep(3, 12, 5)
    want = cuda_tokenize(x, weights, keep, 16)

    def torch_tables(*args):
        raise AssertionError("compact.visible_tables called")

    monkeypatch.setattr(cb, "compact_visible_tables", torch_tables)
    got = cuda_tokenize(x, weights, keep, 16, num_visible=5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


IMPLICIT_CONFIGS = [
    (2, 64, 48, 16, (7, 7), (8, 16)),      # SCOTT stack shape, stage 1 on the implicit path
    (3, 32, 32, 16, (3, 9), (16, 24)),     # pad 4 == in_side: the widest reach the path takes
    (2, 48, 16, 16, (5, 7), (24, 8)),      # one patch wide; C_in > C_out
    (1, 128, 64, 64, (5, 3, 7), (8, 16, 8)),  # three stages: stages 1 and 2 implicit (side 16, 4)
    (1, 16, 16, 16, (7, 7), (8, 8)),       # a single patch
]


@pytest.mark.parametrize("cfg", IMPLICIT_CONFIGS, ids=lambda c: f"B{c[0]}_{c[1]}x{c[2]}_k{c[4]}_w{c[5]}")
@pytest.mark.parametrize("mask_name", ["none", "random_0.4", "mixed_rows", "all_masked"])
def test_implicit_twin_float64(cfg, mask_name):
    """The implicit GEMMs' index path (twin, float64) against the reference, values and gradients;
    the same stages through the gather GEMM agree with it."""
    B, H, W, P, kernels, widths = cfg
    g = _geometry(num_tiles=B, batch=B, grid=(H // P, W // P), in_side=P // 4, k=kernels[1], c_in=widths[0],
                  c_out=widths[1])
    assert conv_gemm_path(g, torch.float64, on_cuda=False) == "implicit"
    keep = _mask_cases(B, (H // P) * (W // P))[mask_name]
    _compare("cpu", cfg, keep)
    use_implicit_gemm(False)
    try:
        assert conv_gemm_path(g, torch.float64, on_cuda=False).startswith("gather")
        _compare("cpu", cfg, keep)
    finally:
        use_implicit_gemm(True)


@pytest.mark.parametrize("kernels", [(7, 7), (3, 3)])
def test_implicit_image_stage_uint8_and_strided(kernels):
    """The image kernels' staging (uint8 normalisation, channels-last strides, masked neighbours)
    through the twin, against the reference on the normalised images: values and weight gradients
    (k = 7: the image weight-gradient kernel; k = 3: its forward only)."""
    weights = random_weights(3, (8, 16), kernels)
    raw = torch.randint(0, 256, (2, 3, 48, 32), dtype=torch.uint8)
    mean, std = [123.7, 116.3, 103.5], [58.4, 57.1, 57.4]
    table = torch.tensor([mean, [1 / s for s in std]], dtype=torch.float64)
    keep = torch.tensor([[True, False, True, True, False, True], [False, True, True, False, True, False]])
    normalised = (raw.double() - table[0].view(1, 3, 1, 1)) * table[1].view(1, 3, 1, 1)
    expected = reference_tokenize(normalised, weights, keep, 16)
    out = cuda_tokenize(raw, weights, keep, 16, pixel_norm=table)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad((out * probe).sum(), weights),
                         torch.autograd.grad((expected * probe).sum(), weights)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 48, 32, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last strides
    torch.testing.assert_close(cuda_tokenize(x, weights, keep, 16), reference_tokenize(x, weights, keep, 16),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_side,k", [(2, 3), (4, 7), (8, 7)], ids=lambda v: str(v))
def test_implicit_image_groups_of_many_tiles(in_side, k):
    """The image kernels' groups of 128 output pixels hold 128 / s^2 tiles (128, 32 and 8 here):
    through the twin, several groups and a partial last one, float and uint8 (normalised) images,
    against the gather GEMM, values and (k = 7) weight gradients."""
    gen = torch.Generator().manual_seed(in_side)
    B, gh, gw = 2, 16, 15
    keep = torch.rand(B, gh * gw, generator=gen) >= 0.3
    keep[1, :5] = False
    slot, tile_pos = visible_tables(keep, B, gh, gw, torch.device("cpu"))
    M = tile_pos.shape[0]
    tiles = 128 // (in_side // 2) ** 2
    assert M > 2 * tiles and M % tiles, (M, tiles)  # several groups and a partial last one
    w = torch.randn(8, 3, k, k, generator=gen, dtype=torch.float64)
    table = torch.tensor([[120.0, 110.0, 100.0], [1 / 60, 1 / 55, 1 / 50]], dtype=torch.float64)
    raw = torch.randint(0, 256, (B, 3, gh * in_side, gw * in_side), generator=gen, dtype=torch.uint8)
    for x, norm in ((torch.randn(B, 3, gh * in_side, gw * in_side, generator=gen, dtype=torch.float64), None),
                    (raw, table)):
        geo = _geometry(num_tiles=M, batch=B, grid=(gh, gw), in_side=in_side, k=k, c_in=3, c_out=8, image=True)
        geo.s_b, geo.s_c, geo.s_h, geo.s_w = x.stride()
        assert conv_gemm_path(geo, torch.float64, on_cuda=False) == "implicit"
        wgrad = conv_gemm_path(geo, torch.float64, on_cuda=False, op="wgrad") == "implicit"
        assert wgrad == (k == 7)
        results = []
        for implicit in (True, False):
            use_implicit_gemm(implicit)
            try:
                out = conv_relu(x, w, slot, tile_pos, in_side, True, norm)
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                results.append((out, conv_relu_wgrad(grad, out, x, w, slot, tile_pos, in_side, True, norm)))
            finally:
                use_implicit_gemm(True)
        assert results[0][0].abs().sum() > 0
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_image_wgrad_partials_follow_the_kernel():
    """The image weight gradient writes one partial per cluster of two blocks only where its kernel
    runs as clusters (sm_90 code on a GPU with clusters): the partial count follows that test, not
    the GPU's compute capability, and there are no clusters without a GPU."""
    from scott_kernels.cuda_backend import _CODES, _UINT8, _implicit_wgrad_splits
    geo = _geometry(num_tiles=64 * 196, batch=64, grid=(14, 14), in_side=16, k=7, c_in=3, c_out=64, image=True)
    rows = 64 * 196 * 64
    for dtype in (torch.float16, torch.bfloat16):
        for src in (_CODES[dtype], _UINT8):
            clusters = _C.image_wgrad_clusters(_CODES[dtype], src)
            if not (HAS_CUDA and CUDA_BUILT):
                assert clusters is False
                continue
            if torch.cuda.get_device_capability()[0] < 9:
                assert not clusters
            sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            splits = _implicit_wgrad_splits(geo, rows, torch.device("cuda"), dtype, src)
            assert splits == (sms // 2 if clusters else sms)
    assert _implicit_wgrad_splits(geo, rows, torch.device("cpu"), torch.float16, _UINT8) == 1


def test_implicit_twin_ops_match_gather_ops():
    """Op by op (forward, weight and input gradients), both GEMM paths of the twin agree exactly
    enough in float64, with corrupt table entries that must read as masked patches."""
    torch.manual_seed(3)
    keep = torch.rand(2, 6) >= 0.3
    keep[1, 2] = True
    slot, tile_pos = visible_tables(keep, 2, 2, 3, torch.device("cpu"))
    M = tile_pos.shape[0]
    bad_slot = slot.clone()
    bad_slot.view(-1)[-1] = 10 ** 6
    src = torch.randn(M, 8, 8, 16, dtype=torch.float64)
    w = torch.randn(24, 16, 7, 7, dtype=torch.float64)
    results = []
    for implicit in (True, False):
        use_implicit_gemm(implicit)
        try:
            out = conv_relu(src, w, bad_slot, tile_pos, 8, False)
            grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
            results.append((out, conv_relu_wgrad(grad, out, src, w, bad_slot, tile_pos, 8, False),
                            conv_relu_dgrad(grad, out, w, bad_slot, tile_pos, 8)))
        finally:
            use_implicit_gemm(True)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _implicit_gpu_case(dtype, B=8, c_in=64, c_out=384, in_side=4, ratio=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 196, generator=g) >= ratio
    keep[0] = True
    slot, tile_pos = visible_tables(keep.cuda(), B, 14, 14, torch.device("cuda"))
    M = tile_pos.shape[0]
    src = torch.randn(M, in_side, in_side, c_in, generator=g).relu()
    w = torch.randn(c_out, c_in, 7, 7, generator=g) * (2 / (c_in * 49)) ** 0.5
    grad = torch.randn(M, in_side // 2, in_side // 2, c_out, generator=g)
    low = [t.to("cuda", dtype) for t in (src, w, grad)]
    exact = [t.double() for t in low]  # the same rounded inputs, in float64 on the twin
    return slot, tile_pos, low, [t.cpu() for t in exact]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 384, 4), (16, 24, 4), (8, 64, 16)], ids=str)
def test_implicit_gemm_kernels_gpu(dtype, shape):
    """The tensor-core implicit GEMMs (forward, weight and input gradients) against the float64
    twin on the same rounded inputs: float32 accumulation keeps them within low-precision rounding."""
    c_in, c_out, in_side = shape
    slot, tile_pos, (src, w, grad), (src64, w64, grad64) = _implicit_gpu_case(dtype, c_in=c_in, c_out=c_out,
                                                                             in_side=in_side)
    g = _geometry(num_tiles=tile_pos.shape[0], batch=slot.shape[0], grid=(14, 14), in_side=in_side, c_in=c_in,
                  c_out=c_out)
    assert conv_gemm_path(g, dtype, on_cuda=True) == "implicit"
    cpu_slot, cpu_pos = slot.cpu(), tile_pos.cpu()
    out = conv_relu(src, w, slot, tile_pos, in_side, False)
    out64 = conv_relu(src64, w64, cpu_slot, cpu_pos, in_side, False)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    scale = out64.abs().max().item()
    torch.testing.assert_close(out.double().cpu(), out64, rtol=tol, atol=tol * scale)
    # backward through the same (rounded) forward output, so both sides mask the same pixels
    out_used = out.double().cpu()
    dw = conv_relu_wgrad(grad, out, src, w, slot, tile_pos, in_side, False)
    dw64 = conv_relu_wgrad(grad64, out_used, src64, w64, cpu_slot, cpu_pos, in_side, False)
    torch.testing.assert_close(dw.double().cpu(), dw64, rtol=tol, atol=tol * dw64.abs().max().item())
    ds = conv_relu_dgrad(grad, out, w, slot, tile_pos, in_side)
    ds64 = conv_relu_dgrad(grad64, out_used, w64, cpu_slot, cpu_pos, in_side)
    torch.testing.assert_close(ds.double().cpu(), ds64, rtol=tol, atol=tol * ds64.abs().max().item())
    # and the gather GEMM on the GPU computes the same
    use_implicit_gemm(False)
    try:
        ref_out = conv_relu(src, w, slot, tile_pos, in_side, False)
    finally:
        use_implicit_gemm(True)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol * scale)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("uint8", [False, True])
def test_implicit_image_kernel_gpu(dtype, uint8):
    """The image kernel (3 -> 64 channels, 7x7, stride 2) on a GPU against the float64 twin on the
    same rounded inputs, float and uint8 (normalised) images, a third of the patches masked."""
    g = torch.Generator().manual_seed(5)
    B = 8
    keep = torch.rand(B, 196, generator=g) >= 0.33
    slot, tile_pos = visible_tables(keep.cuda(), B, 14, 14, torch.device("cuda"))
    w = (torch.randn(64, 3, 7, 7, generator=g) * 0.1).to("cuda", dtype)
    table = torch.tensor([[123.7, 116.3, 103.5], [1 / 58.4, 1 / 57.1, 1 / 57.4]])
    if uint8:
        x = torch.randint(0, 256, (B, 3, 224, 224), generator=g, dtype=torch.uint8).cuda()
        norm, x64 = table.cuda(), x.cpu()
    else:
        x = torch.randn(B, 3, 224, 224, generator=g).to("cuda", dtype)
        norm, x64 = None, x.double().cpu()
    geo = _geometry(num_tiles=tile_pos.shape[0], batch=B, grid=(14, 14), in_side=16, c_in=3, c_out=64, image=True)
    geo.s_b, geo.s_c, geo.s_h, geo.s_w = x.stride()
    assert conv_gemm_path(geo, dtype, on_cuda=True) == "implicit"
    out = conv_relu(x, w, slot, tile_pos, 16, True, norm)
    out64 = conv_relu(x64, w.double().cpu(), slot.cpu(), tile_pos.cpu(), 16, True,
                      None if norm is None else table.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.double().cpu(), out64, rtol=tol, atol=tol * out64.abs().max().item())
    grad = torch.randn(out.shape, generator=g).to("cuda", dtype)
    assert conv_gemm_path(geo, dtype, on_cuda=True, op="wgrad") == "implicit"
    dw = conv_relu_wgrad(grad, out, x, w, slot, tile_pos, 16, True, norm)
    dw64 = conv_relu_wgrad(grad.double().cpu(), out.double().cpu(), x64, w.double().cpu(), slot.cpu(), tile_pos.cpu(),
                           16, True, None if norm is None else table.double())
    torch.testing.assert_close(dw.double().cpu(), dw64, rtol=tol, atol=tol * dw64.abs().max().item())


# ---- the tiled MaxBlurPool kernels ---------------------------------------------------------------------
from scott_kernels.cuda_backend import pool_path, use_tiled_pool  # noqa: E402


def _pool_geometry(num_tiles=6, batch=2, grid=(2, 3), side=8, channels=64):
    g = _C.PoolGeometry()
    g.num_tiles, g.batch, (g.grid_h, g.grid_w), g.side, g.channels = num_tiles, batch, grid, side, channels
    return g


def test_tiled_pool_path_rules():
    """Channels in 16-byte vectors, an even side, 31-bit offsets (any patch size: nothing is staged
    in shared memory); on a GPU float16/bfloat16 only (float32/float64 keep the per-element
    kernels)."""
    assert pool_path(_pool_geometry(), torch.float64, on_cuda=False) == "tiled"
    assert pool_path(_pool_geometry(side=2, channels=384), torch.float64, on_cuda=False) == "tiled"
    assert pool_path(_pool_geometry(side=32, channels=8), torch.float64, on_cuda=False) == "tiled"
    assert "multiples of 8" in pool_path(_pool_geometry(channels=12), torch.float64, on_cuda=False)
    assert pool_path(_pool_geometry(side=36, channels=8), torch.float64, on_cuda=False) == "tiled"
    assert "2^31" in pool_path(_pool_geometry(num_tiles=2 ** 17, side=16, channels=64), torch.float64, on_cuda=False)
    assert pool_path(_pool_geometry(num_tiles=2 ** 17 - 1, side=16, channels=64), torch.float64,
                     on_cuda=False) == "tiled"
    if CUDA_BUILT and HAS_CUDA:
        assert pool_path(_pool_geometry(), torch.bfloat16, on_cuda=True) == "tiled"
        assert pool_path(_pool_geometry(), torch.float32, on_cuda=True).startswith("elementwise")
    use_tiled_pool(False)
    try:
        assert "switched off" in pool_path(_pool_geometry(), torch.float64, on_cuda=False)
    finally:
        use_tiled_pool(True)


def _pool_case(B, grid, side, channels, mask, seed, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid
    keep = {"random": torch.rand(B, gh * gw, generator=g) < 0.5, "all": torch.ones(B, gh * gw, dtype=torch.bool),
            "single": torch.zeros(B, gh * gw, dtype=torch.bool)}[mask]
    if mask == "single":
        keep[0, (gh * gw) // 2] = True
    if mask == "random":
        keep[-1] = False  # a fully masked row
        keep[0, 0] = True
    slot, tile_pos = visible_tables(keep.to(device), B, gh, gw, torch.device(device))
    M = tile_pos.shape[0]
    act = torch.randn(M, side, side, channels, generator=g, dtype=torch.float64)  # negative values too
    act[act.abs() < 0.3] = 0.0  # ties between window elements (first maximum wins)
    grad = torch.randn(M, side // 2, side // 2, channels, generator=g, dtype=torch.float64)
    return slot, tile_pos, act.to(device, dtype), grad.to(device, dtype)


def _both_pool_paths(act, grad, slot, tile_pos):
    """(pooled, input gradient, input gradient with relu_mask) on the tiled and the per-element path."""
    results = []
    for tiled in (True, False):
        use_tiled_pool(tiled)
        try:
            results.append((max_blur_pool(act, slot, tile_pos), max_blur_pool_backward(grad, act, slot, tile_pos),
                            max_blur_pool_backward(grad, act, slot, tile_pos, True)))
        finally:
            use_tiled_pool(True)
    return results


@pytest.mark.parametrize("case", [
    (2, (3, 4), 8, 64, "random"), (2, (3, 4), 8, 64, "all"), (3, (2, 2), 8, 64, "single"),
    (2, (3, 3), 2, 384, "random"),   # last-stage shape: one pooled pixel per tile, 48 vectors
    (2, (2, 3), 8, 104, "random"),   # 13 vectors: an odd vector count per pixel
    (1, (1, 1), 4, 8, "all"),        # one patch, every border
    (2, (2, 5), 16, 24, "random"),   # three vectors per pixel
    (1, (4, 1), 32, 8, "all"),       # a large patch, one vector
], ids=str)
def test_tiled_pool_twin_matches_per_element(case):
    """The tiled kernels' task, window and per-task functions (twin, float64) give exactly the values of
    the per-element definition, forward and backward, including ties, negative values next to
    masked patches and the image borders."""
    B, grid, side, channels, mask = case
    slot, tile_pos, act, grad = _pool_case(B, grid, side, channels, mask, seed=side + channels)
    g = _pool_geometry(tile_pos.shape[0], B, grid, side, channels)
    assert pool_path(g, torch.float64, on_cuda=False) == "tiled"
    (out_t, din_t, masked_t), (out_e, din_e, masked_e) = _both_pool_paths(act, grad, slot, tile_pos)
    assert torch.equal(out_t, out_e) and torch.equal(din_t, din_e) and torch.equal(masked_t, masked_e)
    # relu_mask: the gradient before a ReLU whose output was act (0 where act <= 0, as torch's ReLU)
    assert torch.equal(masked_t, torch.where(act > 0, din_t, torch.zeros_like(din_t)))


def test_tiled_pool_corrupt_tables():
    """A tile position outside the grid or a slot naming no tile reads zeros on the tiled path too,
    the same values as the per-element kernels."""
    slot, tile_pos, act, grad = _pool_case(2, (3, 3), 4, 16, "random", seed=3)
    bad_pos = tile_pos.clone()
    bad_pos[0] = 10 ** 12
    bad_slot = slot.clone()
    bad_slot.view(-1)[1] = 10 ** 6
    (out_t, din_t, masked_t), (out_e, din_e, masked_e) = _both_pool_paths(act, grad, bad_slot, bad_pos)
    assert torch.equal(out_t, out_e) and torch.equal(din_t, din_e) and torch.equal(masked_t, masked_e)
    assert (out_t[0] == 0).all() and (din_t[0] == 0).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(64, (14, 14), 8, 64), (64, (14, 14), 2, 384), (4, (5, 3), 8, 104),
                                  (2, (2, 5), 16, 24)], ids=str)
def test_tiled_pool_kernels_gpu(dtype, case):
    """The tiled CUDA pool kernels against the per-element CUDA kernels (same float32 arithmetic in
    the same order: equal bits) and against the float64 twin on the same rounded inputs."""
    B, grid, side, channels = case
    slot, tile_pos, act, grad = _pool_case(B, grid, side, channels, "random", seed=1, device="cuda", dtype=dtype)
    g = _pool_geometry(tile_pos.shape[0], B, grid, side, channels)
    assert pool_path(g, dtype, on_cuda=True) == "tiled"
    (out_t, din_t, masked_t), (out_e, din_e, masked_e) = _both_pool_paths(act, grad, slot, tile_pos)
    assert torch.equal(out_t, out_e) and torch.equal(din_t, din_e) and torch.equal(masked_t, masked_e)
    assert torch.equal(masked_t, torch.where(act > 0, din_t, torch.zeros_like(din_t)))
    for tiled in (True, False):  # the pool of relu(act): relu on the window maxima, the same bits
        use_tiled_pool(tiled)
        try:
            assert torch.equal(max_blur_pool(act, slot, tile_pos, True), max_blur_pool(act.relu(), slot, tile_pos))
        finally:
            use_tiled_pool(True)
    out64 = max_blur_pool(act.double().cpu(), slot.cpu(), tile_pos.cpu())
    din64 = max_blur_pool_backward(grad.double().cpu(), act.double().cpu(), slot.cpu(), tile_pos.cpu())
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out_t.double().cpu(), out64, **tol)
    torch.testing.assert_close(din_t.double().cpu(), din64, **tol)


def _to_compact(dense, tile_pos, side):
    """(B, C, H, W) -> the compact (M, side, side, C) rows of the tiles in tile_pos."""
    B, C, H, W = dense.shape
    tiles = dense.reshape(B, C, H // side, side, W // side, side).permute(0, 2, 4, 3, 5, 1)
    return tiles.reshape(-1, side, side, C)[tile_pos]


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64),
                                          pytest.param("cuda", torch.bfloat16, marks=needs_gpu),
                                          pytest.param("cuda", torch.float16, marks=needs_gpu)], ids=str)
@pytest.mark.parametrize("case", [(2, (3, 3), 6, 16, "random"), (2, (2, 3), 8, 8, "all"),
                                  (2, (3, 4), 2, 24, "random"), (2, (2, 2), 10, 8, "single")], ids=str)
def test_pool_ops_match_torch_autograd_with_ties(device, dtype, case):
    """Both pool paths against autograd through torch's max_pool2d + blur on the dense masked map
    (the reference's definition), on activations with many exactly equal positive values: the
    gradient goes to each window's first maximum as torch routes it, across tile borders and next
    to masked neighbours, odd pooled sides included; relu_mask against torch's ReLU backward
    (nothing at exactly 0). Halves are exact in every dtype, so the GPU kernels see the same ties."""
    from scott_kernels.compact import compact_to_image
    from scott_kernels.reference import max_blur_pool as dense_max_blur_pool

    B, grid, side, channels, mask = case
    slot, tile_pos, _, grad = _pool_case(B, grid, side, channels, mask, seed=side + channels)
    gen = torch.Generator().manual_seed(side)
    y = torch.randint(-2, 4, (tile_pos.shape[0], side, side, channels), generator=gen).double() / 2  # pre-ReLU
    grad = grad.to(dtype).double()  # the values the kernels read
    H, W = grid[0] * side, grid[1] * side
    ones = torch.ones(tile_pos.shape[0], side, side, 1, dtype=torch.float64)
    keep = compact_to_image(ones, tile_pos, (B, 1, H, W))
    y_dense = compact_to_image(y, tile_pos, (B, channels, H, W)).requires_grad_()
    act_dense = torch.relu(y_dense) * keep
    act_dense.retain_grad()
    pooled_dense = dense_max_blur_pool(act_dense) * keep[:, :, ::2, ::2]
    (pooled_dense * compact_to_image(grad, tile_pos, (B, channels, H // 2, W // 2))).sum().backward()
    want_out = _to_compact(pooled_dense.detach(), tile_pos, side // 2)
    want_din, want_masked = _to_compact(act_dense.grad, tile_pos, side), _to_compact(y_dense.grad, tile_pos, side)

    act = y.clamp_min(0)
    args = [t.to(device) for t in (act.to(dtype), grad.to(dtype), slot, tile_pos)]
    if device == "cuda":
        g = _pool_geometry(tile_pos.shape[0], B, grid, side, channels)
        assert pool_path(g, dtype, on_cuda=True) == "tiled"
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    for out, din, masked in _both_pool_paths(*args):
        torch.testing.assert_close(out.double().cpu(), want_out, **tol)
        torch.testing.assert_close(din.double().cpu(), want_din, **tol)
        torch.testing.assert_close(masked.double().cpu(), want_masked, **tol)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "gather"])
def test_relu_flags_move_the_relu_exactly(implicit):
    """conv(relu=False) then relu equals conv(relu=True), and the pool with relu equals the pool of
    relu(act), bit for bit, on every GEMM path and pool path of the twin (compact and image
    sources, float and uint8 images), with the gradients of a stage either way equal too."""
    gen = torch.Generator().manual_seed(11)
    keep = torch.rand(2, 12, generator=gen) >= 0.4
    keep[0, 5] = True
    slot, tile_pos = visible_tables(keep, 2, 3, 4, torch.device("cpu"))
    M = tile_pos.shape[0]
    table = torch.tensor([[120.0, 110.0, 100.0], [1 / 60, 1 / 55, 1 / 50]], dtype=torch.float64)
    images = [(torch.randn(2, 3, 48, 64, generator=gen, dtype=torch.float64), None),
              (torch.randint(0, 256, (2, 3, 48, 64), generator=gen, dtype=torch.uint8), table)]
    w0 = torch.randn(8, 3, 7, 7, generator=gen, dtype=torch.float64)
    src = torch.randn(M, 8, 8, 16, generator=gen, dtype=torch.float64)
    w1 = torch.randn(24, 16, 7, 7, generator=gen, dtype=torch.float64)
    use_implicit_gemm(implicit)
    try:
        for x, norm in images:
            plain = conv_relu(x, w0, slot, tile_pos, 16, True, norm, False)
            assert (plain < 0).any()
            assert torch.equal(plain.clamp_min(0), conv_relu(x, w0, slot, tile_pos, 16, True, norm))
        plain = conv_relu(src, w1, slot, tile_pos, 8, False, None, False)
        assert torch.equal(plain.clamp_min(0), conv_relu(src, w1, slot, tile_pos, 8, False))
    finally:
        use_implicit_gemm(True)
    for tiled in (True, False):
        use_tiled_pool(tiled)
        try:
            assert torch.equal(max_blur_pool(plain, slot, tile_pos, True), max_blur_pool(plain.relu(), slot, tile_pos))
        finally:
            use_tiled_pool(True)
    # a stage's weight and input gradients with the ReLU in the pool or in the conv
    probe = torch.randn(M, 2, 2, 24, generator=gen, dtype=torch.float64)
    grads = []
    for in_pool in (True, False):
        s, w = src.clone().requires_grad_(), w1.clone().requires_grad_()
        act = conv_relu(s, w, slot, tile_pos, 8, False, None, not in_pool)
        pooled = max_blur_pool(act, slot, tile_pos, in_pool)
        grads.append(torch.autograd.grad((pooled * probe).sum(), (s, w)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
