"""Launch plans: an eager call's op body recorded once per call signature, then replayed.

The triton tokenizer's op bodies are Python that checks the inputs, works out each stage's
geometry, allocates and launches: most of a training step's host time, more than the GPU work
of a small batch. For one call signature (every input tensor's shape, strides, dtype, device and
16-byte alignment, the other arguments, and the global state a body reads) that Python does the
same thing every time; only the tensors' addresses differ. A plan keeps what the body did, in
order: each aten op it dispatched (allocations, views, fills, casts, sums) and each kernel launch
(the compiled kernel, its grid and its arguments), with every tensor named by where it came from.
Replaying it runs the ops and launches with the new call's tensors, in eager mode: its own
allocations, the current stream.

A plan is kept only where that is exact; recording refuses (and the call runs its body, as
always) when the body
  - used a tensor that is neither an input, nor made by an op it dispatched, nor a buffer the
    package keeps on purpose (``persistent``); or was given one tensor as two inputs;
  - read tensor data on the host, or ran an op whose output shape depends on tensor data;
  - made a tensor off the call's device (a copy to read on the host);
  - launched a kernel the package's autotuner could not name a compiled kernel for (a first,
    compiling launch; a config with a pre-hook), or one not through that autotuner (on a GPU,
    Triton's launch hook tells).
Recording runs under a ``TorchDispatchMode`` (to see the ops) and the autotuner reports each
launch to it (``recording``); ops run inside another op or a launch are not recorded, their op or
launch is.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Plans", "recording", "persistent", "tensor_signature", "global_state", "forget_plans", "GUARDS"]

_state = threading.local()

# SCOTT_LAUNCH_PLANS=0 (read at import) turns plans off: every eager call runs its op bodies, as
# under a mode; ``enabled`` may also be set at run time
enabled = os.environ.get("SCOTT_LAUNCH_PLANS", "1").strip().lower() not in {"0", "false", "no", "off"}

# ops whose result a recording cannot stand for: a host read of tensor data, a data-dependent shape
_REFUSED_TAGS = tuple(getattr(torch.Tag, name) for name in ("dynamic_output_shape", "data_dependent_output")
                      if hasattr(torch.Tag, name))
_aten = torch.ops.aten
_HOST_READS = (_aten._local_scalar_dense.default, _aten.item.default)
# ops whose output is its input under another name: a replay passes the input on
_ALIASES = (_aten.detach.default, _aten.alias.default)
# ops a replay calls through torch's generated bindings (same arguments and keywords), which
# parse them in about half the time of the op's own call
_FAST = {_aten.empty.memory_format: torch.empty, _aten.empty_like.default: torch.empty_like,
         _aten.empty_strided.default: torch.empty_strided, _aten.zeros.default: torch.zeros,
         _aten.new_empty.default: torch.Tensor.new_empty, _aten.new_zeros.default: torch.Tensor.new_zeros,
         _aten.view.default: torch.Tensor.view, _aten.detach.default: torch.Tensor.detach}

# context managers entered (with the recorder) around each recording: a kernel library adds one
# that refuses launches its recorder would not hear of
GUARDS: list = []

# plan caches alive, for forget_plans
_ALL_PLANS: "weakref.WeakSet[Plans]" = weakref.WeakSet()


def recording() -> "_Recorder | None":
    """The recorder a kernel launch should report to, or None (none running, or paused inside an
    op or a launch)."""
    rec = getattr(_state, "recorder", None)
    return rec if rec is not None and not rec.paused else None


def persistent(t: torch.Tensor) -> torch.Tensor:
    """Marks ``t`` (a buffer the package keeps between calls on purpose, e.g. self-resetting
    counters) as one a plan may hold and pass to every replay; returns it."""
    rec = recording()
    if rec is not None:
        rec.constant(t)
    return t


def tensor_signature(t: torch.Tensor | None):
    """What a body may read of a tensor without reading its data."""
    if t is None:
        return None
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


def global_state(device: torch.device) -> tuple:
    """The process state a body or a replayed op reads besides its arguments."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.is_autocast_enabled(device.type), torch.get_default_dtype(), torch.is_inference_mode_enabled(),
            stream)


