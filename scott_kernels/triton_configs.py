"""Helpers shared by the Triton kernel modules (triton_conv, triton_image, triton_pool): where
Triton runs; the conv GEMMs' autotune config lists, their pruning and the ``autotune`` wrapper
(bottom of this file); and pruning by shared memory — drop configs whose shared memory would
exceed what the GPU gives one block, before they are compiled or launched.

Triton itself refuses such a kernel only after compiling it (``OutOfResources`` at load time);
with one config left that is a failed launch, with many a wasted compile. An estimate from the
tile sizes prunes them first:

    prune = prune_hook(my_prune, shared_fits(gemm_shared_bytes))
    triton.autotune(configs, key, prune_configs_by={"early_config_prune": prune})
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterable, Sequence

__all__ = ["cdiv", "interpreting", "compile_state", "MIN_CAPABILITY", "triton_supports", "check_interpretable", "single_config", "rows_bucket", "accumulator", "MAX_SHARED", "shared_memory_limit", "gemm_shared_bytes", "keep_fitting", "shared_fits", "prune_hook",
           "element_bytes", "pow2", "autotune", "SharedMemoryError", "resource_errors", "conv_fwd_configs", "image_fwd_configs", "conv_wgrad_configs",
           "image_wgrad_configs", "conv_dgrad_configs", "prune_wide", "prune_by_c_out", "prune_by_c_in",
           "prune_image_wgrad", "CONV_KEY", "IMAGE_KEY", "FWD_SHARED", "IMAGE_FWD_SHARED", "WGRAD_SHARED",
           "IMAGE_WGRAD_SHARED"]

# read once, as the package's kernels are decorated (which is when Triton fixes the mode)
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """Triton's CPU interpreter is on (TRITON_INTERPRET=1, set before the package is imported)."""
    return _INTERPRETING


# Oldest GPU the Triton kernels run on. Compiled for sm_75 (T4, RTX 20xx), Triton 3.8 emits no
# tensor-core instruction for their dots (fp16, bf16 or fp32 alike: FMA loops) and every GEMM
# kernel spills registers; bf16 needs sm_80 anyway. Below it the backend is not offered.
MIN_CAPABILITY = (8, 0)


# triton_supports' answers by device: every launch asks, and the capability query costs microseconds
_SUPPORTED: dict = {}


def triton_supports(device) -> bool:
    """Triton runs on CUDA GPUs of compute capability MIN_CAPABILITY (sm_80) or newer, and on the
    CPU under its interpreter (TRITON_INTERPRET=1). One function for every Triton op's device
    check, so a tool that compiles the kernels for a GPU target on a CPU
    (benchmarks/static/codegen.py) has one place to rebind."""
    import torch
    if torch.compiler.is_compiling():   # traced once: dynamo reads no cache
        return _device_supports(torch.device(device))
    ok = _SUPPORTED.get(device)
    if ok is None:
        device_ = torch.device(device)
        ok = _device_supports(device_)
        if device_.type != "cuda" or device_.index is not None:   # "cuda" alone: whichever is current
            _SUPPORTED[device] = ok
    return ok


def _device_supports(device) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
        return False
    import torch
    if device.type == "cuda":
        return torch.cuda.is_available() and tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY
    return device.type == "cpu" and interpreting()


def check_interpretable(name: str, *dtypes) -> None:
    """Raises where Triton's CPU interpreter cannot compute: it runs on NumPy arrays, which have no
    bfloat16 (its arithmetic there fails or silently reads the raw bits)."""
    import torch
    if interpreting() and torch.bfloat16 in dtypes:
        raise TypeError(f"{name}: bfloat16 does not run under Triton's CPU interpreter (TRITON_INTERPRET=1: "
                        "NumPy has no bfloat16); use float16, float32 or float64 there, or a CUDA GPU")


def single_config() -> bool:
    """SCOTT_TRITON_SINGLE_CONFIG=1: every autotuned kernel keeps only its first config, so a
    quick GPU check compiles one variant per kernel instead of benchmarking the whole list."""
    return os.environ.get("SCOTT_TRITON_SINGLE_CONFIG", "").strip().lower() in {"1", "true", "yes", "on"}


