"""The CUDA kernels of csrc/ themselves, run on the CPU's emulated device (scott_kernels._emu,
built by ``python tests/emu/build.py``; csrc/emu/ describes the execution model).

Every ``__global__`` kernel in csrc/*.cu runs at small shapes, in every dtype and on every path the
launch code chooses (implicit GEMMs, the image stage with and without clusters, tiled and
per-element pools, the gather GEMM on WMMA and on CUDA cores, the halo gather/scatter), against the
float64 C++ twin or reference on the same rounded inputs. Each test also requires that the
emulator's checks (shared-memory bounds, cp.async destinations read before their wait, misaligned
vectors, barriers and warp collectives not reached by every thread) found nothing. The last test
prints the coverage line.
"""

import re
from pathlib import Path

import pytest
import torch

try:
    from scott_kernels import _emu
except ImportError:  # pragma: no cover - depends on the build
    import scott_kernels
    # built but not importable is a failure, not a skip (CI builds it: tests/emu/build.py)
    if any(Path(scott_kernels.__file__).parent.glob("_emu*.so")):
        raise
    _emu = None

pytestmark = pytest.mark.skipif(_emu is None, reason="scott_kernels._emu is not built "
                                                     "(python tests/emu/build.py builds it)")

from scott_kernels import cuda_backend as cb  # noqa: E402
from scott_kernels import ops, reference_tokenize  # noqa: E402
from scott_kernels.compact import visible_tables  # noqa: E402
from scott_kernels.cuda_backend import (conv_relu, conv_relu_dgrad, conv_relu_wgrad, cuda_tokenize,  # noqa: E402
                                        max_blur_pool, max_blur_pool_backward)

CSRC = Path(__file__).resolve().parents[1] / "csrc"
LAUNCHED: set = set()
QUERIED: set = set()   # kernels the launch code only asks attributes of, never launches
TOTALS = {"mismatches": 0}
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def all_kernels() -> set:
    """Every __global__ function defined in csrc/*.cu."""
    names = set()
    for path in CSRC.glob("*.cu"):
        text = path.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text):
            names.add(m.group(1))
    return names


class Emulated:
    """The cuda backend on the emulated device with compute capability `arch`; its checks must
    all pass."""

    def __init__(self, arch=90, sms=2):
        self.arch, self.sms = arch, sms

    def __enter__(self):
        cb.use_emulated_device(True)
        _emu.emu_configure(self.arch, self.sms)
        _emu.emu_reset()
        return self

    def __exit__(self, *exc):
        stats = _emu.emu_stats()
        cb.use_emulated_device(False)
        LAUNCHED.update(stats["launches"])
        if exc[0] is None:
            assert not stats["checks"], "\n".join(stats["messages"])
        return False


def _close(name, got, want, dtype):
    tol = TOL[dtype]
    scale = want.abs().max().clamp_min(1e-30).item()
    err = (got.double().cpu() - want).abs().max().item()
    if not err <= tol * scale:
        TOTALS["mismatches"] += 1
    assert err <= tol * scale, f"{name}: max error {err:.3e} over {tol:.1e} x {scale:.3e}"


def _tables(B=2, grid=(3, 3), ratio=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, grid[0] * grid[1], generator=g) >= ratio
    keep[0] = True
    keep[-1, 0] = False
    return visible_tables(keep, B, grid[0], grid[1], torch.device("cpu"))


# ---- the tensor-core instructions against the PTX ISA's fragment layouts ---------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fragment_layouts(dtype):
    a = torch.arange(256, dtype=torch.float32).reshape(16, 16)     # exact in both 16-bit types
    b = (torch.arange(128, dtype=torch.float32).reshape(16, 8) % 7) - 3
    a16, b16 = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    regs = torch.zeros(32, 8, dtype=torch.int64).to(torch.int32)
    d = torch.zeros(32, 4, dtype=torch.float32)
    with Emulated():
        _emu.emu_fragment_probe(a16.data_ptr(), b16.data_ptr(), regs.data_ptr(), d.data_ptr(), dtype == torch.bfloat16)
    bits = regs.view(torch.int16).view(32, 8, 2).to(torch.int32) & 0xFFFF   # (lane, reg, low/high half)

    def val(x):
        return torch.tensor([x], dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int32).item() & 0xFFFF

    ab = a @ b
    for lane in range(32):
        g, t = lane // 4, lane % 4
        # A (row): a0a1 (g, 2t..), a2a3 (g+8, 2t..), a4a5 (g, 2t+8..), a6a7 (g+8, 2t+8..)
        for reg, (r, c) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            assert bits[lane, reg, 0].item() == val(a[r, c]) and bits[lane, reg, 1].item() == val(a[r, c + 1])
        # B (col), from ldmatrix.trans of [k][n]: b0b1 (k 2t.., n g), b2b3 (k 2t+8.., n g)
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            assert bits[lane, 4 + reg, 0].item() == val(b[k, g]) and bits[lane, 4 + reg, 1].item() == val(b[k + 1, g])
        # C/D: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1); integer products and sums are exact
        want = [ab[g, 2 * t], ab[g, 2 * t + 1], ab[g + 8, 2 * t], ab[g + 8, 2 * t + 1]]
        assert d[lane].tolist() == [float(v) for v in want]


