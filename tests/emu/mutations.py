"""Deliberately broken copies of csrc/ for the emulated tests to catch: each mutation is one textual
replacement in one file, and the tests that must fail on it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from build import build  # noqa: E402

MUTATIONS = {
    # the barrier between the pipeline's cp.async wait and the reads of the stage it filled
    "removed_barrier": ("conv_igemm.cu",
                        "    __syncthreads();  // step kit has landed; every warp is done with the stage refilled below\n",
                        "\n",
                        "test_implicit_gemm_kernels and bf16 and sm90"),
    # an off-by-one global index: the ReLU mask reads the next vector of the forward's output
    "off_by_one_index": ("conv_igemm.cu",
                         "const uint4 ov = reinterpret_cast<const uint4*>(out)[v];",
                         "const uint4 ov = reinterpret_cast<const uint4*>(out)[v + 1];",
                         "test_implicit_gemm_kernels and bf16 and sm90"),
    # B fragments of an n8 pair swapped between registers
    "swapped_fragment_register": ("cuda_common.cuh",
                                  "    bf[2 * nj][1] = r[1];\n    bf[2 * nj + 1][0] = r[2];",
                                  "    bf[2 * nj][1] = r[2];\n    bf[2 * nj + 1][0] = r[1];",
                                  "test_implicit_gemm_kernels and bf16 and sm90"),
    # a barrier of the CUDA-core gather GEMM that thread 0 skips
    "divergent_barrier": ("gemm_fallback.cu",
                          "      b_tile[kk][nn] = (n < N && k < k_end) ? load_b(k, n) : A(0);\n    }\n    __syncthreads();",
                          "      b_tile[kk][nn] = (n < N && k < k_end) ? load_b(k, n) : A(0);\n    }\n    if (tid != 0) __syncthreads();",
                          "test_gather_gemm_kernels and fp32"),
    # the gather GEMM's barrier before the next K step overwrites its static __shared__ tiles
    "removed_static_barrier": ("gemm_fallback.cu",
                               "        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];\n    }\n    __syncthreads();",
                               "        for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];\n    }",
                               "test_gather_gemm_kernels and fp32"),
    # the cluster barrier between the image weight gradient's stores of its accumulators and the
    # peer block's reads of them through distributed shared memory
    "removed_cluster_sync": ("conv_image.cu",
                             "    cluster.sync();  // both blocks' accumulators are in shared memory\n",
                             "\n",
                             "test_image_stage_kernels and bf16 and sm90"),
    # the cluster barrier that keeps each block's shared memory until its peer has read it
    "removed_exit_cluster_sync": ("conv_image.cu",
                                  "    cluster.sync();  // the peer has read this block's shared memory before either exits\n",
                                  "\n",
                                  "test_image_stage_kernels and bf16 and sm90"),
    # the warp barrier between the image epilogue's per-lane stores and the lanes' 16-byte reads
    "removed_syncwarp": ("conv_image.cu",
                         "                     : Pack2<T>::make(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);\n      __syncwarp();",
                         "                     : Pack2<T>::make(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);",
                         "test_image_stage_kernels and sm90"),
    # an off-by-one channel vector in the tiled pool's window: the last pixel's last vector reads the
    # 16 bytes past the end of act (tests/test_cuda_emulated_asan.py: ASan reports it; the access hooks
    # do not where the op's next tensor lies there, see probe_pool_layouts)
    "vector_past_the_end": ("pool.cu",
                            "  int32_t off[4][4];\n  pool_window_offsets<4>(g, pt, g.side, 2 * k.h - 1, 2 * k.w - 1, k.v, off);",
                            "  int32_t off[4][4];\n  pool_window_offsets<4>(g, pt, g.side, 2 * k.h - 1, 2 * k.w - 1, k.v + 1, off);",
                            "test_pool_kernels and dtype0-True"),
}

_RUN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("scott_kernels._emu", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["scott_kernels._emu"] = module
import pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", sys.argv[2], "-k", sys.argv[3]]))
"""


