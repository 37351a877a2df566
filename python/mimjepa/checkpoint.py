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

__all__ = ["CheckpointError", "atomic_write", "save_weights", "load_weights", "save_state", "load_state",
           "strip_prefixes", "load_strict", "rename_reference_tokenizer"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the model; the message says why."""


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


def strip_prefixes(state_dict: dict, prefixes=("module.", "_orig_mod.")) -> dict:
    """Removes leading DDP ('module.') and torch.compile ('_orig_mod.') prefixes, in any order."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def load_strict(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict(strict=True) with one clear message listing missing/unexpected keys and
    shape mismatches; never a silent partial load."""
    state_dict = strip_prefixes(state_dict)
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        lines = [f"{what}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            lines.append(f"  shape mismatches: {shapes[:10]}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


def rename_reference_tokenizer(state_dict: dict, what: str) -> dict:
    """An encoder state dict with the SCOTT reference code's tokenizer keys
    (``tokenizer.tokenizer.{3*i}.weight``: an nn.Sequential of conv, ReLU, pool per stage)
    renamed to ``tokenizer.convs.{i}.weight``; DDP/compile prefixes stripped, other keys as given."""
    renamed = {}
    for key, value in strip_prefixes(state_dict).items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["tokenizer", "tokenizer"] and parts[2].isdigit() and parts[3] == "weight":
            if int(parts[2]) % 3:
                raise CheckpointError(f"{what}: unexpected tokenizer key {key}")
            key = f"tokenizer.convs.{int(parts[2]) // 3}.weight"
        renamed[key] = value
    return renamed
