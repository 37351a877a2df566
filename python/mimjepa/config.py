"""Typed, validated run configuration: dataclasses <-> YAML, with ``key=value`` overrides.

A config file may set any subset of the fields; unknown keys and values of the wrong type are
errors that name the key. Overrides use dotted paths: ``optim.lr=1e-3 data.root=/data/pets``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from scott_kernels.vit import ScottViTConfig

__all__ = ["ConfigError", "ModelConfig", "as_model_config", "MaskConfig", "OptimConfig", "DataConfig", "PretrainConfig",
           "ProbeConfig", "VisualiseConfig", "load_config", "save_config", "to_dict"]


class ConfigError(ValueError):
    """A config key or value that is not accepted; the message names it."""


@dataclass
class ModelConfig(ScottViTConfig):
    """The encoder's architecture (``scott_kernels.vit.ScottViTConfig``: img_size, patch_size,
    in_chans, embed_dim, depth, num_heads, mlp_ratio, ffn_layer, num_register_tokens, dropout,
    attention_dropout, drop_path_rate, tokenizer_hidden, tokenizer_backend) and the predictor's."""

    predictor_depth: int = 3
    context_mode: Literal["mask_tokens", "visible_only"] = "mask_tokens"


def as_model_config(cfg: ScottViTConfig) -> ModelConfig:
    """A ModelConfig as given, or one with the architecture of a ScottViTConfig (e.g. a timm SCOTT
    ViT's ``model_config()``) and the predictor defaults."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, ScottViTConfig):
        return ModelConfig(**dataclasses.asdict(cfg))
    raise TypeError(f"expected a ModelConfig or ScottViTConfig, got {type(cfg).__name__}")


@dataclass
class MaskConfig:
    kind: Literal["blockwise", "uniform"] = "blockwise"
    ratio: float = 0.6


@dataclass
class OptimConfig:
    epochs: int = 300
    batch_size: int = 64
    lr_start: float = 1e-6
    lr: float = 5e-4  # peak
    lr_final: float = 1e-5
    warmup_epochs: float = 40
    flat_fraction: float = 0.72  # of the steps after warm-up spent at the peak before the cosine
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    wd_schedule: Literal["cosine", "linear"] = "cosine"
    ema_start: float = 0.996
    ema_end: float = 1.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    smooth_l1_beta: float = 1.0


@dataclass
class DataConfig:
    dataset: Literal["embedded", "folder", "flowers102", "pets37", "imagenet100"] = "embedded"
    root: Optional[str] = None
    num_workers: int = 0
    # The embedded dataset (mimjepa/synthetic.py): "lattices" (identical dots; the class is the
    # lattice they are laid out on), "outlines" (one large closed outline), "arrangements" (eight
    # identical parts in one of eight layouts) or "shapes" (single large shapes); num_classes 0 =
    # all of the kind's.
    embedded_kind: Literal["lattices", "outlines", "arrangements", "shapes"] = "lattices"
    embedded_train_size: int = 2000
    embedded_val_size: int = 500
    embedded_test_size: int = 0  # 0 = as many as embedded_val_size
    embedded_num_classes: int = 0
    # Random resized crop of the pretraining views: the range of the crop's area fraction.
    crop_scale: list = field(default_factory=lambda: [0.2, 1.0])
    # Colour jitter of the pretraining views (brightness, contrast, saturation, hue), applied
    # with probability colour_jitter_prob; a hue of 0.5 turns the hue anywhere around the circle.
    colour_jitter: list = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    colour_jitter_prob: float = 0.8
    # Probabilities of turning a pretraining view grey and of blurring it (Gaussian, sigma 0.1-2).
    greyscale_prob: float = 0.1
    blur_prob: float = 0.3
    # Pretraining views: "per_view" draws colour jitter / greyscale / blur separately for the
    # context and the target view; "shared" uses one augmented image for both (as in I-JEPA),
    # so the target latents are predictable from the context.
    view_appearance: Literal["per_view", "shared"] = "per_view"


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    deterministic: bool = False
    log_every: int = 10
    checkpoint_every: int = 1  # epochs
    max_steps: Optional[int] = None  # stop early (smoke runs); the schedules still span all epochs


@dataclass
class ProbeConfig:
    checkpoint: str = "runs/pretrain/checkpoint.safetensors"
    encoder: Literal["target", "context"] = "context"
    # Architecture for checkpoints of the SCOTT reference code (.pth state dicts carry none);
    # this package's .safetensors checkpoints carry their own and ignore it.
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/probe"
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    probes: list = field(default_factory=lambda: ["attentive", "cross_attentive", "linear", "knn"])
    knn_k: int = 20
    # The trained probes see the tokens standardised with training-split statistics (each
    # position's mean token subtracted, each feature scaled to unit variance); false feeds them
    # the layer-normed tokens as they are.
    standardise_tokens: bool = True
    random_init_baseline: bool = False  # also probe an untrained encoder of the same architecture


@dataclass
class VisualiseConfig:
    checkpoint: str = "runs/pretrain/checkpoint.safetensors"
    encoder: Literal["target", "context"] = "context"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out_file: str = "runs/pca.png"
    num_images: int = 8
    seed: int = 0
    device: str = "auto"
    random_init_baseline: bool = False  # adds a row for an untrained encoder of the same architecture


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _apply(cfg, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r}; known keys here: {sorted(names)}")
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its fields, got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(cfg, name, _coerce(value, hints[name], key))


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=1e-3)")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    nested: dict = {}
    node = nested
    parts = path.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _validate(cfg) -> None:
    if isinstance(cfg, PretrainConfig):
        m = cfg.model
        if m.img_size % m.patch_size:
            raise ConfigError(f"model.img_size={m.img_size} must be a multiple of model.patch_size={m.patch_size}")
        if m.embed_dim % m.num_heads or m.embed_dim % 4:
            raise ConfigError(f"model.embed_dim={m.embed_dim} must be divisible by model.num_heads={m.num_heads} and by 4")
        if not 0.0 <= cfg.mask.ratio < 1.0:
            raise ConfigError(f"mask.ratio must be in [0, 1), got {cfg.mask.ratio}")
        o = cfg.optim
        if o.epochs <= 0 or o.batch_size <= 0 or not 0 <= o.warmup_epochs <= o.epochs \
                or not 0.0 <= o.flat_fraction <= 1.0:
            raise ConfigError("optim: epochs and batch_size must be positive, 0 <= warmup_epochs <= epochs "
                              "and 0 <= flat_fraction <= 1")
    data = getattr(cfg, "data", None)
    if data is not None and data.dataset != "embedded" and not data.root:
        raise ConfigError(f"data.root is required for data.dataset={data.dataset!r}")
    if data is not None:
        lo_hi = data.crop_scale
        if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi) or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {lo_hi}")
        cj = data.colour_jitter
        if len(cj) != 4 or not all(isinstance(v, (int, float)) and v >= 0 for v in cj) or cj[3] > 0.5:
            raise ConfigError("data.colour_jitter must be [brightness, contrast, saturation, hue], each >= 0 and "
                              f"hue <= 0.5, got {cj}")
        for name in ("colour_jitter_prob", "greyscale_prob", "blur_prob"):
            value = getattr(data, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.{name} must be a probability in [0, 1], got {value!r}")
        if min(data.embedded_train_size, data.embedded_val_size, data.embedded_test_size + 1) < 1:
            raise ConfigError("data.embedded_train_size and data.embedded_val_size must be positive, "
                              "data.embedded_test_size >= 0")


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()):
    """Defaults of ``cls``, then the YAML file (if any), then the overrides; validated."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _apply(cfg, values)
    for text in overrides:
        _apply(cfg, _parse_override(text))
    _validate(cfg)
    return cfg


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