# ---- compact stages: implicit GEMMs, and the gather GEMM on WMMA / CUDA cores ---------------------------
def _compact_case(dtype, c_in=16, c_out=32, side=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    slot, tile_pos = _tables(seed=seed)
    M = tile_pos.shape[0]
    src = torch.randn(M, side, side, c_in, generator=g).to(dtype)
    w = (torch.randn(c_out, c_in, k, k, generator=g) * (2 / (c_in * k * k)) ** 0.5).to(dtype)
    return slot, tile_pos, src, w, g


def _run_compact(dtype, arch, path, c_in=16, c_out=32, side=8, k=3):
    slot, tile_pos, src, w, g = _compact_case(dtype, c_in, c_out, side, k)
    with Emulated(arch):
        geo = cb._stage("probe", src, w, slot, tile_pos, side, False, None)
        for op in ("forward", "wgrad", "dgrad"):
            assert cb.conv_gemm_path(geo, dtype, True, 1, op).startswith(path), cb.conv_gemm_path(geo, dtype, True, 1, op)
        out = conv_relu(src, w, slot, tile_pos, side, False)
    out64 = conv_relu(src.double(), w.double(), slot, tile_pos, side, False)
    _close("forward", out, out64, dtype)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    for mask in (out, None):
        with Emulated(arch):
            dw = conv_relu_wgrad(grad, mask, src, w, slot, tile_pos, side, False)
            ds = conv_relu_dgrad(grad, mask, w, slot, tile_pos, side)
        m64 = None if mask is None else mask.double()
        _close("wgrad", dw, conv_relu_wgrad(grad.double(), m64, src.double(), w.double(), slot, tile_pos, side, False),
               dtype)
        _close("dgrad", ds, conv_relu_dgrad(grad.double(), m64, w.double(), slot, tile_pos, side), dtype)


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_implicit_gemm_kernels(dtype, arch):
    _run_compact(dtype, arch, "implicit")


def test_implicit_gemm_wide_kernel_and_channels():
    """7x7 taps reaching into the neighbouring patches; several channel blocks and N tiles."""
    _run_compact(torch.bfloat16, 90, "implicit", c_in=40, c_out=136, side=4, k=7)


@pytest.mark.parametrize("dtype,tensor_cores", [(torch.bfloat16, True), (torch.float16, True),
                                                (torch.bfloat16, False), (torch.float32, True),
                                                (torch.float64, True)],
                         ids=["bf16-wmma", "fp16-wmma", "bf16-simt", "fp32", "fp64"])
def test_gather_gemm_kernels(dtype, tensor_cores):
    """The gather GEMM: WMMA for 16-bit types on sm_80+, the CUDA-core kernel otherwise."""
    cb.use_implicit_gemm(False)
    cb._C.set_tensor_cores(tensor_cores)
    _emu.set_implicit_gemm(False)
    _emu.set_tensor_cores(tensor_cores)
    try:
        _run_compact(dtype, 90, "gather", c_in=12, c_out=20)
    finally:
        _emu.set_implicit_gemm(True)
        _emu.set_tensor_cores(True)
        cb.use_implicit_gemm(True)
        cb._C.set_tensor_cores(True)


def test_32bit_offset_guard_on_the_device():
    """The launch code's 32-bit offset rule on the emulated device: a stage just under 2^31 elements
    (or weight-gradient partials) takes the implicit kernels, one just over the gather GEMM."""
    def geometry(num_tiles, c_in=64, c_out=64, grid=(2 ** 15, 2 ** 10)):
        g = _emu.StageGeometry()
        g.num_tiles, g.batch, (g.grid_h, g.grid_w) = num_tiles, 64, grid
        g.in_side, g.ksize, g.c_in, g.c_out, g.src_image = 4, 7, c_in, c_out, False
        return g

    with Emulated():
        fits = (2 ** 31 - 1) // (4 * 4 * 64)
        for dtype in (2, 3):
            assert _emu.conv_gemm_path(geometry(fits), dtype, 1, True, 0) == "implicit"
            assert "2^31" in _emu.conv_gemm_path(geometry(fits + 1), dtype, 1, True, 0)
            wide = geometry(6, c_in=512, c_out=512, grid=(2, 3))
            assert _emu.conv_gemm_path(wide, dtype, 167, True, 1) == "implicit"
            assert "2^31" in _emu.conv_gemm_path(wide, dtype, 168, True, 1)


# ---- the image stage (clusters on sm_90, none on sm_80) -----------------------------------------------
@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("dtype,uint8", [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
                         ids=["bf16", "fp16", "uint8-bf16"])
def test_image_stage_kernels(dtype, uint8, arch):
    g = torch.Generator().manual_seed(3)
    slot, tile_pos = _tables(B=2, grid=(3, 3))
    w = (torch.randn(32, 3, 7, 7, generator=g) * 0.1).to(dtype)
    table = torch.tensor([[123.7, 116.3, 103.5], [1 / 58.4, 1 / 57.1, 1 / 57.4]])
    if uint8:
        x = torch.randint(0, 256, (2, 3, 48, 48), generator=g, dtype=torch.uint8)
        norm, x64, norm64 = table, x, table.double()
    else:
        x = torch.randn(2, 3, 48, 48, generator=g).to(dtype)
        norm, x64, norm64 = None, x.double(), None
    with Emulated(arch):
        assert _emu.image_wgrad_clusters(cb._CODES[dtype], cb._UINT8 if uint8 else cb._CODES[dtype]) == (arch >= 90)
        out = conv_relu(x, w, slot, tile_pos, 16, True, norm)
    out64 = conv_relu(x64, w.double(), slot, tile_pos, 16, True, norm64)
    _close("image forward", out, out64, dtype)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    with Emulated(arch):
        dw = conv_relu_wgrad(grad, out, x, w, slot, tile_pos, 16, True, norm)
    dw64 = conv_relu_wgrad(grad.double(), out.double(), x64, w.double(), slot, tile_pos, 16, True, norm64)
    _close("image wgrad", dw, dw64, dtype)


# ---- MaxBlurPool: tiled and per element --------------------------------------------------------------
@pytest.mark.parametrize("dtype,tiled", [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False),
                                         (torch.float32, False), (torch.float64, False)])
def test_pool_kernels(dtype, tiled):
    g = torch.Generator().manual_seed(1)
    slot, tile_pos = _tables()
    act = torch.randn(tile_pos.shape[0], 8, 8, 16, generator=g).to(dtype)
    act[0, 1, 1, :4] = act[0, 1, 2, :4]  # ties: the first maximum takes the gradient
    _emu.set_tiled_pool(tiled)
    try:
        for relu in (True, False):
            with Emulated():
                geo = cb._pool("probe", act, slot, tile_pos)
                assert cb.pool_path(geo, dtype, True).startswith("tiled" if tiled else "elementwise")
                out = max_blur_pool(act, slot, tile_pos, relu)
            _close("pool", out, max_blur_pool(act.double(), slot, tile_pos, relu), dtype)
            grad = torch.randn(out.shape, generator=g).to(dtype)
            with Emulated():
                dact = max_blur_pool_backward(grad, act, slot, tile_pos, relu)
            _close("pool backward", dact, max_blur_pool_backward(grad.double(), act.double(), slot, tile_pos, relu),
                   dtype)
    finally:
        _emu.set_tiled_pool(True)


# ---- the torch backend's halo gather / scatter ----------------------------------------------------
class _TilesOnEmulator:
    """ops' view of the native module with its CPU tensors sent to the emulated kernels."""

    def __getattr__(self, name):
        return getattr(_emu, name)

    def gather_tiles(self, *args):
        args = list(args)
        args[6] = True
        return cb._TrackedModule(_emu).gather_tiles(*args)

    def scatter_tiles(self, *args):
        args = list(args)
        args[7] = True
        return cb._TrackedModule(_emu).scatter_tiles(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_patch_tile_kernels(dtype, monkeypatch):
    g = torch.Generator().manual_seed(2)
    slot, tile_pos = _tables()
    slot, tile_pos = slot.long(), tile_pos.long()
    src = torch.randn(2, 3, 3, 4, 6, 6, generator=g).to(dtype).requires_grad_(True)
    tiles = ops.gather_tiles(src, slot, tile_pos, 2, 1)
    probe = torch.randn(tiles.shape, generator=g).to(dtype)
    (want,) = torch.autograd.grad((tiles.float() * probe.float()).sum(), src)
    monkeypatch.setattr(ops, "_C", _TilesOnEmulator())
    with Emulated():
        got_tiles = ops.gather_tiles(src, slot, tile_pos, 2, 1)
        (got,) = torch.autograd.grad((got_tiles.float() * probe.float()).sum(), src)
    assert torch.equal(got_tiles, tiles)
    _close("scatter", got, want.double(), dtype)


# ---- the tokenizer, forward and backward, against the float64 reference ----------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tokenizer_forward_backward(dtype):
    """cuda_tokenize on the emulated device (every stage's forward and backward kernels) against the
    float64 reference: at most twice the error of the reference computed in the same dtype, plus
    1e-3 of the scale (the flash-attention rule of the GPU tests)."""
    from scott_kernels import sparse_conv_tokenize

    torch.manual_seed(0)
    weights = [(torch.randn(16, 3, 7, 7, dtype=torch.float64) * 0.1).requires_grad_(True),
               (torch.randn(32, 16, 3, 3, dtype=torch.float64) * 0.1).requires_grad_(True)]
    keep = torch.rand(2, 9) > 0.3
    keep[0] = True
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    ref = reference_tokenize(x, weights, keep, 16)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), weights)

    def errors(run):
        w = [t.detach().to(dtype).requires_grad_(True) for t in weights]
        out = run(x.to(dtype), w)
        grads = torch.autograd.grad((out.double() * probe).sum(), w)
        return [(out.double() - ref).abs().max().item()] + [(g.double() - r).abs().max().item()
                                                            for g, r in zip(grads, ref_grads)]

    with Emulated():
        ours = errors(lambda xx, w: cuda_tokenize(xx, w, keep, 16))
    theirs = errors(lambda xx, w: sparse_conv_tokenize(xx, w, keep, backend="reference"))
    scales = [ref.abs().max().item()] + [r.abs().max().item() for r in ref_grads]
    for name, o, t, s in zip(["tokens", "dw0", "dw1"], ours, theirs, scales):
        if not o <= 2 * t + 1e-3 * s:
            TOTALS["mismatches"] += 1
        assert o <= 2 * t + 1e-3 * s, f"{name}: error {o:.3e} vs the reference in {dtype}: {t:.3e} (scale {s:.3e})"


