"""Checkpoints: weights as safetensors, training state for ``torch.load(weights_only=True)``,
atomic writes, and a strict loader for the SCOTT reference code's state dicts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# shared with the timm SCOTT ViTs, which load the same files
from scott_kernels.vit import CheckpointError, check_state_dict, rename_reference_tokenizer, strip_prefixes

__all__ = ["CheckpointError", "atomic_write", "save_weights", "load_weights", "save_state", "load_state",
           "strip_prefixes", "load_strict", "rename_reference_tokenizer"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Writes through a temporary file in the same folder, then renames: readers never see a
    half-written checkpoint, and a crash leaves the previous one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc


def save_state(state: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"training state {path} is corrupt or not a training state: {exc}") from exc


def load_strict(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict(strict=True) with one clear message listing missing/unexpected keys and
    shape mismatches; never a silent partial load."""
    state_dict = strip_prefixes(state_dict)
    check_state_dict({k: v.shape for k, v in module.state_dict().items()}, state_dict, what)
    module.load_state_dict(state_dict, strict=True)
