"""The SCOTT ViT encoder's fixed parts, shared by the timm models (``scott_kernels.timm_models``)
and the ``mimjepa`` training loop, which builds on them.

- ``ScottViTConfig``: the architecture of a SCOTT encoder (tokenizer + transformer).
- ``sincos_pos_embed_2d``: the fixed 2-D sin-cos position embedding.
- ``swiglu_hidden``: the SwiGLU feed-forward's hidden width.
- ``scott_block``: the encoder block's order, ``x = x + attn(LN(x)); x = LN(x); x = x + ffn(x)``
  (the second norm rewrites the residual stream).
- State dicts: ``CheckpointError``, ``strip_prefixes`` (DDP / torch.compile prefixes),
  ``check_state_dict`` (strict comparison, one message listing every difference),
  ``rename_reference_tokenizer`` (the SCOTT reference code's tokenizer keys), and the key maps
  between an encoder state dict (the names of ``mimjepa`` and of the SCOTT reference code,
  ``tokenizer.*``, ``transformer.*``) and timm's ``VisionTransformer`` names:
  ``encoder_to_timm`` and ``timm_to_encoder``.

This module imports torch only: neither timm nor the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch

__all__ = ["ScottViTConfig", "sincos_pos_embed_2d", "swiglu_hidden", "scott_block", "CheckpointError",
           "strip_prefixes", "check_state_dict", "rename_reference_tokenizer", "encoder_to_timm", "timm_to_encoder",
           "ENCODER_ONLY_KEYS"]


@dataclass
class ScottViTConfig:
    """Architecture of a SCOTT encoder: SparseConvTokenizer + ViT blocks in the SCOTT order.

    Weights do not record ``num_heads`` or the dropout rates; everything else can be read from a
    state dict's shapes."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0  # used by ffn_layer "mlp" only
    ffn_layer: Literal["mlp", "swiglu"] = "swiglu"
    num_register_tokens: int = 0
    dropout: float = 0.2
    attention_dropout: float = 0.1
    drop_path_rate: float = 0.1
    tokenizer_hidden: int = 64
    tokenizer_backend: str = "auto"


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, dim) fixed 2-D sin-cos embedding: first half from the row, second from the column."""
    if dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def swiglu_hidden(dim: int) -> int:
    """Hidden width of the SwiGLU feed-forward: 8/3 * dim rounded to a multiple of 128."""
    return int(128 * round(8 / 3 * dim / 128))


def scott_block(x: torch.Tensor, attn: Callable, ffn: Callable, norm_attn: Callable, norm_ffn: Callable) -> torch.Tensor:
    """One SCOTT encoder block: ``x = x + attn(norm_attn(x)); x = norm_ffn(x); x + ffn(x)``.

    ``attn`` and ``ffn`` are the residual branches including their stochastic depth; the norms
    are LayerNorms without affine parameters in the SCOTT encoder."""
    x = x + attn(norm_attn(x))
    x = norm_ffn(x)
    return x + ffn(x)


# --- state dicts -------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the model; the message says why."""


def strip_prefixes(state_dict: Mapping, prefixes=("module.", "_orig_mod.")) -> dict:
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


def check_state_dict(expected: Mapping[str, tuple], state_dict: Mapping, what: str) -> None:
    """Raises CheckpointError listing the missing and unexpected keys and the shape mismatches of
    ``state_dict`` against ``expected`` (key -> shape); returns when they agree exactly."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(state_dict) if tuple(expected[k]) != tuple(state_dict[k].shape))
    if missing or unexpected or shapes:
        lines = [f"{what}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            lines.append(f"  shape mismatches: {shapes[:10]}")
        raise CheckpointError("\n".join(lines))


def rename_reference_tokenizer(state_dict: Mapping, what: str) -> dict:
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


# Encoder keys that a timm VisionTransformer has no place for: the pretraining mask token.
ENCODER_ONLY_KEYS = ("transformer.msk_embed",)


def encoder_to_timm(encoder_state: Mapping[str, torch.Tensor], registers: int) -> dict:
    """Encoder state dict (``tokenizer.*``, ``transformer.*``, tokenizer keys already renamed) ->
    timm VisionTransformer names. The mask token is dropped; the register rows of the position
    embedding (zeros, the registers carry no position) are dropped too."""
    out = {}
    for key, value in encoder_state.items():
        parts = key.split(".")
        if key in ENCODER_ONLY_KEYS:
            continue
        if key == "transformer.pos_embed":
            out["pos_embed"] = value[registers:].unsqueeze(0)
        elif key == "transformer.reg_embed":
            out["reg_token"] = value
        elif parts[0] == "tokenizer":
            out["patch_embed." + ".".join(parts[1:])] = value
        elif parts[:2] == ["transformer", "blocks"] and len(parts) >= 5:
            i, layer, name = parts[2], parts[3], ".".join(parts[4:])
            if layer == "self_attn":
                out[f"blocks.{i}.attn.{name}"] = value
            elif layer == "ffn_layer":
                fc = "fc2" if name.startswith("last_linear") else "fc1"   # w12 (SwiGLU) / linear1 (MLP)
                out[f"blocks.{i}.mlp.{fc}.weight"] = value
            else:
                raise KeyError(f"no mapping for encoder key {key}")
        else:
            raise KeyError(f"no mapping for encoder key {key}")
    return out


def timm_to_encoder(timm_state: Mapping[str, torch.Tensor], ffn_layer: str, registers: int) -> dict:
    """timm VisionTransformer state dict -> the encoder state dict it corresponds to (mimjepa /
    SCOTT reference-code names), with a zero mask token and zero register rows in the position
    embedding. Keys an encoder has no place for (pooling norm, head) are left out."""
    if ffn_layer not in ("swiglu", "mlp"):
        raise ValueError(f"ffn_layer must be 'swiglu' or 'mlp', got {ffn_layer!r}")
    fc1 = "w12" if ffn_layer == "swiglu" else "linear1"
    out = {}
    for key, value in timm_state.items():
        parts = key.split(".")
        if key == "pos_embed":
            pos = value[0]
            out["transformer.pos_embed"] = torch.cat([pos.new_zeros(registers, pos.shape[-1]), pos])
            out["transformer.msk_embed"] = pos.new_zeros(1, 1, pos.shape[-1])
        elif key == "reg_token":
            out["transformer.reg_embed"] = value
        elif parts[0] == "patch_embed":
            out["tokenizer." + ".".join(parts[1:])] = value
        elif parts[0] == "blocks" and len(parts) == 5 and parts[4] == "weight":
            i, layer, name = parts[1], parts[2], parts[3]
            if layer == "attn" and name in ("qkv", "proj"):
                out[f"transformer.blocks.{i}.self_attn.{name}.weight"] = value
            elif layer == "mlp" and name in ("fc1", "fc2"):
                out[f"transformer.blocks.{i}.ffn_layer.{fc1 if name == 'fc1' else 'last_linear'}.weight"] = value
    return out