def forget_plans() -> None:
    """Drops every recorded plan (the autotuner's choices they hold were dropped)."""
    for plans in list(_ALL_PLANS):
        plans.clear()


class _Recorder(TorchDispatchMode):
    def __init__(self, inputs):
        super().__init__()
        given = [t for t in inputs if t is not None]
        self.device = given[0].device if given else None
        self.names = {id(t): i for i, t in enumerate(inputs) if t is not None}
        # An op's output is watched, not held: a factory op whose output Python holds elsewhere
        # returns a detached alias of it, an op a replay would not make. A dead tensor's id leaves
        # ``names`` as it dies, before the id can be reused.
        self.watched: list = []
        self.count = len(inputs)
        self.steps: list = []         # (an op or a launch, its arguments' template, tensor fills, kwargs, outputs)
        self.constants: list = []     # (name, persistent tensor)
        self.refused: str | None = None
        self.paused = False
        if len(self.names) < len(given):   # one tensor passed twice: a replay could not tell which use is which
            self.refuse("a tensor passed as two inputs")

    def refuse(self, why: str) -> None:
        if self.refused is None:
            self.refused = why

    def constant(self, t: torch.Tensor) -> None:
        if id(t) not in self.names:
            self.constants.append((self._new(t), t))

    def _new(self, t) -> int:
        key, names = id(t), self.names
        self.watched.append(weakref.ref(t, lambda _, key=key: names.pop(key, None)))
        names[key] = self.count
        self.count += 1
        return self.count - 1

    def _template(self, values) -> tuple[list, list]:
        """(values with tensors blanked, [(position, name)]); refuses a tensor it cannot name."""
        out, fills = list(values), []
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor):
                name = self.names.get(id(v))
                if name is None:
                    self.refuse(f"a tensor from outside the call ({tuple(v.shape)}, {v.dtype})")
                    return out, fills
                fills.append((i, name))
                out[i] = None
            elif isinstance(v, (list, tuple)) and any(isinstance(u, torch.Tensor) for u in v):
                self.refuse("a tensor inside a list argument")
        return out, fills

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with self.pause():
            out = func(*args, **kwargs)
        if self.refused is not None:
            return out
        if func in _HOST_READS or any(tag in func.tags for tag in _REFUSED_TAGS):
            self.refuse(f"{func} reads tensor data on the host")
            return out
        template, fills = self._template(args)
        if any(isinstance(u, torch.Tensor) for v in kwargs.values() for u in (v if isinstance(v, (list, tuple)) else (v,))):
            self.refuse(f"{func}: a tensor keyword argument")
        if out is None:   # (a device assertion)
            outs = None
        elif isinstance(out, torch.Tensor):
            outs = self._new(out)
        elif isinstance(out, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in out):
            outs = tuple(self._new(t) for t in out)
        else:
            self.refuse(f"{func} returns {type(out).__name__}")
            return out
        made = (out,) if isinstance(out, torch.Tensor) else out or ()
        if any(t.device != self.device for t in made):   # a copy off the call's device: read on the host?
            self.refuse(f"{func} makes a tensor off the call's device")
        self.steps.append((func, tuple(template), tuple(fills), kwargs, outs))
        return out

    def launch(self, run, args) -> None:
        """A launch to replay as ``run(*args)`` (tensors in ``args`` named as the op arguments are)."""
        template, fills = self._template(args)
        self.steps.append((run, tuple(template), tuple(fills), {}, None))

    def plan(self, outputs: list) -> "_Plan":
        """The plan of what was recorded, returning the tensors named ``outputs`` (None: None)."""
        alias: dict = {}
        # an alias only launches read (no op, no caller) is replaced by its input: the same memory
        kept = set(outputs) | {name for fn, _, fills, _, _ in self.steps if isinstance(fn, torch._ops.OpOverload)
                               for _, name in fills}
        steps = []
        for fn, template, fills, kwargs, outs in self.steps:
            fills = tuple((i, alias.get(name, name)) for i, name in fills)
            if fn in _ALIASES and outs not in kept:
                alias[outs] = fills[0][1]
                continue
            steps.append((_FAST.get(fn, getattr(fn, "_op", fn)), template, fills, kwargs, outs))
        blank = [None] * self.count
        for name, t in self.constants:
            blank[name] = t
        return _Plan(tuple(steps), blank, tuple(None if n is None else alias.get(n, n) for n in outputs))

    @contextlib.contextmanager
    def pause(self):
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused


