"""The Triton kernels compiled exactly as a GPU launch compiles them, on a machine without a GPU,
and their machine code read: registers, spills, shared memory, tensor-core instructions, load
widths, the main loop's instruction mix, and the launch geometry of every launch.

How: the real code path (``sparse_conv_tokenize(..., backend="triton")`` forward and backward on
CPU tensors) runs with Triton's active driver replaced by :class:`FakeDriver`, which reports a
CUDA target (sm_90a or sm_80), turns loading and launching a binary into bookkeeping, and
"benchmarks" an autotuned kernel by compiling and launching each config the autotuner keeps
after its own pruning. Nothing here names a kernel or a config: whatever ``triton.jit`` function
the code path launches is compiled through the JIT's own binder (signature, constexprs,
specialisations from the real arguments), so the capture follows the kernels as they change.

Must run in a process where ``TRITON_INTERPRET`` is unset when triton is imported (the
interpreter replaces compiled kernels): ``static_cost.py`` (next to this file) re-runs itself
without it, and tests/test_codegen.py runs that script in a fresh process.

Development tooling: it lives in the repository (benchmarks/static/), not in the installed
package; import it with this directory on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

# Per-target facts: the opt-in shared memory per block a kernel may use, SM count for waves.
TARGETS = {
    90: {"name": "sm_90a", "max_shared": 227 * 1024, "sms": 132, "regs_per_sm": 65536, "smem_per_sm": 228 * 1024,
         "max_warps_per_sm": 64},
    80: {"name": "sm_80", "max_shared": 163 * 1024, "sms": 108, "regs_per_sm": 65536, "smem_per_sm": 164 * 1024,
         "max_warps_per_sm": 64},
    # workstation / consumer GPUs, SM counts of the parts whose tensor rates the report uses:
    # L40S (sm_89; RTX 40xx / L4 alike), RTX A6000 (sm_86; RTX 30xx / A10 alike), T4 (sm_75)
    89: {"name": "sm_89", "max_shared": 99 * 1024, "sms": 142, "regs_per_sm": 65536, "smem_per_sm": 100 * 1024,
         "max_warps_per_sm": 48},
    86: {"name": "sm_86", "max_shared": 99 * 1024, "sms": 84, "regs_per_sm": 65536, "smem_per_sm": 100 * 1024,
         "max_warps_per_sm": 48},
    75: {"name": "sm_75", "max_shared": 64 * 1024, "sms": 40, "regs_per_sm": 65536, "smem_per_sm": 64 * 1024,
         "max_warps_per_sm": 32},
}


def triton_bin(tool: str) -> str | None:
    """Path of a CUDA tool Triton's wheel ships (ptxas, cuobjdump, nvdisasm), else the PATH's."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which(tool)


def tool_version(tool: str) -> str | None:
    path = triton_bin(tool) if tool != "nvcc" else shutil.which("nvcc")
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else None


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    grid: tuple[int, int, int]
    scalars: dict[str, Any]  # the launch's non-tensor, non-constexpr arguments by name
    phase: str  # which part of the workload launched it
    tensor_bytes: float = 0.0  # bytes of the distinct tensors passed (each read or written once)
    trial: bool = False  # launched by the autotuner's benchmark of a config, not by the code path


@dataclasses.dataclass
class KernelRecord:
    """One compiled variant of a Triton kernel (one set of constexprs and options)."""
    name: str  # the jit function's name
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shared: int  # bytes of shared memory the launch asks for
    compile_s: float
    kernel: Any = None  # the CompiledKernel (asm: ttir, ttgir, ptx, cubin, ...)
    arg_names: list[str] = dataclasses.field(default_factory=list)
    launches: list[Launch] = dataclasses.field(default_factory=list)
    autotuned: bool = False
    error: str | None = None

    @property
    def config(self) -> str:
        """The autotune config: the constexprs a config sets (else the BLOCK_* ones), warps, stages."""
        keys = sorted(tunables().get(self.name) or (k for k in self.constexprs if k.startswith("BLOCK")))
        tile = ",".join(f"{k.replace('BLOCK_', '')}={self.constexprs[k]}" for k in keys if k in self.constexprs)
        return f"{tile} w{self.num_warps} s{self.num_stages}"


# ------------------------------------------------------------------------------------------------
# The fake driver
# ------------------------------------------------------------------------------------------------
class _Function:
    """What load_binary hands back: stands for the loaded CUfunction."""

    def __init__(self, name: str):
        self.name = name