def rows_bucket(rows: int) -> int:
    """The row count's power of two: the autotune key that groups launches of similar size."""
    return int(rows).bit_length()


@functools.cache   # asked on every launch
def accumulator(dtype):
    """Triton accumulator dtype for a torch dtype: float64 stays float64, the rest accumulate in float32."""
    import torch
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


# Shared memory one block may opt into, by compute capability (bytes).
MAX_SHARED = {90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024, 89: 99 * 1024, 86: 99 * 1024, 80: 163 * 1024,
              75: 64 * 1024, 70: 96 * 1024}


def shared_memory_limit(default: int = 99 * 1024) -> int:
    """The active Triton driver's per-block shared memory limit (what a launch is checked
    against), or ``default`` when no driver answers."""
    try:
        from triton.runtime import driver
        active = driver.active
        props = active.utils.get_device_properties(active.get_current_device())
        return int(props["max_shared_mem"])
    except Exception:  # no GPU and no stand-in driver: the most common consumer-GPU limit
        try:
            from triton.runtime import driver
            target = driver.active.get_current_target()
            return MAX_SHARED.get(int(target.arch), default)
        except Exception:
            return default


def element_bytes(named_args: dict[str, Any]) -> int:
    """Bytes per element of the kernel's first floating tensor argument: by convention its GEMM
    operand (a float32 partial or output later in the list is not staged in shared memory)."""
    for a in named_args.values():
        if hasattr(a, "element_size") and getattr(a, "is_floating_point", lambda: False)():
            return a.element_size()
    return 4


def gemm_shared_bytes(config, named_args: dict[str, Any], m="BLOCK_M", n="BLOCK_N", k="BLOCK_K") -> int:
    """Shared memory of a pipelined GEMM tile: num_stages copies of the (m x k) and (k x n)
    operand tiles (Triton's software pipeline keeps one per stage). Each of m, n, k names a
    config key or a kernel argument (a constexpr the launch passes), or is a tuple of names whose
    product is the tile side; 0 (no estimate) when one is missing."""
    values = {**named_args, **config.kwargs}

    def side(spec):
        names = (spec,) if isinstance(spec, str) else tuple(spec)
        if not all(isinstance(values.get(x), int) for x in names):
            return None
        out = 1
        for x in names:
            out *= int(values[x])
        return out

    dims = [side(x) for x in (m, n, k)]
    if None in dims:
        return 0
    tm, tn, tk = dims
    stages = max(1, int(getattr(config, "num_stages", 1) or 1))
    return stages * (tm * tk + tk * tn) * element_bytes(named_args)


def keep_fitting(configs: Sequence, estimate: Callable[[Any], int], limit: int | None = None) -> list:
    """Configs whose estimated shared memory fits ``limit`` (default: the device's); if none
    does, the one that needs least, so the autotuner always has a config."""
    limit = shared_memory_limit() if limit is None else limit
    sized = [(estimate(c), c) for c in configs]
    kept = [c for need, c in sized if need <= limit]
    return kept or [min(sized, key=lambda x: x[0])[1]]


def shared_fits(estimate: Callable[..., int] = gemm_shared_bytes, limit: int | None = None):
    """An ``early_config_prune`` that keeps the configs whose ``estimate(config, named_args)``
    fits the device's shared memory."""
    def prune(configs, named_args, **kwargs):
        # constexprs the launch passes by keyword (tile sides fixed by the geometry) count too
        args = {**named_args, **kwargs}
        return keep_fitting(configs, lambda c: estimate(c, args), limit)
    return prune


def prune_hook(*rules: Callable) -> Callable:
    """Chains ``early_config_prune`` functions: each gets the previous one's survivors."""
    def prune(configs, named_args, **kwargs):
        kept: Iterable = configs
        for rule in rules:
            kept = rule(list(kept), named_args, **kwargs)
        return list(kept)
    return prune


