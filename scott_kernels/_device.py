"""Every op body runs under its inputs' device, never just the current one.

A native kernel launches into the current device's stream and a Triton kernel on the current
device: with tensors on ``cuda:1`` while ``cuda:0`` is current, either is wrong (CUDA rejects the
launch, or with peer access a silent race). ``on_input_device`` wraps an op body so that it runs
inside ``torch.cuda.device(t.device)`` for its first tensor argument ``t`` (the pattern of
FlashAttention's entry points); CPU tensors need no guard.

``dispatch_free`` says when an eager call may run an op's guarded body itself: where the
dispatcher would do nothing else with the call.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["custom_op", "on_input_device", "device_guard", "dispatch_free", "GUARDED_OPS"]

# qualified names of the ops registered through ``custom_op`` below
GUARDED_OPS: set[str] = set()


def device_guard(device: torch.device):
    """The context an op body runs in for tensors on ``device``."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def on_input_device(fn):
    """Decorator for an op body: runs ``fn`` under the device of its first tensor argument.
    ``inspect.signature`` follows ``__wrapped__``, so torch.library sees ``fn``'s own schema."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        first = _first_tensor(args, kwargs)
        if first is None:
            return fn(*args, **kwargs)
        with device_guard(first.device):
            return fn(*args, **kwargs)

    return guarded


# what the dispatcher treats as a plain tensor (a parameter disables its __torch_function__)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def dispatch_free(*tensors: torch.Tensor | None) -> bool:
    """True where calling an op with these tensors reaches its body and nothing else: eager (not
    traced by torch.compile or torch.jit.trace), grad mode off (an op without a derivative makes
    its outputs refuse a backward; a body's would silently have none), no dispatch mode (fake
    tensors, FlopCounterMode...), no torch-function mode, no functorch transform, the profiler off
    (it records the op's name), and plain strided tensors or parameters off the meta device only
    (no subclass). There a caller may run the op's guarded body directly: a
    ``torch.library.custom_op`` call costs tens of microseconds of host time in its Python layers
    (pytorch/pytorch#176592, #177109), and an eager step of a few short kernels is host-bound.
    Anywhere else the op is called, so modes, subclasses, transforms and traces all see it. (Not
    seen by such a call: a kernel registered over the op's own with torch.library.register_kernel,
    and record-function observers outside the profiler.)"""
    C = torch._C
    if (C.is_grad_enabled() or torch.compiler.is_compiling() or C._len_torch_dispatch_stack()
            or C._is_torch_function_mode_enabled() or C._are_functorch_transforms_active()
            or C._autograd._profiler_enabled() or C._get_tracing_state() is not None):
        return False
    plain, strided = _PLAIN_TENSORS, torch.strided
    return all(t is None or (type(t) in plain and t.layout is strided and not t.is_meta) for t in tensors)


def custom_op(name: str, *, mutates_args=()):
    """``torch.library.custom_op`` whose body runs under its inputs' device: how every op of this
    package is registered."""

    def register(fn):
        GUARDED_OPS.add(name)
        return torch.library.custom_op(name, mutates_args=mutates_args)(on_input_device(fn))

    return register
