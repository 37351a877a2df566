"""Every op body runs under its inputs' device, never just the current one.

A native kernel launches into the current device's stream and a Triton kernel on the current
device: with tensors on ``cuda:1`` while ``cuda:0`` is current, either is wrong (CUDA rejects the
launch, or with peer access a silent race). ``on_input_device`` wraps an op body so that it runs
inside ``torch.cuda.device(t.device)`` for its first tensor argument ``t`` (the pattern of
FlashAttention's entry points); CPU tensors need no guard.
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["custom_op", "on_input_device", "device_guard", "GUARDED_OPS"]

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


def custom_op(name: str, *, mutates_args=()):
    """``torch.library.custom_op`` whose body runs under its inputs' device: how every op of this
    package is registered."""

    def register(fn):
        GUARDED_OPS.add(name)
        return torch.library.custom_op(name, mutates_args=mutates_args)(on_input_device(fn))

    return register
