"""Runs the emulated module's AddressSanitizer variant (``tests/emu/build.py --asan``): the emulated
tests in a subprocess whose Python preloads libasan, with that module imported by path in place of
``scott_kernels._emu``.

Python and torch are not instrumented, but with libasan preloaded every malloc / posix_memalign of
the process is ASan's, torch's CPU allocator included: each tensor's storage is its own allocation
with redzones around it, and a kernel's load or store that leaves it (into a redzone or into freed
memory) is reported where it happens, with the kernel, block and thread (csrc/emu/runtime.cpp).

The process's settings, and why:
  LD_PRELOAD   libasan first (an instrumented module cannot load into an uninstrumented Python
               otherwise), then libstdc++: Python does not link it, and ASan finds the functions it
               intercepts when it starts; without libstdc++ there, __cxa_throw is not intercepted and
               a C++ exception would leave the redzones of the frames it unwinds poisoned.
  ASAN_OPTIONS detect_leaks=0: Python and torch keep allocations until exit on purpose (interned
               objects, registries, caches), which LeakSanitizer would report at exit; leaks are not
               what this run checks. Nothing else is changed from ASan's defaults: the first report
               ends the process (halt_on_error), default redzones, freed memory quarantined (a use
               after free is reported too), no suppressions. ASAN_OPTIONS of the environment are
               appended (they win).
  --capture=sys  pytest leaves file descriptor 2 alone, so that ASan's report (written to it just
               before the process exits) reaches the output instead of a capture file.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from build import _compiler  # noqa: E402

OPTIONS = "detect_leaks=0"

_RUN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("scott_kernels._emu", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["scott_kernels._emu"] = module
import pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--capture=sys", sys.argv[2], "-k", sys.argv[3]]))
"""


def _library(name: str) -> Path | None:
    try:
        out = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out)
    return path if path.is_absolute() and path.exists() else None


def unavailable() -> str | None:
    """Why the ASan variant cannot be built and run here, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the emulated device's fibers need x86-64 Linux (this is {sys.platform} {platform.machine()})"
    if shutil.which(_compiler()) is None:
        return f"no C++ compiler {_compiler()!r} (CXX) to build the emulated module"
    for lib in ("libasan.so", "libstdc++.so"):
        if _library(lib) is None:
            return f"{_compiler()} has no {lib} (-print-file-name): AddressSanitizer is not installed"
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (it builds the emulated module)"
    return None


def environment() -> dict:
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join([str(_library("libasan.so")), str(_library("libstdc++.so"))] +
                                 ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    env["ASAN_OPTIONS"] = OPTIONS + (":" + env["ASAN_OPTIONS"] if env.get("ASAN_OPTIONS") else "")
    return env


def run_tests(module: Path, selection: str, tests: Path = ROOT / "tests" / "test_cuda_emulated.py",
              timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs the tests of `tests` that `selection` (-k) picks on the ASan-built `module`."""
    return subprocess.run([sys.executable, "-c", _RUN, str(module), str(tests), selection], cwd=ROOT,
                          env=environment(), capture_output=True, text=True, timeout=timeout)


def excerpt(output: str) -> str:
    """The lines of an ASan report that say what happened where (the whole report follows them)."""
    lines = output.splitlines()
    keep = []
    for i, line in enumerate(lines):
        if re.search(r"ERROR: AddressSanitizer|^(READ|WRITE) of size|emulated device: AddressSanitizer|"
                     r"is located|^SUMMARY: AddressSanitizer", line):
            keep.append(line)
            if re.match(r"(READ|WRITE) of size", line):
                keep += [frame for frame in lines[i + 1:i + 5] if frame.lstrip().startswith("#")]
    return "\n".join(keep)
