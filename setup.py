"""Builds scott_kernels and its native module scott_kernels._C with CMake + ninja + pybind11.

setuptools does the packaging (pure-Python packages, metadata, sdist, wheels, editable installs);
the CMakeBuild command below only configures and builds the one CMake target. This is kept
rather than moving to scikit-build-core because the build must also work offline with exactly
what GPU build hosts already have (setuptools, cmake, ninja, pybind11):
`pip install --no-build-isolation -e .` and `python setup.py build_ext --inplace` there.

Environment variables:
  SCOTT_CUDA_ARCHS   CUDA architectures, CMake syntax (default DEFAULT_CUDA_ARCHS: SASS for sm_75
                     (T4), sm_80 (A100), sm_86 (RTX 30xx, A6000), sm_89 (RTX 40xx, L4) and sm_90a
                     (H100/H200), and compute_90 PTX that newer GPUs compile when they load it).
                     Targets the nvcc found cannot build are left out, with a printed line;
                     scott_kernels.build_info()["cuda_archs"] lists what was built.
  SCOTT_REQUIRE_CUDA=1  fail the build when nvcc is not found (default: build the C++ part only)
  SCOTT_NO_CUDA=1    never compile the CUDA sources
  CUDA_HOME          where to find nvcc (else CUDA_PATH, PATH, /usr/local/cuda)
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs

Optional extras are declared once, in EXTRAS below.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "75-real;80-real;86-real;89-real;90a-real;90-virtual"
# CUDA release that first compiles each suffixed (architecture-specific) variant of a target
_SUFFIX_SINCE = {"a": (12, 0), "f": (12, 9)}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_nvcc():
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then the usual install location."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


# Every optional extra, in one place.
_TRAIN = ["torchvision", "pyyaml", "safetensors", "tqdm"]
EXTRAS = {
    # The MIM-JEPA training loop (python/mimjepa) and its command `mimjepa`.
    "train": _TRAIN,
    # The SCOTT ViTs registered with timm (scott_kernels.timm_models); timm brings safetensors.
    "timm": ["timm>=1.0.20"],
    # benchmarks/plot.py
    "bench": ["pytest-benchmark>=4", "matplotlib"],
    # backend="spconv" (the general sparse-convolution library, as a peer): spconv's CUDA 12
    # builds, which also run on the CPU; spconv-cu120 has wheels up to Python 3.11 only
    "spconv": ['spconv-cu120>=2.3.6; python_version < "3.12"', 'spconv-cu126>=2.3.8; python_version >= "3.12"'],
    # tests/test_packaging.py builds the wheel without build isolation: pyproject.toml's build tools
    "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "timm>=1.0.20", *_TRAIN,
             "setuptools>=70", "cmake>=3.24", "ninja", "pybind11>=2.12"],
}


def _nvcc_targets(nvcc: str):
    """(SASS targets, PTX targets, release) that this nvcc compiles: {"75", "90", ...}, {...},
    (major, minor); None when nvcc cannot be asked."""
    import re

    try:
        code = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
        arch = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    release = re.search(r"release (\d+)\.(\d+)", version)
    return (set(re.findall(r"sm_(\d+)", code)), set(re.findall(r"compute_(\d+)", arch)),
            (int(release.group(1)), int(release.group(2))) if release else (0, 0))


def supported_archs(archs: str, targets) -> tuple[str, list[str]]:
    """The entries of a CMake CUDA_ARCHITECTURES list (``75-real``, ``90a-real``, ``90-virtual``,
    ``80`` = SASS + PTX) that an nvcc with ``targets`` (``_nvcc_targets``) compiles, and the entries
    left out. Keywords (all, all-major, native) and entries it cannot read pass through."""
    import re

    if targets is None:
        return archs, []
    sass, ptx, release = targets
    kept, dropped = [], []
    for entry in [a.strip() for a in archs.split(";") if a.strip()]:
        m = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", entry)
        if m is None:
            kept.append(entry)
            continue
        number, suffix, kind = m.groups()
        ok = (kind == "virtual" or number in sass) and (kind == "real" or number in ptx)
        if suffix:
            ok = ok and release >= _SUFFIX_SINCE[suffix]
        (kept if ok else dropped).append(entry)
    return ";".join(kept), dropped


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _toolchain(nvcc, archs: str) -> dict:
    """What a configured CMake build directory depends on. pip builds each install in a fresh,
    temporary environment whose cmake/ninja/pybind11 it deletes afterwards, while the build
    directory (build/ in the checkout) stays: a cache that names those tools must be dropped."""
    import pybind11

    return {
        "cmake": shutil.which("cmake"),
        "ninja": shutil.which("ninja"),
        "python": sys.executable,
        "pybind11": pybind11.get_cmake_dir(),
        "nvcc": nvcc,
        "archs": archs if nvcc else None,
    }


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent  # .../scott_kernels
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        nvcc = None if _truthy("SCOTT_NO_CUDA") else find_nvcc()
        if nvcc is None and _truthy("SCOTT_REQUIRE_CUDA"):
            raise RuntimeError(
                "scott_kernels: SCOTT_REQUIRE_CUDA is set but nvcc was not found "
                "(set CUDA_HOME or put nvcc on PATH)"
            )
        archs = os.environ.get("SCOTT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        if nvcc:
            archs, dropped = supported_archs(archs, _nvcc_targets(nvcc))
            for entry in dropped:
                print(f"scott_kernels: {nvcc} cannot compile CUDA architecture {entry}; leaving it out")
            if not archs:
                if _truthy("SCOTT_REQUIRE_CUDA"):
                    raise RuntimeError(f"scott_kernels: {nvcc} compiles none of the requested CUDA architectures")
                print("scott_kernels: no requested CUDA architecture can be built; building the C++ kernels only")
                nvcc = None
        tools = _toolchain(nvcc, archs)
        if tools["cmake"] is None or tools["ninja"] is None:
            raise RuntimeError("scott_kernels: building needs cmake and ninja on PATH "
                               "(pip install cmake ninja, or let pip's build isolation provide them)")
        stamp = build_temp / "scott-toolchain.json"
        cached = json.loads(stamp.read_text()) if stamp.is_file() else None
        # --fresh (CMake >= 3.24) discards the cache: the tools it names may no longer exist.
        fresh = ["--fresh"] if (build_temp / "CMakeCache.txt").is_file() and cached != tools else []
        args = [
            str(ROOT),
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={tools['pybind11']}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if nvcc:
            args += ["-DSCOTT_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DSCOTT_CUDA_ARCHS={archs}"]
            print(f"scott_kernels: building C++ and CUDA kernels with {nvcc} for architectures {archs}")
        else:
            args += ["-DSCOTT_WITH_CUDA=OFF"]
            print("scott_kernels: nvcc not found, building the C++ (CPU) kernels only; "
                  "set CUDA_HOME to build the CUDA kernels")
        stamp.unlink(missing_ok=True)  # a failed configure must not leave a stamp that looks valid
        subprocess.run([tools["cmake"], *fresh, *args], cwd=build_temp, check=True)
        stamp.write_text(json.dumps(tools))
        subprocess.run([tools["cmake"], "--build", ".", "--target", "_C"], cwd=build_temp, check=True)
        built = Path(self.get_ext_fullpath(ext.name))  # pybind11 names it with this Python's EXT_SUFFIX
        if not built.is_file():
            raise RuntimeError(f"scott_kernels: CMake finished but {built} was not written")
        print(f"scott_kernels: built {built.name} ({'CUDA ' + archs if nvcc else 'CPU only'})")


setup(
    name="scott-kernels",
    version="0.1.0",
    description="Sparse convolutional tokenizer (SCOTT) for Vision Transformers, computed only over visible patches",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["scott_kernels", "mimjepa"],
    package_dir={"mimjepa": "python/mimjepa"},
    package_data={"mimjepa": ["configs/*.yaml"]},
    # the oldest torch tested (.ci/oldest); it brings Triton 3.5, the first with float64 tl.dot
    install_requires=["torch>=2.9"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mimjepa=mimjepa.cli:main"]},
    ext_modules=[CMakeExtension("scott_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
