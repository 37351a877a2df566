"""The probe and visualise commands: load a frozen encoder, then probe it or draw PCA maps."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, load_state, load_strict, load_weights, rename_reference_tokenizer
from .config import ModelConfig, ProbeConfig, VisualiseConfig, _apply, save_config
from .data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from .models import Encoder
from .probe import (AttentivePoolProbe, CrossAttentionProbe, LinearProbe, accuracy_metrics, extract_features,
                    knn_classify, standardise_tokens, train_probe)
from .train import resolve_device

__all__ = ["load_encoder", "load_reference_checkpoint", "run_probe", "run_visualise", "pca_rgb"]


def load_reference_checkpoint(path: str | Path, model_cfg: ModelConfig) -> Encoder:
    """An encoder from a SCOTT reference-code checkpoint (a plain state dict, e.g.
    ``context-encoder_checkpoint.pth``); strict: any missing or unexpected key is an error."""
    state = load_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a plain state dict of tensors")
    # The reference code keeps the tokenizer's convs in an nn.Sequential (conv, ReLU, pool per stage).
    renamed = rename_reference_tokenizer(state, str(path))
    encoder = Encoder(model_cfg)
    load_strict(encoder, renamed, str(path))
    return encoder


def load_encoder(path: str | Path, which: str, model_cfg: ModelConfig | None = None) -> Encoder:
    """Context or target encoder from this package's .safetensors checkpoint (architecture read
    from its metadata) or from a reference-code .pth state dict (architecture from model_cfg)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_reference_checkpoint(path, model_cfg or ModelConfig())
    weights = load_weights(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise CheckpointError(f"{path} carries no config metadata: not a mimjepa checkpoint")
    cfg = ModelConfig()
    _apply(cfg, yaml.safe_load(meta["config"])["model"], "model.")
    prefix = f"{which}_encoder."
    encoder = Encoder(cfg)
    load_strict(encoder, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                f"{path} [{which} encoder]")
    return encoder


def _probe_encoder(encoder: Encoder, cfg: ProbeConfig, device, show_progress: bool) -> dict:
    img_size = encoder.cfg.img_size
    splits = {}
    num_classes = None
    for split in ("train", "val", "test"):
        ds, num_classes = build_dataset(cfg.data, split, img_size, seed=cfg.seed)
        loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers)
        splits[split] = extract_features(encoder, loader, device, show_progress)
    # k-NN and the linear probe standardise pooled features themselves (the same up to a shift
    # and a per-feature scale); the attentive probes need the tokens standardised.
    trained = splits
    if cfg.standardise_tokens and any(name != "knn" for name in cfg.probes):
        tokens = standardise_tokens(*(splits[s][0] for s in ("train", "val", "test")))
        trained = {s: (x, splits[s][1]) for s, x in zip(("train", "val", "test"), tokens)}
    dim = splits["train"][0].shape[-1]
    results = {}
    makers = {"attentive": lambda: AttentivePoolProbe(dim, num_classes),
              "cross_attentive": lambda: CrossAttentionProbe(dim, num_classes),
              "linear": lambda: LinearProbe(dim, num_classes)}
    for name in cfg.probes:
        if name == "knn":
            results["knn"] = {"test": accuracy_metrics(knn_classify(splits["train"], splits["test"][0], num_classes,
                                                                    cfg.knn_k), splits["test"][1], num_classes)}
            continue
        if name not in makers:
            raise ValueError(f"probes: unknown probe {name!r}; choose from {sorted(makers) + ['knn']}")
        torch.manual_seed(cfg.seed)
        r = train_probe(name, makers[name](), trained["train"], trained["val"], trained["test"], num_classes,
                        epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                        device=device, seed=cfg.seed, show_progress=show_progress)
        results[name] = {"best_epoch": r.best_epoch, "val": r.val, "test": r.test}
    attentive = [n for n in results if n in ("attentive", "cross_attentive")]
    if attentive:
        # The SCOTT protocol keeps the attentive probe that is best on validation.
        best = max(attentive, key=lambda n: results[n]["val"]["top1"])
        results["best_attentive"] = {"probe": best, **results[best]}
    results["chance_top1"] = 100.0 / num_classes
    return results


def run_probe(cfg: ProbeConfig, show_progress: bool = True) -> dict:
    """Probes the checkpoint's encoder; with ``random_init_baseline`` also a randomly initialised
    encoder of the same architecture (what the probes get without pretraining)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder = load_encoder(cfg.checkpoint, cfg.encoder, cfg.model).to(device)
    results = _probe_encoder(encoder, cfg, device, show_progress)
    if cfg.random_init_baseline:
        torch.manual_seed(cfg.seed)
        baseline = Encoder(encoder.cfg).to(device)
        results["random_init"] = _probe_encoder(baseline, cfg, device, show_progress)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def pca_rgb(tokens: torch.Tensor, shown: int | None = None) -> torch.Tensor:
    """(B, N, D) tokens -> (shown, N, 3) in [0, 1]: the first three principal components over all
    patches of the batch, each min-max scaled over the first ``shown`` images (default all).
    Each position's mean token over the batch is removed first, as the probes do: what every
    image has at a position (the position embedding's trace) would otherwise fill the picture."""
    shown = len(tokens) if shown is None else shown
    centred = (tokens.float() - tokens.float().mean(dim=0, keepdim=True)).reshape(-1, tokens.shape[-1])
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    proj = (centred @ v[:3].T).view(*tokens.shape[:2], 3)[:shown].reshape(-1, 3)
    proj = (proj - proj.min(0).values) / (proj.max(0).values - proj.min(0).values).clamp_min(1e-8)
    return proj.view(shown, tokens.shape[1], 3)


@torch.no_grad()
def run_visualise(cfg: VisualiseConfig) -> Path:
    """PNG: a row of images, below it the PCA colours of the encoder's patch tokens (and, with
    ``random_init_baseline``, a row for a randomly initialised encoder of the same architecture).
    Small images are enlarged (nearest) to at least 128 px so the patches stay visible."""
    from torchvision.utils import save_image

    device = resolve_device(cfg.device)
    encoder = load_encoder(cfg.checkpoint, cfg.encoder, cfg.model).to(device).eval()
    encoders = [encoder]
    if cfg.random_init_baseline:
        torch.manual_seed(cfg.seed)
        encoders.append(Encoder(encoder.cfg).to(device).eval())
    img_size, patch = encoder.cfg.img_size, encoder.cfg.patch_size
    ds, _ = build_dataset(cfg.data, "val", img_size, seed=cfg.seed)
    # The principal components are fitted on up to 256 images of the split; the first
    # num_images are shown.
    fitted = torch.stack([ds[i][0] for i in range(min(max(cfg.num_images, 256), len(ds)))])
    images = fitted[:cfg.num_images]
    shown_size = img_size * max(1, -(-128 // img_size))
    grid = img_size // patch
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rows = [torch.nn.functional.interpolate((images * std + mean).clamp(0, 1), size=(shown_size,) * 2, mode="nearest")]
    for enc in encoders:
        tokens = torch.cat([enc(fitted[i:i + 256].to(device)).cpu() for i in range(0, len(fitted), 256)])
        colours = pca_rgb(tokens, len(images)).view(-1, grid, grid, 3).permute(0, 3, 1, 2)
        rows.append(torch.nn.functional.interpolate(colours, size=(shown_size,) * 2, mode="nearest"))
    out = Path(cfg.out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Images above, the token PCA of each encoder below (as in the SCOTT paper's figures).
    save_image(torch.cat(rows, dim=0), str(out), nrow=len(images), padding=2)
    return out
