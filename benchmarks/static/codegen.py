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
import sys
import time
from typing import Any, Callable, Iterable


# the machine-code reading and cost model, re-exported: callers use codegen.<name>
from machine_code import *  # noqa: E402,F401,F403
from machine_code import _is_mma, _own_instructions, _resident_programs  # noqa: E402,F401

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
            effect = HOST_EFFECTS.get(getattr(metadata, "name", ""))
            if effect is not None:
                effect(dict(zip(names, args)))
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


def _visible_tables_on_host(args: dict) -> None:
    """What ``_visible_tables_kernel`` writes to slot and tile_pos, built by the C++ twin of the
    cuda backend's tables kernel (a native call, not a torch op, so the profiler counts none): the
    host path reads these tables (tile counts, the token rows); it never reads the neighbour table."""
    from scott_kernels.ops import _C
    keep, n = args["keep_ptr"], int(args["N"])
    _C.visible_tables(keep.data_ptr(), keep.numel() // n, n, int(args["num_visible"]), int(args["GW"]), -1,
                      args["slot_ptr"].data_ptr(), args["tile_pos_ptr"].data_ptr(), 0, False, 0)


# Kernels whose outputs the host path reads, by compiled name: run on the host as they launch
HOST_EFFECTS: dict[str, Callable[[dict], None]] = {"_visible_tables_kernel": _visible_tables_on_host}


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

    @functools.lru_cache(maxsize=64)   # as the function it stands in for
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
                forget = getattr(value, "forget_choices", value.cache.clear)
                forget()
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
    entered around each phase's calls into the backend (and nothing else). The phases are a
    training step after the first: what a backend builds once per process (the triton backend's
    zeroed arrival counters, kept between backwards) exists before them."""
    import torch
    from scott_kernels import sparse_conv_tokenize
    from scott_kernels.triton_conv import arrival_counters

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
    if backend == "triton":
        arrival_counters(x.device, 1)
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
