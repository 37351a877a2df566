"""The CUDA architectures: the default build list (setup.py and CMakeLists.txt agree, covering the
GPUs users train on), the targets an older nvcc cannot build are left out, and on every compute
capability the cuda backend's path selection chooses only kernels that the module's code for that
GPU holds (the sm_80 kernels compile to empty bodies for sm_75). CPU only: fake capabilities."""

import ast
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

from scott_kernels import _C, cuda_backend
from scott_kernels.cuda_backend import code_arch, conv_gemm_path, kernel_paths, pool_path

ROOT = Path(__file__).resolve().parents[1]


def _setup_namespace():
    """DEFAULT_CUDA_ARCHS and supported_archs from setup.py, without running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body if (isinstance(n, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id in ("DEFAULT_CUDA_ARCHS", "_SUFFIX_SINCE") for t in n.targets))
        or (isinstance(n, ast.FunctionDef) and n.name == "supported_archs")]
    ns = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


SETUP = _setup_namespace()
DEFAULT = SETUP["DEFAULT_CUDA_ARCHS"]
CAPABILITIES = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0)]


def test_default_archs_agree_and_cover_the_users_gpus():
    cmake = re.search(r'set\(SCOTT_CUDA_ARCHS "([^"]+)" CACHE', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert cmake == DEFAULT
    entries = DEFAULT.split(";")
    for sass in ("75-real", "80-real", "86-real", "89-real", "90a-real"):
        assert sass in entries
    assert any(e.endswith("-virtual") for e in entries)  # PTX for GPUs released later


def test_an_older_nvcc_leaves_out_what_it_cannot_build():
    supported = SETUP["supported_archs"]
    nvcc_11_8 = ({"75", "80", "86", "87", "89", "90"}, {"75", "80", "86", "87", "89", "90"}, (11, 8))
    kept, dropped = supported(DEFAULT, nvcc_11_8)
    assert kept == "75-real;80-real;86-real;89-real;90-virtual" and dropped == ["90a-real"]
    nvcc_11_4 = ({"75", "80", "86"}, {"75", "80", "86"}, (11, 4))
    kept, dropped = supported(DEFAULT, nvcc_11_4)
    assert kept == "75-real;80-real;86-real" and dropped == ["89-real", "90a-real", "90-virtual"]
    nvcc_13 = ({"75", "80", "86", "89", "90", "100", "120"}, {"75", "80", "86", "89", "90", "100", "120"}, (13, 0))
    assert supported(DEFAULT, nvcc_13) == (DEFAULT, [])
    assert supported("native", nvcc_13) == ("native", [])  # CMake keywords pass through
    assert supported("80;90a", nvcc_11_8) == ("80", ["90a"])


@pytest.mark.parametrize("capability, arch", [((7, 5), 75), ((8, 0), 80), ((8, 6), 86), ((8, 7), 86), ((8, 9), 89),
                                              ((9, 0), 90), ((10, 0), 90), ((12, 0), 90), ((7, 0), None)])
def test_code_the_driver_loads_from_the_default_build(capability, arch):
    assert code_arch(capability, DEFAULT) == arch


def test_code_from_other_builds():
    assert code_arch((7, 5), "80;90a") is None        # the old default: nothing a T4 runs
    assert code_arch((8, 6), "80;90a") == 80           # sm_80 SASS on an sm_86
    assert code_arch((9, 0), "80;90a") == 90
    assert code_arch((10, 0), "80;90a") == 80          # compute_80 PTX, JIT-compiled
    assert code_arch((8, 0), "75") == 75               # an sm_75 build's PTX on an A100: no sm_80 kernels
    assert code_arch((8, 6), "75-real;80-real,90a-real") == 80


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_paths_exist_on_every_capability(capability):
    paths = kernel_paths(capability, DEFAULT)
    assert paths["gather_gemm"]
    assert paths["tensor_cores"] == (capability >= (8, 0))
    assert paths["clusters"] == (capability >= (9, 0))
    with mock.patch.object(cuda_backend, "_build_archs", return_value=DEFAULT):
        g = _C.StageGeometry()
        g.num_tiles, g.batch, g.grid_h, g.grid_w = 6, 2, 2, 3
        g.in_side, g.ksize, g.c_in, g.c_out, g.src_image = 4, 7, 8, 16, False
        p = _C.PoolGeometry()
        p.num_tiles, p.batch, p.grid_h, p.grid_w, p.side, p.channels = 6, 2, 2, 3, 8, 64
        for dtype in (torch.float16, torch.bfloat16):
            for op in ("forward", "wgrad", "dgrad"):
                path = conv_gemm_path(g, dtype, True, op=op, capability=capability)
                assert path == "implicit" if capability >= (8, 0) else path.startswith("gather: the implicit GEMM runs from sm_80 code only")
            path = pool_path(p, dtype, True, capability=capability)
            assert path == "tiled" if capability >= (8, 0) else path.startswith("elementwise: the tiled pool kernels run from sm_80 code only")
        # float32/float64 never run the tensor-core kernels
        assert conv_gemm_path(g, torch.float32, True, capability=capability).startswith("gather")
        assert pool_path(p, torch.float32, True, capability=capability).startswith("elementwise")
        assert cuda_backend.cuda_refusal(torch.device("cuda:0"), capability) is None or not _C.build_info()["cuda"]


def test_a_build_without_code_for_a_gpu_refuses_it():
    with mock.patch.object(cuda_backend, "_build_archs", return_value="80;90a"):
        assert not kernel_paths((7, 5))["gather_gemm"]
        why = cuda_backend.cuda_refusal(torch.device("cuda:0"), (7, 5))
        assert why is not None and ("sm_75" in why or "without CUDA" in why)
    with mock.patch.object(cuda_backend, "_build_archs", return_value="75"):
        assert kernel_paths((8, 0)) == {"gather_gemm": True, "tensor_cores": False, "clusters": False}
