"""The CUDA kernels of csrc/ themselves, run on the CPU's emulated device (scott_kernels._emu,
built by ``python tests/emu/build.py``; csrc/emu/ describes the execution model).

Every ``__global__`` kernel in csrc/*.cu runs at small shapes, in every dtype and on every path the
launch code chooses (implicit GEMMs, the image stage with and without clusters, tiled and
per-element pools, the gather GEMM on WMMA and on CUDA cores, the halo gather/scatter), against the
float64 C++ twin or reference on the same rounded inputs. Each test also requires that the
emulator's checks (shared-memory bounds, cp.async destinations read before their wait, misaligned
vectors, barriers and warp collectives not reached by every thread; races and bounds also through
a cluster peer's distributed shared memory) found nothing. Also: the fragment layouts of the
tensor-core instructions and of WMMA against known products, the checks on distributed shared
memory against a probe kernel that breaks them on purpose, the 32-bit offset rule run on both sides
of a lowered limit (a second build, SCOTT_OFFSET_LIMIT), and broken copies of the kernels
(tests/emu/mutations.py) that must fail. The session's counts end in one summary line
(tests/conftest.py: ``emulated kernels N/M, mismatches 0, races 0, out-of-bounds 0``).
"""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import EMULATED

try:
    from scott_kernels import _emu
except ImportError:  # pragma: no cover - depends on the build
    import scott_kernels
    # built but not importable is a failure, not a skip (CI builds it: tests/emu/build.py)
    if any(Path(scott_kernels.__file__).parent.glob("_emu*.so")):
        raise
    _emu = None

EMULATED["collected"], EMULATED["built"] = True, _emu is not None

pytestmark = pytest.mark.skipif(_emu is None, reason="scott_kernels._emu is not built "
                                                     "(python tests/emu/build.py builds it)")

from scott_kernels import cuda_backend as cb  # noqa: E402
from scott_kernels import ops, reference_tokenize  # noqa: E402
from scott_kernels.compact import visible_tables  # noqa: E402
from scott_kernels.cuda_backend import (conv_relu, conv_relu_dgrad, conv_relu_wgrad, cuda_tokenize,  # noqa: E402
                                        max_blur_pool, max_blur_pool_backward)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
LAUNCHED: set = set()
QUERIED: set = set()   # kernels the launch code only asks attributes of, never launches
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5, torch.float64: 1e-12}


def all_kernels() -> set:
    """Every __global__ function defined in csrc/*.cu."""
    names = set()
    for path in CSRC.glob("*.cu"):
        text = path.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text):
            names.add(m.group(1))
    return names


EMULATED["kernels"] = all_kernels()


class Emulated:
    """The cuda backend on the emulated device with compute capability `arch` (module: another
    build of scott_kernels._emu); its checks must all pass, or with `expect` (kinds of failed
    checks) report exactly those kinds, which then are the test's to require and not the
    session's to count. The stats of the runs inside are in `self.stats` afterwards."""

    def __init__(self, arch=90, sms=2, module=None, expect=()):
        self.arch, self.sms, self.module, self.expect = arch, sms, module or _emu, set(expect)

    def __enter__(self):
        cb.use_emulated_device(True, self.module)
        self.module.emu_configure(self.arch, self.sms)
        self.module.emu_reset()
        return self

    def __exit__(self, *exc):
        stats = self.stats = self.module.emu_stats()
        cb.use_emulated_device(False)
        LAUNCHED.update(stats["launches"])
        EMULATED["ran"].update(stats["launches"])
        checks = stats["checks"]
        for kind, key in (("race", "races"), ("out-of-bounds", "out-of-bounds")):  # (tests/conftest.py)
            if kind not in self.expect:
                EMULATED[key] += checks.get(kind, 0)
        if exc[0] is not None:
            if checks:  # all of the failed checks, not only the first one the launch raised
                print("emulated device checks:\n" + "\n".join(stats["messages"]))
        elif self.expect:
            assert set(checks) == self.expect, f"expected {sorted(self.expect)}:\n" + "\n".join(stats["messages"])
        else:
            assert not checks, "\n".join(stats["messages"])
        return False


