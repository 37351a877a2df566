"""Functional entry point: validation, backend choice, dispatch."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .ops import native_supports
from .reference import reference_tokenize
from .torch_backend import torch_tokenize

__all__ = ["sparse_conv_tokenize", "available_backends", "select_backend", "BACKENDS", "check_inputs"]


# name -> (implementation, which devices it runs on)
BACKENDS: dict[str, tuple[Callable, Callable[[torch.device], bool]]] = {
    "reference": (reference_tokenize, lambda device: True),
    "torch": (torch_tokenize, native_supports),
}
# "auto" tries these in order: fastest first.
_AUTO_ORDER = ("torch", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that run on ``device``, fastest first."""
    device = torch.device(device)
    return [name for name in _AUTO_ORDER if BACKENDS[name][1](device)]


def select_backend(backend: str, device: torch.device | str) -> str:
    """Resolves ``backend`` ("auto" or a name) for ``device``; raises if it cannot run there."""
    device = torch.device(device)
    if backend == "auto":
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if not BACKENDS[backend][1](device):
        raise RuntimeError(f"backend {backend!r} does not run on {device} in this build; "
                           f"available there: {available_backends(device)} (see scott_kernels.build_info())")
    return backend


def num_stages_for(patch_size: int) -> int:
    """Stages that map a patch to one token: each stage divides the side by 4 (conv + pool)."""
    stages, side = 0, patch_size
    while side > 1 and side % 4 == 0:
        side //= 4
        stages += 1
    if side != 1:
        raise ValueError(f"patch_size must be a power of 4 (4, 16, 64, ...): each stage halves twice "
                         f"(stride-2 conv, stride-2 pool) and a patch must end as one token; got {patch_size}")
    return stages


def check_inputs(x, weights: Sequence[torch.Tensor], keep, patch_size: int) -> None:
    """Raises TypeError/ValueError naming the argument and what was expected."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"images must be float16, bfloat16, float32 or float64, got {x.dtype}")
    B, C, H, W = x.shape
    if B == 0:
        raise ValueError("images: empty batch (B = 0)")
    if H == 0 or W == 0 or H % patch_size or W % patch_size:
        raise ValueError(f"images: height and width must be positive multiples of patch_size={patch_size}, "
                         f"got {H}x{W}")
    stages = num_stages_for(patch_size)
    if len(weights) != stages:
        raise ValueError(f"weights: patch_size={patch_size} needs {stages} conv stages, got {len(weights)}")
    autocast = torch.is_autocast_enabled(x.device.type) if hasattr(torch, "is_autocast_enabled") else False
    in_channels = C
    for i, w in enumerate(weights):
        name = f"weights[{i}]"
        if not isinstance(w, torch.Tensor) or w.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (C_out, C_in, k, k) tensor")
        k = w.shape[-1]
        if w.shape[-2] != k or k % 2 == 0:
            raise ValueError(f"{name}: kernel must be square with an odd size, got {tuple(w.shape[-2:])}")
        if w.shape[1] != in_channels:
            what = "images have" if i == 0 else f"weights[{i - 1}] produces"
            raise ValueError(f"{name} expects {w.shape[1]} input channels but {what} {in_channels}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but images are on {x.device}")
        if w.dtype != x.dtype and not autocast:
            raise TypeError(f"{name} has dtype {w.dtype} but images have {x.dtype} "
                            "(cast the module, or run under torch.autocast)")
        in_channels = w.shape[0]
    if keep is not None:
        if not isinstance(keep, torch.Tensor):
            raise TypeError(f"keep must be a torch.Tensor or None, got {type(keep).__name__}")
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor (True = visible), got {keep.dtype}")
        n = (H // patch_size) * (W // patch_size)
        if tuple(keep.shape) != (B, n):
            raise ValueError(f"keep must have shape (B, N) = ({B}, {n}) for {H}x{W} images and "
                             f"patch_size={patch_size}, got {tuple(keep.shape)}")
        if keep.device != x.device:
            raise ValueError(f"keep is on {keep.device} but images are on {x.device}")


def sparse_conv_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None = None,
                         *, patch_size: int = 16, backend: str = "auto") -> torch.Tensor:
    """SCOTT tokenizer: (B, C, H, W) images -> (B, N, D) tokens, computed over visible patches.

    Args:
        x: images, H and W multiples of ``patch_size``.
        weights: one (C_out, C_in, k, k) conv weight per stage (k odd, no bias); a stage is
            conv(stride 2, pad k//2) -> ReLU -> MaxBlurPool, and ``patch_size == 4 ** stages``.
        keep: (B, N) bool, True = visible patch, row-major over the patch grid; None = all
            visible (the plain dense stack, no masking).
        backend: "auto" (fastest available), "torch" or "reference".
    Masked tokens are exactly 0; no value from a masked patch reaches a visible token.
    """
    check_inputs(x, weights, keep, patch_size)
    name = select_backend(backend, x.device)
    return BACKENDS[name][0](x, list(weights), keep, patch_size)
