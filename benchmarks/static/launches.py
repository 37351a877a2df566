"""Everything one forward+backward launches, and the host time it takes to issue it.

Torch ops: the real code path runs on CPU tensors under ``torch.profiler`` (shapes and dtypes
recorded); each aten op that launches a kernel on a GPU is one launch (see :func:`torch_launches`).
Triton launches are counted by the stand-in driver (``codegen.Recorder``: the launches the code
path makes, not the autotuner's trials). Native launches of the cuda backend: its ``_C`` compute
calls are replaced by no-ops that count them (:func:`stub_native`), and the launches each makes
come from static_cost.CUDA_LAUNCHES.

Host time: :func:`host_time` times the public API's forward (and backward) on tiny CPU tensors
while every GPU launch is a no-op, so what it measures is the host's own work: Python, the
torch dispatcher, the custom-op and autograd layers, the Triton JIT's argument binding, cache and
autotuner look-ups (not the driver's launch call, which the stand-in does not make).

Development tooling next to static_cost.py; not part of the installed package.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Any, Callable

# aten ops that launch no kernel on a GPU: views, allocations, metadata
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "as_strided", "view", "_unsafe_view",
    "_reshape_alias", "view_as", "t", "transpose", "permute", "select", "slice", "unsqueeze", "squeeze", "expand",
    "expand_as", "detach", "detach_", "alias", "lift_fresh", "unbind", "split", "split_with_sizes", "chunk",
    "narrow", "resize_", "set_", "unflatten", "movedim", "diagonal", "resolve_conj", "resolve_neg", "_conj",
    "result_type", "is_nonzero", "size", "stride", "numel", "dim", "record_stream", "_has_compatible_shallow_copy_type",
    "lift", "_to_dense", "is_same_size", "requires_grad_", "retain_grad",
}
# aten ops whose kernels are those of the ops they call (or none, when they return their input)
WRAPPERS = {
    "to", "_to_copy", "contiguous", "clone", "reshape", "flatten", "zeros", "zeros_like", "new_zeros", "ones",
    "ones_like", "new_ones", "full", "full_like", "new_full", "type_as", "copy", "_copy_from", "_copy_from_and_resize",
    "expand_copy", "linear", "matmul",
}
# ops that read a value back to the host: a synchronisation on a GPU
SYNC = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero", "allclose"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "any", "all", "norm"}

_ITEMSIZE = (("BFloat16", 2), ("Half", 2), ("double", 8), ("long", 8), ("int64", 8), ("short", 2), ("unsigned char", 1),
             ("signed char", 1), ("bool", 1), ("float", 4), ("int", 4))


def itemsize(dtype: str) -> int:
    for key, size in _ITEMSIZE:
        if key in (dtype or ""):
            return size
    return 4


def _tensors(event) -> list[tuple[list[int], int]]:
    shapes = list(getattr(event, "input_shapes", None) or [])
    dtypes = list(getattr(event, "input_dtypes", None) or [])
    out = []
    for i, shape in enumerate(shapes):
        if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) for d in shape):
            out.append((list(shape), itemsize(dtypes[i] if i < len(dtypes) else "")))
        elif isinstance(shape, (list, tuple)) and not shape and i < len(dtypes) and dtypes[i] and dtypes[i] != "Scalar":
            out.append(([], itemsize(dtypes[i])))  # a 0-d tensor
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def op_bytes(op: str, event) -> float:
    """Compulsory HBM bytes of one torch op from its recorded inputs: copies read the source and
    write the destination, fills write their tensor, reductions read their input, index_select
    reads its index and the rows it selects and writes them; anything else reads each input once
    and writes an output the size of its largest input (an in-place op writes its first)."""
    ts = _tensors(event)
    sizes = [_numel(s) * b for s, b in ts]
    if not sizes:
        return 0.0
    if op in ("copy_",):
        return float(sum(sizes[:2]))
    if op in ("fill_", "zero_"):
        return float(sizes[0])
    if op in REDUCTIONS:
        return float(sizes[0])
    if op == "index_select" and len(ts) >= 2:
        shape, b = ts[0]
        concrete = list(getattr(event, "concrete_inputs", None) or [])
        dim = concrete[1] if len(concrete) > 1 and isinstance(concrete[1], int) else 0
        rows = _numel(ts[1][0])
        out = (_numel(shape) // max(1, shape[dim]) if shape else 1) * rows * b
        return float(2 * out + sizes[1])
    if op.endswith("_"):
        return float(sum(sizes) + sizes[0])
    return float(sum(sizes) + max(sizes))


def torch_launches(events) -> list[dict]:
    """The GPU kernel launches among the profiled CPU events: each outermost aten op that is
    neither a view/allocation (:data:`NO_KERNEL`) nor a wrapper of other ops (:data:`WRAPPERS`:
    its children are looked at instead) counts as one launch. One launch per op is a floor: a
    few torch ops run several kernels on a GPU (sort, for one)."""
    out = []

    def visit(e):
        name = e.name
        if not name.startswith("aten::"):
            for c in e.cpu_children:
                visit(c)
            return
        op = name[len("aten::"):]
        if op in NO_KERNEL:
            return
        if op in WRAPPERS:
            for c in e.cpu_children:
                visit(c)
            return
        shapes = [s for s, _ in _tensors(e)]
        out.append({"op": op, "bytes": op_bytes(op, e), "shapes": shapes, "sync": op in SYNC})

    for e in events:
        if e.cpu_parent is None:
            visit(e)
    return out


def profiled(phases: dict[str, list[dict]]) -> Callable[[str], Any]:
    """A ``phase_context`` for codegen.run_workload: profiles each phase and appends its torch
    launches to ``phases[phase]``."""

    @contextlib.contextmanager
    def around(phase: str):
        from torch.profiler import ProfilerActivity, profile
        with gpu_paths(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            yield
        phases.setdefault(phase, []).extend(torch_launches(prof.events()))

    return around


@contextlib.contextmanager
def gpu_paths():
    """Skips the host-side work the public API does only for CPU tensors (reading a bool mask's
    row counts back to raise a readable error; on a GPU that check is a device assertion)."""
    from scott_kernels import functional
    saved = functional._check_row_counts
    functional._check_row_counts = lambda keep, num_visible: None
    try:
        yield
    finally:
        functional._check_row_counts = saved


# ------------------------------------------------------------------------------------------------
# The cuda backend's Python path on CPU tensors, its native kernels replaced by counters
# ------------------------------------------------------------------------------------------------
NATIVE_COMPUTE = ("conv_relu", "conv_relu_wgrad", "conv_relu_dgrad", "max_blur_pool", "max_blur_pool_backward",
                  "visible_tables")


class _NativeStub:
    """Stands for scott_kernels._C: the compute entry points record their call and return (the
    visible tables, which the torch ops after them index with, are built by the C++ twin); the rest
    (geometry structs, path queries) is the real module's."""

    def __init__(self, real, sms: int):
        self._real = real
        self.calls: list[tuple[str, str]] = []
        self.phase = ""
        self.sms = sms

    def __getattr__(self, name):
        if name == "visible_tables":  # the later ops index through these tables: built by the C++ twin
            def tables(*args):
                self.calls.append((self.phase, name))
                return self._real.visible_tables(*args[:-2], False, 0)
            return tables
        if name in NATIVE_COMPUTE:
            return lambda *args, **kwargs: self.calls.append((self.phase, name))
        if name == "image_wgrad_clusters":  # sm_90 code on a GPU that launches clusters
            return lambda *args, **kwargs: True
        return getattr(self._real, name)


