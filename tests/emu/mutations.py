"""Deliberately broken copies of csrc/ for the emulated tests to catch: each mutation is one textual
replacement in one file, and the tests that must fail on it."""

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


def run_mutation(name: str, workdir: Path) -> subprocess.CompletedProcess:
    """Builds csrc/ with mutation `name` into workdir and runs its tests there on that module."""
    file, old, new, selection = MUTATIONS[name]
    src = workdir / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    text = (src / file).read_text()
    if text.count(old) != 1:
        raise AssertionError(f"mutation {name}: the text to replace is not in {file} exactly once")
    (src / file).write_text(text.replace(old, new))
    module = build(src, workdir / "out", jobs=2, quiet=True)
    # (its summary line names the mutation: its checks' reports are that run's, not the main suite's)
    return subprocess.run([sys.executable, "-c", _RUN, str(module), str(ROOT / "tests" / "test_cuda_emulated.py"),
                           selection], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, SCOTT_EMU_MUTATION=name))