# --------------------------------------------------------------------------------------------
# The conv GEMMs' tile-size autotuning (triton_conv, triton_image): keyed on channel counts, patch
# side, kernel size and the row count's power of two; results are kept per process and in
# Triton's on-disk cache (cache_results).
# --------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code (triton.cdiv is a constexpr function: a few µs per call there)."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _cfg(kwargs: dict, warps: int, stages: int):
    import triton
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def _keep(configs: list) -> list:
    return configs[:1] if single_config() else configs


# The conv GEMM tile lists hold only configs that the sm_90 machine code shows can win at the
# SCOTT shapes (wgmma tiles of at least 64 rows, 16-byte gathers, no spills), so a first call
# compiles a handful of variants. The interpreter gets one small tile.
def conv_fwd_configs() -> list:
    """Compact-source forward: output tile BLOCK_M x BLOCK_N; the K step is one tap's channels."""
    if interpreting():
        return [_cfg({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1)]
    return _keep([_cfg({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3), _cfg({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 4)])


def image_fwd_configs() -> list:
    """Image forward: output tile BLOCK_M x BLOCK_N; the K step is one kernel row of the packed image."""
    if interpreting():
        return [_cfg({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 1)]
    return _keep([_cfg({"BLOCK_M": 256, "BLOCK_N": 64}, 8, 3), _cfg({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3)])


def conv_wgrad_configs() -> list:
    """Compact-source weight gradient: output tile (one tap's channel block) x BLOCK_N, BLOCK_R
    output pixels per step."""
    if interpreting():
        return [_cfg({"BLOCK_N": 32, "BLOCK_R": 64}, 4, 1)]
    return _keep([_cfg({"BLOCK_N": 128, "BLOCK_R": 64}, 4, 3), _cfg({"BLOCK_N": 128, "BLOCK_R": 128}, 8, 3)])


def image_wgrad_configs() -> list:
    """Image weight gradient: output tile (BLOCK_KY kernel rows of the packed image) x BLOCK_N.
    The host sizes its splits for this tile (one wave of CTAs): a taller tile would leave SMs idle."""
    if interpreting():
        return [_cfg({"BLOCK_KY": 2, "BLOCK_N": 32, "BLOCK_R": 64}, 4, 1)]
    return _keep([_cfg({"BLOCK_KY": 2, "BLOCK_N": 64, "BLOCK_R": 128}, 4, 3)])


def conv_dgrad_configs() -> list:
    """Input gradient: output tile BLOCK_M input pixels x BLOCK_N input channels; the K step is
    one tap's block of BLOCK_K output channels."""
    if interpreting():
        return [_cfg({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 1)]
    return _keep([_cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, 4, 3),
                  _cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
                  _cfg({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 64}, 4, 3)])   # image gradients (C_in 3)


def prune_wide(configs, columns: int, block: str = "BLOCK_N"):
    """Drops tiles more than twice as wide as the channel count (pure waste); keeps at least one."""
    limit = max(16, 2 * pow2(columns))
    kept = [c for c in configs if c.kwargs[block] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs[block])]


def prune_by_c_out(configs, named_args, **kwargs):
    return prune_wide(configs, {**named_args, **kwargs}["C_OUT"])


def prune_by_c_in(configs, named_args, **kwargs):
    """Input-gradient tiles: no wider than twice C_in, and no narrower than it up to 64."""
    c_in = {**named_args, **kwargs}["C_IN"]
    kept = [c for c in prune_wide(configs, c_in) if c.kwargs["BLOCK_N"] >= min(64, pow2(c_in))]
    return kept or prune_wide(configs, c_in)


def prune_image_wgrad(configs, named_args, **kwargs):
    """Weight-gradient tiles no taller than the padded kernel (KYP kernel rows), no wider than
    twice C_out."""
    args = {**named_args, **kwargs}
    kept = [c for c in prune_wide(configs, args["C_OUT"]) if c.kwargs["BLOCK_KY"] <= args["KYP"]]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_KY"])]


class SharedMemoryError(RuntimeError):
    """No config of a Triton kernel fits the device: every kept config, down to one pipeline
    stage, ran out of shared memory (or another per-block resource)."""


def resource_errors() -> tuple:
    """The exceptions Triton raises when a compiled kernel needs more shared memory (or
    registers) than the device gives one block: ``OutOfResources`` (triton.runtime.errors in
    3.5-3.8; also looked up in triton.compiler.errors, where other versions keep it)."""
    import importlib
    found = []
    for module in ("triton.runtime.errors", "triton.compiler.errors", "triton.runtime.autotuner"):
        try:
            cls = getattr(importlib.import_module(module), "OutOfResources", None)
        except ImportError:  # pragma: no cover - depends on the Triton version
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


@functools.cache
def _triton_knobs():
    """Triton's ``knobs`` (3.4 and later), or None."""
    try:
        from triton import knobs
        knobs.runtime.launch_enter_hook, knobs.runtime.debug, knobs.compilation
    except (ImportError, AttributeError):
        return None
    return knobs


def compile_state() -> tuple:
    """The Triton settings a compiled kernel depends on besides its arguments (those the JIT's own
    cache key reads): a kernel kept for direct calls is only for the same settings."""
    knobs = _triton_knobs()
    if knobs is None:
        return ()
    runtime = knobs.runtime
    return (runtime.debug, getattr(knobs.compilation, "instrumentation_mode", None),
            getattr(runtime, "add_stages_inspection_hook", None))


@contextlib.contextmanager
def _unreported_launches(rec):
    """While a launch plan records (scott_kernels._replay): Triton's launch hook refuses the plan
    for a kernel launched on a GPU but not through the package's autotuner, whose own launches
    pause the recorder and report themselves; a replay would miss the other."""
    chain = _triton_knobs().runtime.launch_enter_hook

    def hook(metadata):
        if not rec.paused:
            rec.refuse("a kernel launched through Triton's JIT alone")

    chain.add(hook)
    try:
        yield
    finally:
        chain.remove(hook)


def _with_stages(config, stages: int):
    import copy
    out = copy.copy(config)
    out.num_stages = stages
    return out


def _tuner_class():
    """An ``Autotuner`` whose launch (1) under ``torch.use_deterministic_algorithms(True)``
    always uses the first config kept after pruning, never a timed choice (whatever the
    process's or the on-disk cache holds for the key), and (2) when a launch runs out of shared
    memory retries the same tile with fewer pipeline stages (down to 1), then the next smaller
    kept configs, and raises :class:`SharedMemoryError` naming the kernel and the device's limit
    if none fits. A launch whose key arguments, tensor dtypes, device and mode match an earlier
    one's reuses that launch's config directly (``forget_choices`` drops them all).
    ``last_config`` is the config of the latest launch."""
    import inspect

    import torch
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    from . import _replay
    triton_knobs = _triton_knobs()   # None for an older Triton: every launch through the JIT
    if triton_knobs is not None and hasattr(triton_knobs.runtime.launch_enter_hook, "add"):
        _replay.GUARDS.append(_unreported_launches)

    class Tuner(Autotuner):
        shared_estimate = None      # (config, named_args) -> bytes, to order the fallbacks
        last_config = None
        _tensor_type = torch.Tensor
        _plain_types = (int, float, bool, str, type(None))
        _knobs = triton_knobs
        _driver = property(lambda self: driver.active)   # the active one: a test may swap it

        def _tuning_key(self, args, kwargs) -> tuple:
            # the key Triton's Autotuner.run uses: the key arguments, then every tensor's dtype
            named = {k: v for k, v in {**dict(zip(self.arg_names, args)), **kwargs}.items() if k in self.arg_names}
            key = [named[k] for k in self.keys if k in named]
            key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
            return tuple(key)

        def _kept(self, kwargs) -> list:
            return list(self.prune_configs(kwargs)) if len(self.configs) > 1 else list(self.configs)

        def run(self, *args, **kwargs):
            rec = _replay.recording()
            if rec is None:
                return self._run(*args, **kwargs)
            with rec.pause():   # what the launch itself dispatches (the interpreter's copies) is its own
                ret = self._run(*args, **kwargs)
            self._record_launch(rec, args, kwargs)
            return ret

        def _record_launch(self, rec, args, kwargs) -> None:
            """Tells a plan's recorder (scott_kernels._replay) how to replay the launch just made:
            its compiled kernel called directly, or under the interpreter the launch itself."""
            if any(isinstance(v, self._tensor_type) for v in kwargs.values()):
                rec.refuse(f"{self.base_fn.__name__}: a tensor passed by keyword")
            elif not self._direct_launches:
                rec.launch(lambda *a: self.run(*a, **kwargs), args)
            else:
                deterministic = torch.are_deterministic_algorithms_enabled()
                direct = self._direct_key(deterministic, args, kwargs)
                compiled = self._compiled.get(direct) if direct is not None else None
                grid = kwargs["grid"]
                try:
                    grid = grid(compiled[2]) if compiled is not None and callable(grid) else grid
                except KeyError:
                    compiled = None
                if compiled is None:
                    rec.refuse(f"{self.base_fn.__name__}: no compiled kernel to call directly")
                    return

                def launch(*a):
                    self.best_config = self.last_config = compiled[3]
                    self._launch_compiled(compiled, a, grid)
                rec.launch(launch, args)

        def _run(self, *args, **kwargs):
            deterministic = torch.are_deterministic_algorithms_enabled()
            # a launch whose every argument matches an earlier one's calls that launch's compiled
            # kernel directly (see _direct_key)
            direct = self._direct_key(deterministic, args, kwargs)
            compiled = self._compiled.get(direct) if direct is not None else None
            if compiled is not None and self._launch_compiled(compiled, args, kwargs["grid"]):
                self.best_config = self.last_config = compiled[3]
                return compiled[0]
            # a launch like an earlier one (same key arguments, tensor dtypes, device, argument
            # layout and deterministic mode) reuses its config without Triton's key and pruning,
            # which cost about as much host time as the launch itself
            launches = self._launch_configs
            fast = self._launch_key(deterministic, args, kwargs)
            known = launches.get(fast)
            if known is not None:
                config, config_kwargs = known
                self.best_config = self.last_config = config
                try:
                    ret = self.fn.run(*args, **kwargs, **config_kwargs)
                except resource_errors():  # not expected (the key names the device): choose again
                    launches.pop(fast, None)
                else:
                    self._keep_compiled(direct, ret, args, kwargs, config)
                    return ret
            config, ret = self._choose_and_run(deterministic, args, kwargs)
            if config.pre_hook is None:
                # (no compiled kernel kept from here: a timed choice's config is read back from a
                # cache another thread may have written meanwhile; the next launch keeps its own)
                launches[fast] = (config, config.all_kwargs())
            return ret

        # The direct launch: the key holds every argument (a tensor's dtype and 16-byte alignment,
        # any other value and its type exactly: finer than the JIT's specialisation), the mode, the
        # current device and the knobs the JIT's own cache key reads, so only the tensors'
        # addresses differ from the launch whose compiled kernel it calls; that skips the JIT's
        # argument binding and cache look-up (about 10 us of host time per launch here). Pre-run
        # hooks, which must see every launch, turn it off.
        def _direct_key(self, deterministic: bool, args, kwargs) -> tuple | None:
            if not self._direct_launches or getattr(self.fn, "pre_run_hooks", None):   # the interpreter, old Triton
                return None
            tensor = self._tensor_type
            key = (deterministic, self._driver.get_current_device(), *compile_state(),
                   *[(v.dtype, v.data_ptr() & 15) if isinstance(v, tensor) else (type(v), v) for v in args],
                   *[(k, (v.dtype, v.data_ptr() & 15) if isinstance(v, tensor) else (type(v), v))
                     for k, v in kwargs.items() if k != "grid"])
            try:
                hash(key)
            except TypeError:
                return None
            return key

        def _keep_compiled(self, direct, kernel, args, kwargs, config) -> None:
            fn = self.fn
            if direct is None or config.pre_hook is not None or not hasattr(kernel, "packed_metadata"):
                return   # a config hook must see every launch
            given = {**kwargs, **config.all_kwargs()}
            tail = []
            for param in fn.params[len(args):]:
                if param.name in given:
                    tail.append(given[param.name])
                elif param.default is not inspect.Parameter.empty:
                    tail.append(param.default)
                else:
                    return
            meta = {k: v for k, v in given.items() if k not in ("grid", "warmup")}
            if len(self._compiled) >= _DIRECT_KERNELS:   # bounded: exact values key it (new batch sizes...)
                self._compiled.clear()
            self._compiled[direct] = (kernel, tuple(tail), meta, config)

        def _launch_compiled(self, compiled, args, grid) -> bool:
            kernel, tail, meta, _ = compiled
            try:
                grid = grid(meta) if callable(grid) else grid
            except KeyError:   # a grid that reads a launch argument: the JIT's path
                return False
            active = self._driver
            stream = active.get_current_stream(active.get_current_device())
            g0, g1, g2 = (*grid, 1, 1)[:3]
            enter, leave = self._knobs.runtime.launch_enter_hook, self._knobs.runtime.launch_exit_hook
            # Triton >= 3.5 keeps each hook as a chain, empty unless a profiler joins it: an empty
            # one has nothing to call, and the launch then needs no metadata for it
            if not getattr(enter, "calls", True):
                enter = None
            if not getattr(leave, "calls", True):
                leave = None
            metadata = kernel.launch_metadata(grid, stream, *args, *tail) if enter or leave else None
            kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave, *args,
                       *tail)
            return True

        def _launch_key(self, deterministic: bool, args, kwargs) -> tuple:
            # everything Triton's tuning key reads (the key arguments' values, the dtype of every
            # argument that has one), keyed by position and name, so equal keys here mean equal
            # Triton keys; and the first tensor's device, whose shared memory the pruning reads
            key = [deterministic, len(args), *kwargs]
            for i, name in self._key_positions:
                key.append(args[i] if i < len(args) else kwargs.get(name))
            tensor, plain, device = self._tensor_type, self._plain_types, None
            for value in (*args, *kwargs.values()):
                if isinstance(value, tensor):
                    key.append(value.dtype)
                    if device is None:
                        device = value.device
                else:
                    key.append(None if type(value) in plain else getattr(value, "dtype", None))
            key.append(device)
            return tuple(key)

        def forget_choices(self) -> None:
            """Drops every config chosen so far in this process (timed, fitted and reused) and the
            compiled kernels kept for direct launches."""
            self.cache.clear()
            self._launch_configs.clear()
            self._compiled.clear()
            _replay.forget_plans()   # they hold compiled kernels

        def _choose_and_run(self, deterministic, args, kwargs) -> tuple:
            """(the config launched, the launch's result) of a launch with no earlier like it."""
            if deterministic or len(self.configs) == 1:
                # a fixed config: the first kept (the only one, for a single-config kernel); one
                # that runs out of resources falls back, and ``run`` keeps the one that fitted
                self.nargs = dict(zip(self.arg_names, args))
                fixed = self._kept(kwargs)[0]
                try:
                    return fixed, self._launch(fixed, args, kwargs)
                except resource_errors() as e:
                    return self._fall_back(fixed, args, kwargs, e)
            self.best_config = None
            try:
                ret = super().run(*args, **kwargs)
            except resource_errors() as e:
                failed = self.best_config
                if failed is None:     # raised before a launch: not ours to handle
                    raise
                self.nargs = dict(zip(self.arg_names, args))
                working, ret = self._fall_back(failed, args, kwargs, e)
                # later launches for this key start from it (the key is built only here: it
                # costs host time on every launch otherwise)
                self.cache[self._tuning_key(args, kwargs)] = working
                return working, ret
            # the config Triton chose for this key, from its own cache: best_config may hold
            # another thread's by now
            config = self.cache.get(self._tuning_key(args, kwargs), self.best_config)
            self.last_config = config
            return config, ret

        def _fallbacks(self, config, kwargs) -> list:
            """After ``config``: itself with num_stages down to 1, then the other kept configs that
            need less shared memory (largest first; without an estimate, those after it in the
            list), each likewise."""
            kept = [c for c in self._kept(kwargs) if c is not config]
            if self.shared_estimate is not None:
                named = {**self.nargs, **kwargs}
                need = lambda c: self.shared_estimate(c, named)
                limit = need(config)
                kept = sorted((c for c in kept if not limit or need(c) < limit), key=need, reverse=True)
            elif config in self.configs:
                at = self.configs.index(config)
                kept = [c for c in kept if c not in self.configs or self.configs.index(c) > at]
            out = []
            for c in [config] + kept:
                stages = max(1, int(getattr(c, "num_stages", 1) or 1))
                out += ([] if c is config else [c]) + [_with_stages(c, k) for k in range(stages - 1, 0, -1)]
            return out

        def _fall_back(self, config, args, kwargs, error):
            """(the config that ran, its result) for the first fallback of ``config`` that fits."""
            last = error
            for c in self._fallbacks(config, kwargs):
                self.nargs = dict(zip(self.arg_names, args))
                try:
                    return c, self._launch(c, args, kwargs)
                except resource_errors() as e:
                    last = e
            self.nargs = None
            name = getattr(self.base_fn, "__name__", "kernel")
            raise SharedMemoryError(
                f"{name}: no config fits this GPU's shared memory ({shared_memory_limit()} bytes per block); "
                f"tried {config} with num_stages down to 1 and every smaller kept config; last error: {last}") from last

        def _launch(self, config, args, kwargs):
            self.best_config = config
            self.last_config = config
            if config.pre_hook is not None:
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            ret = self.fn.run(*args, **kwargs, **config.all_kwargs())
            self.nargs = None
            return ret

    return Tuner


# compiled kernels kept per autotuned kernel for direct launches (see Tuner._direct_key)
_DIRECT_KERNELS = 64


@functools.lru_cache(maxsize=None)
def _tuner():
    return _tuner_class()


def autotune(configs, key, prune=None, shared=gemm_shared_bytes):
    """``triton.autotune`` for every Triton kernel of the package: results cached on disk;
    configs whose operand tiles would not fit the device's shared memory are dropped before
    compiling (``shared``: the estimate, None for kernels that stage nothing in shared memory),
    then ``prune`` applies. The returned autotuner launches a fixed config (the first kept)
    under ``torch.use_deterministic_algorithms(True)`` and falls back to fewer stages and
    smaller configs when a launch runs out of shared memory (see ``_tuner_class``)."""
    import triton
    rules = [r for r in (prune, shared_fits(shared) if shared is not None else None) if r is not None]
    extra = {"prune_configs_by": {"early_config_prune": prune_hook(*rules)}} if rules else {}

    def decorator(fn):
        tuner = triton.autotune(configs=configs, key=key, cache_results=True, **extra)(fn)
        # the subclass adds only behaviour: same constructor and state whatever Triton's version
        tuner.__class__ = _tuner()
        tuner.shared_estimate = shared
        # the reused launches' configs, and where the key arguments sit among the positional ones
        tuner._launch_configs = {}
        # the compiled kernels of earlier launches, called directly by a launch like them
        tuner._compiled = {}
        tuner._direct_launches = tuner._knobs is not None and not interpreting()
        position = {name: i for i, name in enumerate(tuner.arg_names)}
        tuner._key_positions = [(position[k], k) for k in tuner.keys if k in position]
        return tuner
    return decorator


CONV_KEY = ["C_IN", "C_OUT", "IN_SIDE", "KSIZE", "ROWS_BUCKET"]
IMAGE_KEY = ["C_OUT", "OUT_SIDE", "KSIZE", "KYP", "CP", "KROW", "ROWS_BUCKET"]

# Shared memory of each GEMM's pipelined operand tiles (m x k and k x n per stage), to prune
# configs that cannot fit before they are compiled. The weight gradients reduce over their
# BLOCK_R output pixels; their output tile is TAPS taps' channel block (or BLOCK_KY kernel rows
# of the packed image).
FWD_SHARED = functools.partial(gemm_shared_bytes, k="BLOCK_K")
IMAGE_FWD_SHARED = functools.partial(gemm_shared_bytes, k="KROW")
WGRAD_SHARED = functools.partial(gemm_shared_bytes, m=("TAPS", "BLOCK_K"), k="BLOCK_R")
IMAGE_WGRAD_SHARED = functools.partial(gemm_shared_bytes, m=("BLOCK_KY", "KROW"), k="BLOCK_R")