class _Plan:
    __slots__ = ("steps", "blank", "outputs")

    def __init__(self, steps, blank, outputs):
        self.steps, self.blank, self.outputs = steps, blank, outputs

    def replay(self, inputs):
        env = self.blank.copy()
        env[:len(inputs)] = inputs
        for fn, template, fills, kwargs, outs in self.steps:
            args = list(template)
            for i, name in fills:
                args[i] = env[name]
            out = fn(*args, **kwargs)
            if type(outs) is int:
                env[outs] = out
            elif outs is not None:
                for name, t in zip(outs, out):
                    env[name] = t
        return [None if name is None else env[name] for name in self.outputs]


# a signature whose recording was refused this many times runs its body from then on
_TRIES = 3
# plans kept per body: bounded, since exact shapes key them (new batch sizes...)
_MAX_PLANS = 64


class Plans:
    """The recorded plans of one op body, by call signature. ``run(key, inputs, body, *args)``
    replays the plan for ``key`` on ``inputs`` (every tensor ``body(*args)`` may read, None where
    absent, in a fixed order), or calls the body, recording it until a plan is kept or refused
    ``_TRIES`` times. ``key`` must hold everything the body's Python reads: the tensors'
    ``tensor_signature``, the other arguments and ``global_state``."""

    def __init__(self):
        self._plans: dict = {}
        self._tries: dict = {}
        self.refusals: list[str] = []   # the latest reasons, for tests and debugging
        _ALL_PLANS.add(self)

    def clear(self) -> None:
        self._plans.clear()
        self._tries.clear()

    def planned(self, key) -> bool:
        """Whether ``key`` has a plan (so the outputs of a call with it are what the plan makes)."""
        return self._plans.get(key) is not None

    def __len__(self) -> int:
        return sum(p is not None for p in self._plans.values())

    def run(self, key, inputs, body, *args):
        # off, or inside another body's recording (which records this body's ops and launches)
        if not enabled or getattr(_state, "recorder", None) is not None:
            return body(*args)
        plan = self._plans.get(key, _UNSEEN)
        if plan is None:                     # refused too often: the body, unrecorded
            return body(*args)
        if plan is not _UNSEEN:
            return plan.replay(inputs)
        return self._record(key, inputs, body, args)

    def _record(self, key, inputs, body, args):
        rec = _Recorder(inputs)
        _state.recorder = rec
        try:
            with rec, contextlib.ExitStack() as guards:
                for guard in GUARDS:
                    guards.enter_context(guard(rec))
                out = body(*args)
        finally:
            _state.recorder = None
        outputs = []
        for t in out:
            name = None if t is None else rec.names.get(id(t))
            if t is not None and name is None:
                rec.refuse("an output from outside the call")
            outputs.append(name)
        if len(self._plans) >= _MAX_PLANS:
            self.clear()
        if rec.refused is None:
            self._plans[key] = rec.plan(outputs)
        else:
            self.refusals = (self.refusals + [rec.refused])[-8:]
            tries = self._tries.get(key, 0) + 1
            self._tries[key] = tries
            if tries >= _TRIES:
                self._plans[key] = None
        return out


_UNSEEN = object()