def _mismatch(ok, message):
    """A comparison of the emulated kernels' values; a failed one counts in the summary line."""
    if not ok:
        EMULATED["mismatches"] += 1
    assert ok, message


def _close(name, got, want, dtype):
    tol = TOL[dtype]
    scale = want.abs().max().clamp_min(1e-30).item()
    err = (got.double().cpu() - want).abs().max().item()
    _mismatch(err <= tol * scale, f"{name}: max error {err:.3e} over {tol:.1e} x {scale:.3e}")


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
            _mismatch(bits[lane, reg, 0].item() == val(a[r, c]) and bits[lane, reg, 1].item() == val(a[r, c + 1]),
                      f"lane {lane}: A register {reg}")
        # B (col), from ldmatrix.trans of [k][n]: b0b1 (k 2t.., n g), b2b3 (k 2t+8.., n g)
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            _mismatch(bits[lane, 4 + reg, 0].item() == val(b[k, g])
                      and bits[lane, 4 + reg, 1].item() == val(b[k + 1, g]), f"lane {lane}: B register {reg}")
        # C/D: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1); integer products and sums are exact
        want = [ab[g, 2 * t], ab[g, 2 * t + 1], ab[g + 8, 2 * t], ab[g + 8, 2 * t + 1]]
        _mismatch(d[lane].tolist() == [float(v) for v in want], f"lane {lane}: D {d[lane].tolist()} != {want}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wmma_fragments(dtype):
    """nvcuda::wmma as the gather GEMM uses it (16 x 16 x 16, 16-bit operands loaded from shared
    memory with a padded leading dimension, float accumulators): every operand layout (row- and
    column-major A and B) and both store layouts give D = A B + (A B + c0) through two mma_sync,
    exactly (small integers), against float64, and the store writes only its 16 x 16 block. (The
    WMMA API leaves which lane holds which element of a fragment unspecified, and PTX's wmma.load
    leaves the distribution of fragments over the threads unspecified; so does the emulated device,
    whose every lane holds the whole tile: there is no per-lane layout to check, unlike mma.sync's
    above. Kernels may only apply the same operation to every element of a fragment.)"""
    a = (torch.arange(256, dtype=torch.float64).reshape(16, 16) * 7 % 17) - 8  # integers in [-8, 8]
    b = (torch.arange(256, dtype=torch.float64).reshape(16, 16) * 5 % 13) - 6
    want = 2 * (a @ b) + 0.5
    ld = 20
    for a_col in (False, True):
        for b_col in (False, True):
            for d_col in (False, True):
                am = (a.t() if a_col else a).contiguous().to(dtype)  # memory order of the layout
                bm = (b.t() if b_col else b).contiguous().to(dtype)
                d = torch.full((16 * ld,), 1234.5, dtype=torch.float32)
                with Emulated():
                    _emu.emu_wmma_probe(am.data_ptr(), bm.data_ptr(), 0.5, d.data_ptr(), ld, d_col,
                                        dtype == torch.bfloat16, a_col, b_col)
                block = d.view(16, ld)[:, :16].double()
                got = block.t() if d_col else block
                case = f"A {'col' if a_col else 'row'}, B {'col' if b_col else 'row'}, D {'col' if d_col else 'row'}"
                _mismatch(torch.equal(got, want), f"{case}: max error {(got - want).abs().max().item()}")
                _mismatch(bool((d.view(16, ld)[:, 16:] == 1234.5).all()), f"{case}: stored outside its 16 x 16 block")


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

    assert _emu.build_info()["offset_limit"] == 2 ** 31  # (stage_common.h: SCOTT_OFFSET_LIMIT)
    with Emulated():
        fits = (2 ** 31 - 1) // (4 * 4 * 64)
        for dtype in (2, 3):
            assert _emu.conv_gemm_path(geometry(fits), dtype, 1, True, 0) == "implicit"
            assert "2^31" in _emu.conv_gemm_path(geometry(fits + 1), dtype, 1, True, 0)
            wide = geometry(6, c_in=512, c_out=512, grid=(2, 3))
            assert _emu.conv_gemm_path(wide, dtype, 167, True, 1) == "implicit"
            assert "2^31" in _emu.conv_gemm_path(wide, dtype, 168, True, 1)


# ---- the 32-bit offset rule on both sides of a lowered limit ----------------------------------------------
# A second build of the emulated module with SCOTT_OFFSET_LIMIT = 2^14 elements (stage_common.h):
# small tensors straddle it, so the 32-bit kernels run below it and the 64-bit fallbacks above it,
# forward and backward through the public ops, against float64.
OFFSET_LIMIT = 2 ** 14
IMPLICIT = {"scott_conv_fwd_igemm", "scott_conv_wgrad_igemm", "scott_conv_dgrad_igemm"}
IMAGE = {"scott_conv_image_igemm", "scott_conv_image_wgrad_igemm"}
TILED_POOL = {"scott_pool_forward", "scott_pool_backward"}


@pytest.fixture(scope="module")
def offset_emu():
    """scott_kernels._emu with the lowered limit, built into build/emu-offset-limit/ (its objects are
    cached by command line and sources: an unchanged csrc/ relinks only) and loaded beside the
    normal module (its own pybind11 internals: tests/emu/build.py)."""
    spec = importlib.util.spec_from_file_location("scott_emu_build", ROOT / "tests" / "emu" / "build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    target = builder.build(out=ROOT / "build" / "emu-offset-limit", jobs=2,
                           defines=[f"SCOTT_OFFSET_LIMIT={OFFSET_LIMIT}"], quiet=True)
    spec = importlib.util.spec_from_file_location("scott_emu_offset_limit._emu", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_info()["offset_limit"] == OFFSET_LIMIT
    return module


def _tables_of(batch, grid, tiles, seed=0):
    """Tables of exactly `tiles` visible patches, at random places."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(batch * grid[0] * grid[1], dtype=torch.bool)
    keep[torch.randperm(keep.numel(), generator=g)[:tiles]] = True
    return visible_tables(keep.view(batch, -1), batch, grid[0], grid[1], torch.device("cpu"))


def _refused(path):
    return path.startswith("gather: ") and f"a tensor passes {OFFSET_LIMIT} elements" in path


@pytest.mark.parametrize("tiles", [7, 8], ids=["below", "at-limit"])
def test_offset_limit_compact_stage(offset_emu, tiles):
    """A compact stage (8 x 8 x 32 channels per tile: 2048 elements a tile): 7 tiles stay under 2^14
    and run the implicit GEMMs, 8 tiles reach it and run the gather GEMM (WMMA), all three ops."""
    dtype, side = torch.bfloat16, 8
    g = torch.Generator().manual_seed(5)
    slot, tile_pos = _tables_of(2, (3, 3), tiles)
    src = torch.randn(tiles, side, side, 16, generator=g).to(dtype)
    w = (torch.randn(32, 16, 3, 3, generator=g) * 0.1).to(dtype)
    below = tiles * side * side * 32 < OFFSET_LIMIT
    with Emulated(90, module=offset_emu) as emu:
        geo = cb._stage("probe", src, w, slot, tile_pos, side, False, None)
        for op in ("forward", "wgrad", "dgrad"):
            path = cb.conv_gemm_path(geo, dtype, True, 1, op)
            assert path == "implicit" if below else _refused(path), path
        out = conv_relu(src, w, slot, tile_pos, side, False)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        dw = conv_relu_wgrad(grad, out, src, w, slot, tile_pos, side, False)
        ds = conv_relu_dgrad(grad, out, w, slot, tile_pos, side)
    ran = set(emu.stats["launches"])
    assert (IMPLICIT <= ran and "wmma_gemm_kernel" not in ran) if below else \
        (ran & IMPLICIT == set() and "wmma_gemm_kernel" in ran), ran
    _close("forward", out, conv_relu(src.double(), w.double(), slot, tile_pos, side, False), dtype)
    m64 = out.double()
    _close("wgrad", dw, conv_relu_wgrad(grad.double(), m64, src.double(), w.double(), slot, tile_pos, side, False),
           dtype)
    _close("dgrad", ds, conv_relu_dgrad(grad.double(), m64, w.double(), slot, tile_pos, side), dtype)


@pytest.mark.parametrize("tiles,sms", [(7, 3), (7, 4), (8, 3)], ids=["below", "partials-at-limit", "at-limit"])
def test_offset_limit_image_stage(offset_emu, tiles, sms):
    """The image stage (7x7 taps, 32 output channels: 2048 output elements a tile; sm_80, no
    clusters): 7 tiles run both image kernels while the weight gradient's partials (one per SM,
    7*7*3*32 = 4704 elements each) stay under 2^14 (3 SMs), and the gather GEMM for the weight
    gradient once they reach it (4 SMs, 18816); 8 tiles run the gather GEMM for both."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(6)
    slot, tile_pos = _tables_of(1, (2, 4), tiles)
    x = torch.randn(1, 3, 32, 64, generator=g).to(dtype)
    w = (torch.randn(32, 3, 7, 7, generator=g) * 0.1).to(dtype)
    forward_fits = tiles * 64 * 32 < OFFSET_LIMIT
    splits = min(-(-tiles * 64 // 128), sms)
    wgrad_fits = forward_fits and splits * 7 * 7 * 3 * 32 < OFFSET_LIMIT
    with Emulated(80, sms, module=offset_emu) as emu:
        geo = cb._stage("probe", x, w, slot, tile_pos, 16, True, None)
        assert (cb.conv_gemm_path(geo, dtype, True, 1, "forward") == "implicit") == forward_fits
        path = cb.conv_gemm_path(geo, dtype, True, splits, "wgrad")
        assert path == "implicit" if wgrad_fits else _refused(path), path
        out = conv_relu(x, w, slot, tile_pos, 16, True)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        dw = conv_relu_wgrad(grad, out, x, w, slot, tile_pos, 16, True)
    ran = set(emu.stats["launches"])
    assert ("scott_conv_image_igemm" in ran) == forward_fits, ran
    assert ("scott_conv_image_wgrad_igemm" in ran) == wgrad_fits, ran
    assert ("wmma_gemm_kernel" in ran) == (not wgrad_fits), ran
    _close("image forward", out, conv_relu(x.double(), w.double(), slot, tile_pos, 16, True), dtype)
    _close("image wgrad", dw, conv_relu_wgrad(grad.double(), out.double(), x.double(), w.double(), slot, tile_pos, 16,
                                              True), dtype)


@pytest.mark.parametrize("tiles", [15, 16], ids=["below", "at-limit"])
def test_offset_limit_pool(offset_emu, tiles):
    """MaxBlurPool of 8 x 8 x 16 activations a tile (1024 elements): 15 tiles run the tiled kernels,
    16 tiles (2^14) the per-element ones, forward and backward."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(7)
    slot, tile_pos = _tables_of(2, (3, 3), tiles)
    act = torch.randn(tiles, 8, 8, 16, generator=g).to(dtype)
    below = act.numel() < OFFSET_LIMIT
    with Emulated(module=offset_emu) as emu:
        path = cb.pool_path(cb._pool("probe", act, slot, tile_pos), dtype, True)
        assert path == "tiled" if below else f"a tensor passes {OFFSET_LIMIT} elements" in path, path
        out = max_blur_pool(act, slot, tile_pos, True)
        grad = torch.randn(out.shape, generator=g).to(dtype)
        dact = max_blur_pool_backward(grad, act, slot, tile_pos, True)
    ran = set(emu.stats["launches"])
    assert (TILED_POOL <= ran and "elementwise_kernel" not in ran) if below else \
        (ran & TILED_POOL == set() and "elementwise_kernel" in ran), ran
    _close("pool", out, max_blur_pool(act.double(), slot, tile_pos, True), dtype)
    _close("pool backward", dact, max_blur_pool_backward(grad.double(), act.double(), slot, tile_pos, True), dtype)


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


# ---- distributed shared memory: the checks through a cluster peer's window ------------------------------
_PEER = r"cluster_probe_kernel block \((?P<block>[01]),0,0\) thread \((?P<thread>\d+),0,0\): "
CLUSTER_CASES = {
    # mode: (the one kind of failed check, a message it must give: kernel, block, thread, what, address)
    0: (None, None),
    1: ("race", _PEER + r"store: write after block \([01],0,0\) thread \d+'s read with no cluster barrier between "
                r"at shared offset \d+$"),
    2: ("race", _PEER + r"(load: access to the shared memory of block \([01],0,0\), which has exited|"
                r"block exit: after block \([01],0,0\) thread \d+'s read of this block's shared memory)"),
    3: ("race", _PEER + r"load: read after block \([01],0,0\) thread \d+'s write with no cluster barrier between "
                r"at shared offset \d+ of block \([01],0,0\)$"),
    4: ("out-of-bounds", _PEER + r"load: 4 bytes past block \([01],0,0\)'s 256 bytes of dynamic shared memory "
                         r"at shared offset 256 of block \([01],0,0\)$"),
    5: ("uninitialized", _PEER + r"read by block \([01],0,0\) thread 0 of block \([01],0,0\)'s shared memory, "
                         r"which no thread wrote before the cluster barrier or exit at shared offset 0"),
}


@pytest.mark.parametrize("mode", sorted(CLUSTER_CASES), ids=["ordered", "no-sync-before", "no-sync-after",
                                                             "syncthreads-only", "past-peer", "unwritten-peer"])
def test_cluster_shared_memory_checks(mode):
    """A cluster of two blocks exchanging words through map_shared_rank: with both cluster barriers
    it reads its peer's words and nothing is reported; without one (or with each block's own
    __syncthreads in its place, which orders nothing across blocks) the peer's accesses race;
    reads past the peer's window or of words the peer never wrote are reported too, each naming
    the kernel, block, thread and the peer's address. (These reports are the test's, not counted.)"""
    kind, pattern = CLUSTER_CASES[mode]
    out = torch.full((2, 64), -1.0)
    with Emulated(90, expect=() if kind is None else (kind,)) as emu:
        try:
            _emu.emu_cluster_probe(mode, out.data_ptr())
        except RuntimeError as e:
            assert kind is not None and f"{kind}: " in str(e), str(e)
    if kind is None:
        tid = torch.arange(64, dtype=torch.float32)
        assert torch.equal(out[0], 100 + tid) and torch.equal(out[1], tid), out
    else:
        messages = emu.stats["messages"]
        assert any(re.fullmatch(f"{kind}: " + pattern + ".*", m) for m in messages), "\n".join(messages)


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
        _mismatch(o <= 2 * t + 1e-3 * s, f"{name}: error {o:.3e} vs the reference in {dtype}: {t:.3e} (scale {s:.3e})")


# ---- the visible tables: one block per image row -------------------------------------------------------
@pytest.mark.parametrize("case", [(3, (3, 4), 5), (2, (3, 4), 12), (2, (4, 3), 0), (4, (4, 5), 1), (2, (30, 50), 611),
                                  (1, (25, 41), 257)], ids=str)
def test_visible_tables_kernel(case):
    """scott_visible_tables (a block-wide scan over chunks of 256 patches) against its C++ twin, with
    and without the neighbour table; a row with the wrong count fails its device assertion (a trap
    naming the message on the emulated device) after writing the same in-range tables as the twin."""
    from scott_kernels.cuda_backend import visible_tables as one_launch

    batch, (gh, gw), k = case
    n = gh * gw
    g = torch.Generator().manual_seed(k)
    keep = torch.zeros(batch, n, dtype=torch.bool)
    keep.scatter_(1, torch.rand(batch, n, generator=g).argsort(1)[:, :k], True)
    for radius in (-1, 1, 2):
        want = one_launch(keep, k, gh, gw, radius)
        with Emulated():
            got = one_launch(keep, k, gh, gw, radius)
        for name, a, b in zip(("slot", "tile_pos", "nbr"), got, want):
            _mismatch(torch.equal(a, b), f"visible tables {case} radius {radius}: {name} differs from the twin")
    if 0 < k < n:
        bad = keep.clone()
        bad[0] = True           # too many
        bad[-1, :] = False      # too few
        bad[-1, 1] = True
        # (named locals: the tracked module lets the kernel access the tensors of its caller's frame)
        slot = torch.full((batch, gh, gw), -7, dtype=torch.int32)
        tile_pos = torch.full((batch * k,), -7, dtype=torch.int64)
        nbr = torch.full((batch * k, 3, 3), -7, dtype=torch.int32)
        tables = (slot, tile_pos, nbr)
        twin = [t.clone() for t in tables]
        args = lambda ts: (bad.data_ptr(), batch, n, k, gw, 1, *(t.data_ptr() for t in ts))
        assert _emu.visible_tables(*args(twin), False, 0) > 0
        with Emulated(expect={"trap"}):
            with pytest.raises(RuntimeError, match="trap.*every row must hold exactly num_visible"):
                cb._TrackedModule(_emu).visible_tables(*args(tables), True, 0)
        for name, a, b in zip(("slot", "tile_pos", "nbr"), tables, twin):
            _mismatch(torch.equal(a, b), f"visible tables {case}, wrong counts: {name} differs from the twin")


def test_code_probe_is_queried():
    """scott_code_probe is never launched: the launch code asks its attributes which of the module's
    codes the driver loads on the device (module_code_arch), which decides whether the tensor-core
    kernels may run. On the emulated device (sm_90 or sm_80 code, cached per device after the first
    query) that is tensor-core code."""
    with Emulated(90):
        assert _emu.cuda_code_arch(0) in (80, 90)
    QUERIED.add("scott_code_probe")
    EMULATED["ran"].add("scott_code_probe")


# ---- last: what ran (the summary line itself: tests/conftest.py) -----------------------------------
def test_zz_coverage_line():
    kernels = all_kernels()
    missing = sorted(kernels - LAUNCHED - QUERIED)
    if len(LAUNCHED) > 3:  # the whole file ran
        assert not missing, f"never launched: {missing}"


# ---- mutations: broken copies of the kernels must fail these tests -------------------------------
@pytest.mark.parametrize("name", ["removed_barrier", "off_by_one_index", "swapped_fragment_register",
                                  "divergent_barrier", "removed_static_barrier", "removed_syncwarp",
                                  "removed_cluster_sync", "removed_exit_cluster_sync"])
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
    elif name in ("removed_cluster_sync", "removed_exit_cluster_sync"):
        # a block reads its peer's accumulators before the peer stored them, or after the peer
        # exited: a race through distributed shared memory, named by kernel, block, thread, address
        assert re.search(r"race: scott_conv_image_wgrad_igemm block \(\d+,\d+,\d+\) thread \(\d+,\d+,\d+\): "
                         r".*no cluster barrier.* at shared offset \d+", output), output[-3000:]
    else:
        assert "max error" in output or "race:" in output, output[-3000:]