def test_code_probe_is_queried():
    """scott_code_probe is never launched: the launch code asks its attributes which of the module's
    codes the driver loads on the device (module_code_arch), which decides whether the tensor-core
    kernels may run. On the emulated device (sm_90 or sm_80 code, cached per device after the first
    query) that is tensor-core code."""
    with Emulated(90):
        assert _emu.cuda_code_arch(0) in (80, 90)
    QUERIED.add("scott_code_probe")


# ---- last: what ran --------------------------------------------------------------------------------
def test_zz_coverage_line():
    kernels = all_kernels()
    stats = _emu.emu_stats()
    ran = sorted((LAUNCHED | QUERIED) & kernels)
    print(f"\nemulated kernels {len(ran)}/{len(kernels)} ({len(QUERIED & kernels)} only queried for its attributes), "
          f"mismatches {TOTALS['mismatches']}, "
          f"races {stats['checks'].get('race', 0)}, out-of-bounds {stats['checks'].get('out-of-bounds', 0)}")
    missing = sorted(kernels - LAUNCHED - QUERIED)
    if len(LAUNCHED) > 3:  # the whole file ran
        assert not missing, f"never launched: {missing}"


# ---- mutations: broken copies of the kernels must fail these tests -------------------------------
@pytest.mark.parametrize("name", ["removed_barrier", "off_by_one_index", "swapped_fragment_register",
                                  "divergent_barrier", "removed_static_barrier", "removed_syncwarp"])
def test_mutation_is_caught(name, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "emu"))
    from mutations import run_mutation

    result = run_mutation(name, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"mutation {name} went unnoticed:\n{output[-3000:]}"
    if name == "removed_syncwarp":  # lanes read what other lanes of the warp have not stored yet
        assert "race:" in output or "uninitialized:" in output, output[-3000:]
    elif name in ("removed_barrier", "removed_static_barrier"):
        assert "race:" in output, output[-3000:]
    elif name == "divergent_barrier":  # thread 0 runs on and reads tiles no thread has written yet
        assert "uninitialized:" in output or "barrier:" in output, output[-3000:]
    elif name == "off_by_one_index":  # the last thread reads 16 bytes past the forward's output
        assert "out-of-bounds:" in output, output[-3000:]
    else:
        assert "max error" in output or "race:" in output, output[-3000:]