def mutated_copy(name: str, workdir: Path) -> Path:
    """A copy of csrc/ with mutation `name`, in workdir (once)."""
    file, old, new, _ = MUTATIONS[name]
    src = workdir / "csrc"
    if src.exists():
        return src
    shutil.copytree(ROOT / "csrc", src)
    text = (src / file).read_text()
    if text.count(old) != 1:
        raise AssertionError(f"mutation {name}: the text to replace is not in {file} exactly once")
    (src / file).write_text(text.replace(old, new))
    return src


def build_mutation(name: str, workdir: Path, asan: bool = False) -> Path:
    """The emulated module (or its ASan variant) of csrc/ with mutation `name`, built in workdir."""
    return build(mutated_copy(name, workdir), workdir / ("out-asan" if asan else "out"), jobs=2, quiet=True,
                 asan=asan)


def run_mutation(name: str, workdir: Path, asan: bool = False) -> subprocess.CompletedProcess:
    """Builds csrc/ with mutation `name` into workdir and runs its tests there on that module (under
    AddressSanitizer with `asan`: tests/emu/asan.py)."""
    module = build_mutation(name, workdir, asan)
    selection = MUTATIONS[name][3]
    tests = ROOT / "tests" / "test_cuda_emulated.py"
    if asan:
        from asan import run_tests

        return run_tests(module, selection, tests)
    # (its summary line names the mutation: its checks' reports are that run's, not the main suite's)
    return subprocess.run([sys.executable, "-c", _RUN, str(module), str(tests), selection], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, SCOTT_EMU_MUTATION=name))


_POOL_LAYOUTS = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("scott_kernels._emu", sys.argv[1])
emu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emu)
sys.modules["scott_kernels._emu"] = emu
import torch
from scott_kernels import cuda_backend as cb
from scott_kernels.compact import visible_tables


def pool(gap):
    # act, `gap` bytes no tensor owns, then tile_pos and slot: three tensors (storages) of their own,
    # side by side in one arena as an allocator may place them
    slot, tile_pos = visible_tables(torch.ones(2, 9, dtype=torch.bool), 2, 3, 3, torch.device("cpu"))
    act = torch.randn(tile_pos.shape[0], 8, 8, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    offsets = [0, act.nbytes + gap, act.nbytes + gap + tile_pos.nbytes]
    arena = torch.zeros(offsets[-1] + slot.nbytes + 64, dtype=torch.uint8)
    raw = (ctypes.c_char * arena.numel()).from_address(arena.data_ptr())
    placed = []
    for t, off in zip((act, tile_pos, slot), offsets):
        placed.append(torch.frombuffer(raw, dtype=t.dtype, count=t.numel(), offset=off).view(t.shape))
        placed[-1].copy_(t)
    cb.use_emulated_device(True)
    emu.emu_configure(90, 2)
    emu.emu_reset()
    error = None
    try:
        cb.max_blur_pool(placed[0], placed[2], placed[1], False)
    except RuntimeError as e:  # a failed check fails the launch
        error = str(e)
    finally:
        stats = emu.emu_stats()
        cb.use_emulated_device(False)
    return {"launches": stats["launches"], "checks": stats["checks"], "messages": stats["messages"][:3],
            "error": error}


print(json.dumps({"adjacent": pool(0), "gap": pool(64)}))
"""


def probe_pool_layouts(module: Path) -> dict:
    """max_blur_pool (bf16, the tiled kernel) on the emulated `module` (the access hooks' build),
    with act followed in memory by the op's tile_pos ("adjacent") or by 64 bytes no tensor owns
    ("gap"): per layout the launches, the failed checks by kind and their first messages."""
    result = subprocess.run([sys.executable, "-c", _POOL_LAYOUTS, str(module)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"the layout probe failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