@contextlib.contextmanager
def stub_native(sms: int = 132):
    """Within this context ``backend="cuda"`` runs its Python path on CPU tensors of any dtype as
    it would on an sm_90 GPU of ``sms`` SMs (implicit-GEMM paths, weight-gradient splits for
    that SM count), with its native kernels replaced by call counters. Yields the stub."""
    import codegen
    import scott_kernels  # noqa: F401
    from scott_kernels import cuda_backend as cb

    stub = _NativeStub(cb._C, sms)

    def splits(g, rows, device, dtype, src_dtype):
        if g.src_image:  # one partial per cluster of two persistent blocks
            return max(1, min(-(-rows // 256), sms // 2, 65535))
        blocks = g.ksize * g.ksize * -(-g.c_in // 64) * -(-g.c_out // 128)
        return max(1, min(-(-rows // 1024), -(-4 * sms // blocks), 65535))

    saved = {k: getattr(cb, k) for k in ("_C", "_runs_on", "_implicit", "_implicit_wgrad_splits")}
    cb._C = stub
    cb._runs_on = lambda name, t: None
    cb._implicit = lambda *args, **kwargs: True
    cb._implicit_wgrad_splits = splits
    undo = codegen._replace_everywhere(cb.cuda_supports, lambda device: True)
    try:
        yield stub
    finally:
        for k, v in saved.items():
            setattr(cb, k, v)
        for holder, key, value in reversed(undo):
            if isinstance(holder, dict):
                holder[key] = value
            else:
                setattr(holder, key, value)


# ------------------------------------------------------------------------------------------------
# Host dispatch time
# ------------------------------------------------------------------------------------------------
HOST_GEOMETRY = {"image": 64, "visible": 6, "hidden": 64, "dim": 64, "batch": 1}


def host_time(backend: str, dtype_name: str = "bfloat16", geometry: dict | None = None, repeats: int = 20,
              warmup: int = 5, blocks: int = 10, pause: float = 0.3, plans: bool = True) -> dict[str, float]:
    """Host CPU seconds of one masked forward (weights requiring grad, as in training) and of one
    masked forward+backward through ``sparse_conv_tokenize(..., backend=backend,
    num_visible=...)`` on tiny tensors (:data:`HOST_GEOMETRY`: the headline's patch and kernel
    sizes, one 64x64 image, 6 of 16 patches visible, 64 channels), so that what is timed is the
    dispatch, not the CPU's arithmetic; the caller has made every GPU launch a no-op
    (codegen.fake_gpu with the recorder ``lean``, or :func:`stub_native`).

    Each is timed in ``blocks`` blocks of ``repeats`` calls, ``pause`` seconds apart (both in each
    block). ``fwd`` / ``fwd_bwd``: the lowest block median of the process's CPU time (timeit's
    practice: on this shared machine other work slows every call for seconds at a time, by up to
    2x, so the blocks are spread over a few seconds and the least disturbed one is reported);
    ``*_median``: the median over every call; ``*_wall``: the median wall time; ``*_min``: the
    fastest wall time.

    An eager triton call replays the launch plan recorded for its signature (``scott_kernels._replay``;
    the warm-up records it); ``plans=False`` times the op bodies' own Python instead."""
    import torch
    import codegen
    from scott_kernels import _replay, sparse_conv_tokenize

    h = {**codegen.HEADLINE, **HOST_GEOMETRY, **(geometry or {})}
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(1)
    batch = h["batch"]
    x = torch.randn(batch, h["in_chans"], h["image"], h["image"], generator=g).to(dtype)
    weights = [torch.randn(h["hidden"], h["in_chans"], h["kernel"], h["kernel"], generator=g).to(dtype),
               torch.randn(h["dim"], h["hidden"], h["kernel"], h["kernel"], generator=g).to(dtype)]
    weights = [w.requires_grad_(True) for w in weights]
    n = (h["image"] // h["patch"]) ** 2
    keep = torch.zeros(batch, n, dtype=torch.bool)
    keep.scatter_(1, torch.rand(batch, n, generator=g).argsort(1)[:, :h["visible"]], True)

    def forward():
        return sparse_conv_tokenize(x, weights, keep, patch_size=h["patch"], backend=backend,
                                    num_visible=h["visible"])

    # one intra-op thread: the tensors are tiny, and idle pool threads spinning after an op would
    # count as the process's CPU time
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with gpu_paths(), contextlib.ExitStack() as undo:
        undo.callback(torch.set_num_threads, threads)
        undo.callback(setattr, _replay, "enabled", _replay.enabled)
        _replay.enabled = plans
        tokens = forward()
        grad = torch.ones_like(tokens)

        def train():
            torch.autograd.grad(forward(), weights, grad_outputs=grad)

        out = {}
        # as timeit does: no garbage collection inside the timed calls (a full collection of a
        # large process, such as the static report's own, would land in a few of them)
        if gc.isenabled():
            gc.disable()
            undo.callback(gc.enable)
        calls = (("fwd", forward), ("fwd_bwd", train))
        for _, fn in calls:
            for _ in range(warmup):
                fn()
        gc.collect()
        cpu: dict[str, list[list[float]]] = {name: [] for name, _ in calls}
        wall: dict[str, list[float]] = {name: [] for name, _ in calls}
        for block in range(max(1, blocks)):
            if block:
                time.sleep(pause)
            for name, fn in calls:
                cpu[name].append([])
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    cpu[name][-1].append(time.process_time() - c0)
                    wall[name].append(time.perf_counter() - t0)
        for name, _ in calls:
            # the process's CPU time: what the dispatch costs a core of its own; on a shared
            # machine the wall time adds the waits for a core
            out[name] = min(statistics.median(b) for b in cpu[name])
            out[name + "_median"] = statistics.median(t for b in cpu[name] for t in b)
            out[name + "_wall"] = statistics.median(wall[name])
            out[name + "_min"] = min(wall[name])
    return out
