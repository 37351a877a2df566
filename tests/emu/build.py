"""Builds scott_kernels._emu: the CUDA sources in csrc/ compiled as C++ for the emulated device
(csrc/emu/), with bindings.cpp and the C++ twin, into a module beside scott_kernels/_C.

    python tests/emu/build.py [--jobs N] [--out DIR] [--define NAME[=VALUE] ...] [--src DIR] [--asan]

--src builds from another copy of csrc/ (the mutation tests build deliberately broken copies);
--out puts the module (a scott_kernels/ folder holding _emu) elsewhere. Objects are cached
under build/emu/ by the hash of their command line and sources.

--asan builds the AddressSanitizer variant into build/emu-asan/ (or --out; never over the normal
module): the kernels' translation units and the runtime are compiled with -fsanitize=address
instead of the -fsanitize=thread access hooks, and the module links libasan, so it only loads in a
process that preloads it (tests/test_cuda_emulated_asan.py runs it). The host translation units
(bindings, the C++ twin) are not instrumented: their objects are the normal build's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNEL_SOURCES = ["conv_igemm.cu", "conv_image.cu", "gemm_fallback.cu", "pool.cu", "patch_tiles_cuda.cu"]
HOST_SOURCES = ["tokenizer_cpu.cpp", "patch_tiles_cpu.cpp"]


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


ASAN = ["-fsanitize=address", "-fno-omit-frame-pointer"]
ASAN_OUT = ROOT / "build" / "emu-asan"


def _commands(src: Path, obj_dir: Path, defines: list[str],
              asan: bool = False) -> list[tuple[list[str], Path, list[Path]]]:
    import pybind11

    emu = src / "emu"
    common = [_compiler(), "-std=c++17", "-O2", "-fno-strict-aliasing", "-fPIC", "-g0", "-Wno-attributes", "-Wno-ignored-attributes",
              f"-I{src}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]
    # its own pybind11 internals: _C and _emu register the same C++ types (and so does an _emu built
    # with other --define values, which a test loads beside the normal one)
    abi = "_scott_emu" + ("_" + hashlib.sha256(" ".join(defines).encode()).hexdigest()[:8] if defines else "")
    common += [f'-DPYBIND11_BUILD_ABI="{abi}"']
    common += [f"-D{d}" for d in defines]
    kernel = ["-x", "c++", "-include", str(emu / "cuda_host.h"), "-D__CUDACC__", "-D__CUDA_ARCH__=900",
              "-DSCOTT_EMU", "-DSCOTT_WITH_CUDA", f"-I{emu / 'include'}", "-fvisibility=default"]
    # every load and store calls a hook (csrc/emu/runtime.cpp checks shared memory; no sanitizer
    # runtime is linked), or, in the ASan variant, is checked against ASan's shadow memory (the two
    # instrumentations do not combine)
    kernel += ASAN if asan else ["-fsanitize=thread", "-Wno-tsan"]
    out = []
    headers = sorted(src.glob("*.h")) + sorted(src.glob("*.cuh")) + sorted(emu.rglob("*.h"))
    for name in KERNEL_SOURCES:
        out.append((common + kernel, src / name, headers))
    out.append((common + kernel, emu / "fragment_probe.cu", headers))
    for name in HOST_SOURCES:
        out.append((common + ["-fvisibility=hidden"], src / name, headers))
    out.append((common + ["-DSCOTT_EMU", "-DSCOTT_WITH_CUDA", f"-I{emu / 'include'}", "-fvisibility=hidden"],
                src / "bindings.cpp", headers))
    out.append((common + ["-fvisibility=hidden"], emu / "emu_bindings.cpp", headers))
    out.append((common + ["-DSCOTT_EMU", "-fvisibility=hidden"] + (ASAN if asan else []), emu / "runtime.cpp", headers))
    result = []
    for cmd, source, deps in out:
        # (the key names sources relative to src: a copy of csrc/ elsewhere reuses the objects of
        # the files it did not change)
        h = hashlib.sha256(" ".join(cmd + [str(source)]).replace(str(src), "<src>").encode())
        for p in [source, *deps]:
            h.update(p.read_bytes())
        obj = obj_dir / f"{source.stem}-{h.hexdigest()[:16]}.o"
        result.append((cmd + ["-c", str(source), "-o", str(obj)], obj, deps))
    return result


def build(src: Path = ROOT / "csrc", out: Path | None = None, jobs: int = 2,
          defines: list[str] | None = None, quiet: bool = False, asan: bool = False) -> Path:
    out = Path(out) if out is not None else ASAN_OUT if asan else ROOT / "scott_kernels"
    if asan and out.resolve() == (ROOT / "scott_kernels").resolve():
        raise ValueError("the ASan variant of _emu only loads under a preloaded libasan: it does not go "
                         "beside the normal module")
    obj_dir = ROOT / "build" / "emu"
    obj_dir.mkdir(parents=True, exist_ok=True)
    cmds = _commands(Path(src).resolve(), obj_dir, defines or [], asan)

    def run(item):
        cmd, obj, _ = item
        if obj.is_file():
            return
        tmp = obj.with_suffix(".tmp.o")
        cmd = cmd[:-1] + [str(tmp)]
        if not quiet:
            print("compiling", cmd[-3], flush=True)
        subprocess.run(cmd, check=True)
        tmp.replace(obj)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, cmds))
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"_emu{sysconfig.get_config_var('EXT_SUFFIX')}"
    tmp = target.with_name(target.name + ".tmp")
    subprocess.run([_compiler(), "-shared", *(ASAN if asan else []), "-o", str(tmp), *[str(o) for _, o, _ in cmds],
                    "-ldl"], check=True)
    tmp.replace(target)
    if not quiet:
        print("built", target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--src", default=str(ROOT / "csrc"))
    ap.add_argument("--out", default=None, help="default: scott_kernels/, or build/emu-asan/ with --asan")
    ap.add_argument("--define", action="append", default=[])
    ap.add_argument("--asan", action="store_true", help="the AddressSanitizer variant (see above)")
    args = ap.parse_args()
    build(Path(args.src), Path(args.out) if args.out else None, args.jobs, args.define, asan=args.asan)


if __name__ == "__main__":
    sys.exit(main())