class FakeDriver:
    """A Triton driver for a GPU that is not there: a real compile target, no-op load/launch.

    Every launch is recorded on the :class:`KernelRecord` of the kernel it launches."""

    def __init__(self, arch: int, recorder: "Recorder"):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.recorder = recorder
        self.utils = self  # load_binary & co live on the driver itself

    # -- what the runtime asks --
    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp
        return ty_to_cpp(ty)

    def get_benchmarker(self):
        return self.recorder.bench

    def get_empty_cache_for_benchmark(self):
        return None

    def clear_cache(self, cache):
        pass

    # -- utils --
    def get_device_properties(self, device):
        t = TARGETS.get(self.arch, TARGETS[90])
        return {"max_shared_mem": t["max_shared"], "multiprocessor_count": t["sms"], "max_num_regs": t["regs_per_sm"],
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return object(), _Function(name), 0, 0, 1024

    def unload_module(self, module):
        pass

    def set_printf_fifo_size(self, size):
        pass

    def launcher_cls(self, src, metadata):
        return self.recorder.launcher(src, metadata)


class Recorder:
    """Collects compiled kernels and their launches while the fake driver is active."""

    def __init__(self, first_config_only: Callable[[str], bool] = lambda name: False):
        self.records: list[KernelRecord] = []
        self.phase = ""
        self.errors: list[str] = []
        self.first_config_only = first_config_only
        self._by_metadata: dict[int, KernelRecord] = {}
        self._bench_calls = 0
        self.loading = ""
        self.in_bench = False  # inside the autotuner's benchmark of a config
        self.lean = False  # launches return at once, unrecorded (host-time measurements)

    # compile wrapper: times every compile and keeps the CompiledKernel
    def wrap_compile(self, compile_fn):
        @functools.wraps(compile_fn)
        def compile(src, *args, **kwargs):
            start = time.perf_counter()
            try:
                kernel = compile_fn(src, *args, **kwargs)
            except Exception as e:  # recorded, then raised to the caller as the JIT would
                name = getattr(getattr(src, "fn", None), "__name__", str(src))
                rec = KernelRecord(name=name, constexprs=_constexprs(src), num_warps=(kwargs.get("options") or {}).get(
                    "num_warps", 0), num_stages=(kwargs.get("options") or {}).get("num_stages", 0), shared=0,
                    compile_s=time.perf_counter() - start, error=f"{type(e).__name__}: {str(e).strip()[:2000]}")
                self.records.append(rec)
                raise
            md = kernel.metadata
            fn = getattr(src, "fn", None)
            rec = KernelRecord(name=getattr(fn, "__name__", kernel.name), constexprs=_constexprs(src),
                               num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                               compile_s=time.perf_counter() - start, kernel=kernel,
                               arg_names=list(getattr(fn, "arg_names", [])))
            self.records.append(rec)
            self._by_metadata[id(md)] = rec
            return kernel
        return compile

    def launcher(self, src, metadata):
        rec = self._by_metadata.get(id(metadata))
        # Triton checks the kernel's resources right after this; its error does not name the kernel
        self.loading = f"{getattr(metadata, 'name', '?')} ({rec.config if rec else '?'}, shared {metadata.shared} B)"
        signature = getattr(src, "signature", {})
        names = list(signature.keys())
        recorder = self

        def launch(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
            if rec is None or recorder.lean:
                return
            scalars, tensors = {}, {}
            for name, value in zip(names, args):
                if isinstance(value, (int, float)) and not isinstance(value, bool) and signature.get(name) != "constexpr":
                    scalars[name] = value
                elif hasattr(value, "data_ptr") and hasattr(value, "untyped_storage"):
                    tensors[value.data_ptr()] = max(tensors.get(value.data_ptr(), 0),
                                                    value.numel() * value.element_size())
            rec.launches.append(Launch((int(gx), int(gy), int(gz)), scalars, recorder.phase,
                                       float(sum(tensors.values())), recorder.in_bench))
        return launch

    def bench(self, kernel_call, quantiles=None, **kwargs):
        """The autotuner's benchmark: compile and launch the config once. A failing config is
        recorded and ranks last; configs rank in list order otherwise, so the first kept wins."""
        self._bench_calls += 1
        self.in_bench = True
        try:
            kernel_call()
        except Exception as e:  # the autotuner itself only tolerates resource/ptxas errors
            self.errors.append(f"{self.loading}: {type(e).__name__}: {str(e).strip()[:500]}")
            t = float("inf")
        else:
            t = float(self._bench_calls)
        finally:
            self.in_bench = False
        return [t, t, t] if quantiles else t


def _constexprs(src) -> dict[str, Any]:
    fn = getattr(src, "fn", None)
    names = list(getattr(fn, "arg_names", []))
    out = {}
    for key, value in getattr(src, "constants", {}).items():
        idx = key[0] if isinstance(key, tuple) else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(key)
        if isinstance(key, tuple) and len(key) > 1:
            name += "".join(f"[{i}]" for i in key[1:])
        out[name] = value if isinstance(value, (int, float, bool, str)) or value is None else str(value)
    return out


@contextlib.contextmanager
def fake_gpu(arch: int = 90, first_config_only: Callable[[str], bool] = lambda name: False,
             cache_dir: str | None = None):
    """Within this context every Triton launch compiles for ``arch`` and is recorded, not run.

    Yields the :class:`Recorder`. Also: the autotuners' on-disk result cache is bypassed (its
    timings would be fake), and the triton backend accepts CPU tensors."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("fake_gpu needs compiled Triton kernels: unset TRITON_INTERPRET before importing triton")
    import triton
    import triton.compiler
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    recorder = Recorder(first_config_only)
    fake = FakeDriver(arch, recorder)
    saved_env = os.environ.get("TRITON_CACHE_DIR")
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    saved_compile = triton.compiler.compile
    saved_prune = Autotuner.prune_configs
    saved_disk = getattr(Autotuner, "check_disk_cache", None)
    saved_bench = Autotuner.__dict__.get("do_bench")

    def prune_configs(self, kwargs):
        kept = saved_prune(self, kwargs)
        name = getattr(getattr(self, "base_fn", None), "__name__", "")
        return kept[:1] if recorder.first_config_only(name) else kept

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        bench_fn()
        return False

    triton.compiler.compile = recorder.wrap_compile(saved_compile)
    Autotuner.prune_configs = prune_configs
    Autotuner.check_disk_cache = check_disk_cache
    # do_bench is a cached property in some versions, a plain attribute in others
    Autotuner.do_bench = property(lambda self: recorder.bench)
    undo = _accept_cpu_tensors()
    saved_active = getattr(driver, "_active", None)
    driver.set_active(fake)
    try:
        yield recorder
    finally:
        driver._active = saved_active  # no real driver may exist here, so no reset_active()
        triton.compiler.compile = saved_compile
        Autotuner.prune_configs = saved_prune
        if saved_disk is not None:
            Autotuner.check_disk_cache = saved_disk
        if saved_bench is not None:
            Autotuner.do_bench = saved_bench
        else:
            del Autotuner.do_bench
        undo()
        if cache_dir:
            if saved_env is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_env
        # compiled kernels hold no device state; drop the JIT caches so a later context with
        # another target compiles afresh
        _clear_jit_caches()


def _scott_modules():
    return [m for name, m in list(sys.modules.items()) if m is not None and (name == "scott_kernels" or
                                                                             name.startswith("scott_kernels."))]


def _replace_everywhere(original, replacement) -> list:
    """Rebinds every module-level name in scott_kernels that is ``original``, and every tuple
    holding it in a module-level dict (the backend registry); returns (holder, key, old value)."""
    undo = []
    for module in _scott_modules():
        for attr, value in list(vars(module).items()):
            if value is original:
                undo.append((module, attr, value))
                setattr(module, attr, replacement)
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if isinstance(v, tuple) and any(x is original for x in v):
                        undo.append((value, k, v))
                        value[k] = tuple(replacement if x is original else x for x in v)
    return undo


def _accept_cpu_tensors() -> Callable[[], None]:
    """The triton backend's device checks say yes to CPU tensors, and the weight gradient's
    reduction split is chosen as for a GPU of TARGETS[90]'s SM count (it sets the grid)."""
    import torch
    import scott_kernels  # noqa: F401  (loads the backends)
    from scott_kernels import compact, triton_configs, triton_conv

    def supports(device):
        return torch.device(device).type in ("cpu", "cuda")

    restore = _replace_everywhere(triton_configs.triton_supports, supports)
    splits = getattr(compact, "reduction_splits", None)
    if splits is not None:
        sms = TARGETS[90]["sms"]

        def gpu_splits(rows, k_total, c_out, device, *args, **kwargs):
            saved = compact._multiprocessors
            compact._multiprocessors = lambda index: sms
            try:
                return splits(rows, k_total, c_out, torch.device("cuda", 0), *args, **kwargs)
            finally:
                compact._multiprocessors = saved

        restore += _replace_everywhere(splits, gpu_splits)
    # the triton conv kernels size their weight-gradient splits from the device's SM count (none off
    # the GPU); every module that imported the function is rebound
    sm_count = getattr(triton_conv, "_sm_count", None)
    if sm_count is not None:
        restore += _replace_everywhere(sm_count, lambda device: TARGETS[90]["sms"])

    def undo():
        for holder, key, value in reversed(restore):
            if isinstance(holder, dict):
                holder[key] = value
            else:
                setattr(holder, key, value)
    return undo


def tunables() -> dict[str, set[str]]:
    """Per autotuned kernel name, the constexprs its configs set."""
    from triton.runtime.autotuner import Autotuner
    out: dict[str, set[str]] = {}
    for module in _scott_modules():
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                keys: set[str] = set()
                for c in value.configs:
                    keys |= set(c.kwargs)
                out[value.base_fn.__name__] = keys
    return out


def _jit_functions():
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    seen = []
    for module in _scott_modules():
        for value in vars(module).values():
            fn = value
            while fn is not None and not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", None) if isinstance(fn, Autotuner) or hasattr(fn, "fn") else None
            if isinstance(fn, JITFunction) and fn not in seen:
                seen.append(fn)
            if isinstance(value, Autotuner):
                value.cache.clear()
    return seen


def _clear_jit_caches():
    for fn in _jit_functions():
        fn.device_caches.clear()


# ------------------------------------------------------------------------------------------------
# The headline workload through the public API
# ------------------------------------------------------------------------------------------------
HEADLINE = {"batch": 64, "image": 224, "patch": 16, "visible": 78, "dim": 384, "hidden": 64, "kernel": 7,
            "in_chans": 3}


def run_workload(recorder: Recorder | None, dtype_name: str = "bfloat16", batch: int | None = None,
                 phases: Iterable[str] = ("masked_fwd", "masked_bwd", "dense_fwd"), backend: str = "triton",
                 phase_context: Callable[[str], Any] | None = None) -> None:
    """Runs a backend's forward (+ backward) at the headline workload; every launch is
    recorded under its phase: masked_fwd, masked_bwd (mask 0.6: 78 of 196 patches visible per
    image), dense_fwd (keep=None). ``phase_context(phase)``, when given, is a context manager
    entered around each phase's calls into the backend (and nothing else)."""
    import torch
    from scott_kernels import sparse_conv_tokenize

    class _NoRecorder:
        phase = ""

    recorder = recorder if recorder is not None else _NoRecorder()
    around = phase_context or (lambda phase: contextlib.nullcontext())
    h = HEADLINE
    dtype = getattr(torch, dtype_name)
    B = batch or h["batch"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, h["in_chans"], h["image"], h["image"], generator=g).to(dtype)
    weights = [torch.randn(h["hidden"], h["in_chans"], h["kernel"], h["kernel"], generator=g).to(dtype),
               torch.randn(h["dim"], h["hidden"], h["kernel"], h["kernel"], generator=g).to(dtype)]
    weights = [w.requires_grad_(True) for w in weights]
    n = (h["image"] // h["patch"]) ** 2
    order = torch.rand(B, n, generator=g).argsort(1)
    keep = torch.zeros(B, n, dtype=torch.bool)
    keep.scatter_(1, order[:, :h["visible"]], True)
    phases = list(phases)
    if "masked_fwd" in phases or "masked_bwd" in phases:
        recorder.phase = "masked_fwd"
        with around("masked_fwd"):
            tokens = sparse_conv_tokenize(x, weights, keep, patch_size=h["patch"], backend=backend,
                                          num_visible=h["visible"])
        if "masked_bwd" in phases:
            grad = torch.ones_like(tokens)  # the caller's gradient, not the backend's work
            recorder.phase = "masked_bwd"
            with around("masked_bwd"):
                torch.autograd.grad(tokens, weights, grad_outputs=grad)
    if "dense_fwd" in phases:
        detached = [w.detach() for w in weights]
        recorder.phase = "dense_fwd"
        with torch.no_grad(), around("dense_fwd"):
            sparse_conv_tokenize(x, detached, None, patch_size=h["patch"], backend=backend)
    recorder.phase = ""


# ------------------------------------------------------------------------------------------------
# Machine code
# ------------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_MMA_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA", "QMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA")


@dataclasses.dataclass
class Sass:
    instructions: list[tuple[int, str]]  # (address, text without the predicate guard)

    @property
    def count(self) -> int:
        return sum(1 for _, t in self.instructions if not t.startswith("NOP"))


@functools.lru_cache(maxsize=256)
def cubin_sass(cubin: bytes) -> dict[str, Sass]:
    """SASS of every function in a cubin, by name (cuobjdump -sass)."""
    tool = triton_bin("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's wheel ships it in triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True, timeout=300).stdout
    finally:
        os.unlink(path)
    return parse_sass(text)


def parse_sass(text: str) -> dict[str, Sass]:
    out: dict[str, Sass] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), Sass([]))
            continue
        if current is None:
            continue
        m = _SASS_LINE.search(line)
        if m:
            body = m.group(2).strip()
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
            current.instructions.append((int(m.group(1), 16), body))
    return out


def opcode(text: str) -> str:
    return text.split()[0] if text else ""


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the back-edge branch
    depth: int = 0
    children: list["Loop"] = dataclasses.field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self is not other


def find_loops(sass: Sass) -> list[Loop]:
    """Loops from back-edge branches (a BRA to a lower address); nested loops become children.
    Returns the top-level loops, in address order."""
    index = {addr: i for i, (addr, _) in enumerate(sass.instructions)}
    loops = []
    for i, (addr, text) in enumerate(sass.instructions):
        if opcode(text) in ("BRA", "JMP", "BRX") or text.startswith("BRA"):
            m = re.search(r"(?:BRA|JMP)\s+(?:\S+\s+)*?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
            target = None
            m2 = re.search(r"0x([0-9a-f]+)\s*$", text)
            if m2:
                target = int(m2.group(1), 16)
            if target is not None and target < addr and target in index:
                loops.append(Loop(index[target], i))
    # merge loops sharing a head (several back-edges): keep the widest
    by_start: dict[int, Loop] = {}
    for loop in loops:
        if loop.start not in by_start or loop.end > by_start[loop.start].end:
            by_start[loop.start] = loop
    loops = sorted(by_start.values(), key=lambda l: (l.start, -l.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for loop in loops:
        while stack and not stack[-1].contains(loop):
            stack.pop()
        if stack:
            loop.depth = stack[-1].depth + 1
            stack[-1].children.append(loop)
        else:
            roots.append(loop)
        stack.append(loop)
    return roots


def walk(loops: list[Loop]):
    for loop in loops:
        yield loop
        yield from walk(loop.children)


def _own_instructions(sass: Sass, loop: Loop) -> list[str]:
    """Instructions of a loop's body that are not inside one of its inner loops."""
    inner = [(c.start, c.end) for c in loop.children]
    return [t for i, (_, t) in enumerate(sass.instructions[loop.start:loop.end + 1], loop.start)
            if not any(s <= i <= e for s, e in inner) and not t.startswith("NOP")]


def _is_mma(text: str) -> bool:
    return opcode(text).split(".")[0] in _MMA_OPS


def mma_kind(texts: Iterable[str]) -> str:
    ops = {opcode(t).split(".")[0] for t in texts if _is_mma(t)}
    if "HGMMA" in ops:
        return "wgmma (HGMMA)"
    if "HMMA" in ops:
        return "mma.sync (HMMA)"
    if "DMMA" in ops:
        return "DMMA (fp64)"
    if ops:
        return "/".join(sorted(ops))
    return "none"


def load_widths(texts: Iterable[str]) -> dict[str, int]:
    """Global loads by width in bits: LDG (to registers) and LDGSTS (cp.async to shared)."""
    hist: dict[str, int] = {}
    for t in texts:
        op = opcode(t)
        base = op.split(".")[0]
        if base not in ("LDG", "LDGSTS", "UBLKCP", "UTMALDG"):
            continue
        parts = op.split(".")
        width = "32"
        for p in parts[1:]:
            if p in ("128", "64"):
                width = p
            elif p in ("U16", "S16", "16"):
                width = "16"
            elif p in ("U8", "S8"):
                width = "8"
        if base in ("UBLKCP", "UTMALDG"):
            width = "tma"
        key = f"{base}.{width}"
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items()))


def resource_usage(binary_path: str) -> list[dict[str, Any]]:
    """cuobjdump --dump-resource-usage of a cubin or a host object/.so: one dict per function and
    architecture with REG, STACK, SHARED (static), LOCAL (bytes per thread: spills and stack
    arrays), name and arch; empty for a binary without device code (a module built without nvcc)."""
    tool = triton_bin("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    proc = subprocess.run([tool, "--dump-resource-usage", binary_path], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        if "does not contain device code" in proc.stdout + proc.stderr:
            return []
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return parse_resource_usage(proc.stdout)


def parse_resource_usage(text: str) -> list[dict[str, Any]]:
    out = []
    current = arch = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            vals: dict[str, Any] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            vals.update(name=current, arch=arch)
            out.append(vals)
            current = None
    return out


@functools.lru_cache(maxsize=256)
def cubin_resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = resource_usage(path)
    finally:
        os.unlink(path)
    return usage[0] if usage else {}


def spill_bytes(ptx_or_ptxas_log: str) -> int | None:
    m = re.search(r"(\d+) bytes spill stores", ptx_or_ptxas_log)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------
# Loop trip counts from the TTIR, evaluated with a launch's scalar arguments
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class IrLoop:
    line: int
    indent: int
    bounds: tuple[str, str, str]  # lb, ub, step SSA names
    has_dot: bool = False
    children: list["IrLoop"] = dataclasses.field(default_factory=list)
    parent: "IrLoop | None" = None


_FOR = re.compile(r"scf\.for %[\w.]+ = (%[\w.]+) to (%[\w.]+) step (%[\w.]+)")
_DEF = re.compile(r"^\s*(%[\w.]+) = (\S+) (.*?)(?: loc\(.*)?$")


def ir_loops(ttir: str) -> list[IrLoop]:
    """The scf.for loops of a kernel's TTIR, as a tree (by indentation), top level in order."""
    roots: list[IrLoop] = []
    stack: list[IrLoop] = []
    for i, line in enumerate(ttir.splitlines()):
        indent = len(line) - len(line.lstrip())
        while stack and indent <= stack[-1].indent and line.strip().startswith("}"):
            if indent == stack[-1].indent:
                stack.pop()
                break
            break
        while stack and indent <= stack[-1].indent and not line.strip().startswith("}"):
            stack.pop()
        m = _FOR.search(line)
        if m:
            loop = IrLoop(i, indent, (m.group(1), m.group(2), m.group(3)))
            if stack:
                loop.parent = stack[-1]
                stack[-1].children.append(loop)
            else:
                roots.append(loop)
            stack.append(loop)
        elif stack and ("tt.dot" in line or "ttng.warp_group_dot" in line or "tt.dot_scaled" in line):
            for loop in stack:
                loop.has_dot = True
    return roots


def _ints(text: str) -> int | None:
    m = re.match(r"\s*(-?\d+)", text)
    return int(m.group(1)) if m else None


def ir_scalars(ttir: str, args: dict[str, Any], pid: tuple[int, int, int] = (0, 0, 0)) -> dict[str, int]:
    """Values of the scalar integer SSA values of the TTIR that follow from the launch's
    arguments (a small evaluator of arith ops; anything else stays unknown)."""
    env: dict[str, int] = {f"%{k}": int(v) for k, v in args.items() if isinstance(v, (int, bool))}
    ops = {
        "arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b, "arith.muli": lambda a, b: a * b,
        "arith.divsi": lambda a, b: int(a / b) if b else None, "arith.divui": lambda a, b: a // b if b else None,
        "arith.floordivsi": lambda a, b: a // b if b else None,
        "arith.ceildivsi": lambda a, b: -(-a // b) if b else None, "arith.ceildivui": lambda a, b: -(-a // b) if b else None,
        "arith.remsi": lambda a, b: int(a - b * int(a / b)) if b else None, "arith.remui": lambda a, b: a % b if b else None,
        "arith.maxsi": max, "arith.minsi": min, "arith.maxui": max, "arith.minui": min,
        "arith.andi": lambda a, b: a & b, "arith.ori": lambda a, b: a | b, "arith.xori": lambda a, b: a ^ b,
        "arith.shli": lambda a, b: a << b, "arith.shrsi": lambda a, b: a >> b, "arith.shrui": lambda a, b: a >> b,
    }
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        if "tensor<" in rest:
            continue
        operands = re.findall(r"%[\w.]+", rest)
        try:
            if op == "arith.constant":
                v = _ints(rest)
                if v is None and rest.strip().startswith("true"):
                    v = 1
                elif v is None and rest.strip().startswith("false"):
                    v = 0
                if v is not None and re.search(r":\s*i\d+", rest):
                    env[name] = v
            elif op == "tt.get_program_id":
                env[name] = pid["xyz".index(rest.strip()[0])]
            elif op in ops and len(operands) >= 2 and all(o in env for o in operands[:2]):
                v = ops[op](env[operands[0]], env[operands[1]])
                if v is not None:
                    env[name] = v
            elif op in ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast") and operands and operands[0] in env:
                env[name] = env[operands[0]]
            elif op == "arith.cmpi" and len(operands) >= 2 and all(o in env for o in operands[:2]):
                pred = rest.split(",")[0].strip()
                a, b = env[operands[0]], env[operands[1]]
                env[name] = int({"eq": a == b, "ne": a != b, "slt": a < b, "sle": a <= b, "sgt": a > b, "sge": a >= b,
                                 "ult": a < b, "ule": a <= b, "ugt": a > b, "uge": a >= b}.get(pred, False))
            elif op == "arith.select" and len(operands) >= 3 and all(o in env for o in operands[:3]):
                env[name] = env[operands[1]] if env[operands[0]] else env[operands[2]]
        except (ValueError, TypeError, OverflowError):
            continue
    return env


def trip_count(loop: IrLoop, env: dict[str, int]) -> int | None:
    lb, ub, st = (env.get(x) for x in loop.bounds)
    if lb is None or ub is None or not st:
        return None
    return max(0, -(-(ub - lb) // st))


# ------------------------------------------------------------------------------------------------
# Per-kernel analysis and the static time estimate
# ------------------------------------------------------------------------------------------------
# Machine model (an H200; the H100 SXM differs only in HBM bandwidth): 132 SMs x 4 schedulers
# x 1.98 GHz boost issue about 1.05e12 warp-instructions/s; dense bf16/fp16 tensor math ~790e12
# FLOP/s (tf32 half of it); HBM about 3.3e12 B/s measured-class copy rate (H100: 2.98e12).
MACHINE = {"name": "H200 (132 SMs, 1.98 GHz)", "sms": 132, "schedulers": 4, "clock": 1.98e9,
           "tensor_flops": 790e12, "hbm": 3.3e12}


def tensor_rate(machine: dict, texts: Iterable[str]) -> float:
    """Dense tensor-core FLOP/s for a kernel's tensor-core instructions: the machine's per-class
    rate (``machine["tensor_rates"]``, keyed by SASS class: HGMMA = wgmma, HMMA = mma.sync), else
    its single ``tensor_flops``; TF32 runs at half the 16-bit rate."""
    ops = [opcode(t) for t in texts if _is_mma(t)]
    classes = {op.split(".")[0] for op in ops}
    rates = machine.get("tensor_rates") or {}
    kind = "HGMMA" if "HGMMA" in classes else "HMMA" if "HMMA" in classes else next(iter(sorted(classes)), "")
    rate = rates.get(kind, machine["tensor_flops"])
    return rate / (2 if any("TF32" in op for op in ops) else 1)


def mma_flops(text: str, num_warps: int) -> float:
    """FLOPs one warp's issue of this tensor-core instruction performs (a wgmma is issued by each
    of the 4 warps of its warpgroup, so a quarter of the instruction's work is counted per warp)."""
    op = opcode(text)
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2.0 * a * b * c / 4
    m = re.match(r"[HDIQ]MMA\.(16|8)(8)(\d+)", op)  # m16n8k16 is written 16816, m8n8k4 884
    if m:
        a, b, c = map(int, m.groups())
        return 2.0 * a * b * c
    return 0.0


@dataclasses.dataclass
class KernelCost:
    """Static cost of one compiled kernel at the launches recorded for it."""
    name: str
    config: str
    registers: int
    local_bytes: int  # per thread: spills and stack
    spill_instructions: int  # STL/LDL in the SASS
    shared: int
    mma: str
    loop_instructions: int | None  # per iteration of the main (innermost tensor-core or hottest) loop
    loop_mma: int
    loop_loads: dict[str, int]
    instructions_per_mma: float | None
    warp_instructions: float  # executed, all launches of the phase
    mma_flops: float  # executed tensor-core FLOPs
    bytes: float  # compulsory: every tensor argument once
    programs: int
    issue_s: float
    memory_s: float
    mma_s: float
    estimate_s: float
    trips: str
    notes: list[str]


def analyze(record: KernelRecord, launches: list[Launch], arch: int = 90, machine: dict = MACHINE,
            tensor_bytes: Callable[[Launch], float] | None = None) -> KernelCost:
    kernel = record.kernel
    sass_all = cubin_sass(kernel.asm["cubin"])
    sass = sass_all.get(kernel.name) or next(iter(sass_all.values()))
    res = cubin_resources(kernel.asm["cubin"])
    texts = [t for _, t in sass.instructions if not t.startswith("NOP")]
    notes = []
    roots = find_loops(sass)
    loops = list(walk(roots))
    mma_loops = [l for l in loops if any(_is_mma(t) for t in _own_instructions(sass, l))]
    main = max(mma_loops, key=lambda l: len(_own_instructions(sass, l)), default=None)
    if main is None and loops:
        main = max(loops, key=lambda l: len(_own_instructions(sass, l)))
    own = _own_instructions(sass, main) if main else []
    loop_mma = sum(1 for t in own if _is_mma(t))

    # trip counts: the TTIR's loops in preorder against the SASS loops in preorder when the
    # trees have the same shape; else only the tensor-core loops are paired, in order.
    ttir = kernel.asm.get("ttir", "")
    ir = list(_walk_ir(ir_loops(ttir)))
    pairs: dict[int, IrLoop] = {}
    if len(ir) == len(loops) and all(len(a.children) == len(b.children) for a, b in zip(ir, loops)):
        pairs = {id(s): i for s, i in zip(loops, ir)}
    else:
        ir_dot = [l for l in ir if l.has_dot and not any(c.has_dot for c in l.children)]
        if len(ir_dot) == len(mma_loops):
            pairs = {id(s): i for s, i in zip(mma_loops, ir_dot)}
        if len(ir) != len(loops):
            notes.append(f"{len(ir)} IR loops vs {len(loops)} SASS loops: unpaired SASS loops counted once")

    warp_instr_per_warp_total = 0.0
    mma_flop_total = 0.0
    programs_total = 0
    issue_s = 0.0
    trips_seen = []
    top = [t for i, (_, t) in enumerate(sass.instructions)
           if not any(r.start <= i <= r.end for r in roots) and not t.startswith("NOP")]
    occupancy = _resident_programs(res.get("REG", 0), record.num_warps, record.shared, arch)
    for launch in launches:
        env = ir_scalars(ttir, launch.scalars)
        per_warp = float(len(top))
        flops = sum(mma_flops(t, record.num_warps) for t in top)
        for loop in loops:
            mult = 1
            ir_loop = pairs.get(id(loop))
            node = ir_loop
            while node is not None:
                n = trip_count(node, env)
                if n is None:
                    notes.append("a loop bound is not a function of the launch's scalars: counted once")
                    break
                mult *= n
                node = node.parent
            body = _own_instructions(sass, loop)
            per_warp += len(body) * mult
            flops += sum(mma_flops(t, record.num_warps) for t in body) * mult
            if loop is main and ir_loop is not None:
                trips_seen.append(mult)
        programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
        programs_total += programs
        warp_instr_per_warp_total += per_warp * record.num_warps * programs
        mma_flop_total += flops * record.num_warps * programs
        waves = -(-programs // (machine["sms"] * occupancy))
        per_wave_cycles = max(per_warp, occupancy * record.num_warps * per_warp / machine["schedulers"])
        issue_s += waves * per_wave_cycles / machine["clock"]
    nbytes = sum(tensor_bytes(l) if tensor_bytes else l.tensor_bytes for l in launches)
    mma_s = mma_flop_total / tensor_rate(machine, texts)
    memory_s = nbytes / machine["hbm"]
    return KernelCost(
        name=record.name, config=record.config, registers=res.get("REG", 0),
        local_bytes=res.get("LOCAL", 0) + res.get("STACK", 0),
        spill_instructions=sum(1 for t in texts if opcode(t).split(".")[0] in ("STL", "LDL")),
        shared=record.shared, mma=mma_kind(texts), loop_instructions=len(own) if main else None, loop_mma=loop_mma,
        loop_loads=load_widths(own), instructions_per_mma=(len(own) / loop_mma) if loop_mma else None,
        warp_instructions=warp_instr_per_warp_total, mma_flops=mma_flop_total, bytes=nbytes,
        programs=programs_total, issue_s=issue_s, memory_s=memory_s, mma_s=mma_s,
        estimate_s=max(issue_s, memory_s, mma_s), trips="/".join(str(t) for t in sorted(set(trips_seen))) or "-",
        notes=sorted(set(notes)))


def _walk_ir(loops):
    for l in loops:
        yield l
        yield from _walk_ir(l.children)


def _resident_programs(regs: int, num_warps: int, shared: int, arch: int) -> int:
    """Programs an SM holds at once, by registers, shared memory and warps."""
    t = TARGETS.get(arch, TARGETS[90])
    by_regs = t["regs_per_sm"] // max(1, (max(regs, 1) + 7) // 8 * 8 * 32 * num_warps)
    by_smem = t["smem_per_sm"] // shared if shared else 32
    by_warps = t["max_warps_per_sm"] // num_warps
    return max(1, min(by_regs, by_smem, by_warps, 32))
