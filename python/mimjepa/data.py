"""Datasets and augmentations: the embedded synthetic set, any ImageFolder, Flowers-102,
Oxford-IIIT Pets and an ImageNet-100 folder. Downloads are the user's job: nothing here fetches.

Pretraining draws two views of every image: one random resized crop and flip shared by both,
then colour jitter / greyscale / blur drawn for each view, or once for both
(``data.view_appearance: shared``); evaluation uses resize + centre crop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import v2

from .config import DataConfig
from .synthetic import classes_of, make_synthetic_images

__all__ = ["DatasetError", "build_dataset", "TwoViews", "train_transforms", "eval_transform", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(RuntimeError):
    """A dataset that cannot be opened; the message says where it looked."""


def train_transforms(img_size: int, tensor_input: bool = False,
                     crop_scale: tuple[float, float] = (0.2, 1.0),
                     colour_jitter: tuple = (0.4, 0.4, 0.2, 0.1), colour_jitter_prob: float = 0.8,
                     greyscale_prob: float = 0.1, blur_prob: float = 0.3) -> tuple[v2.Compose, v2.Compose]:
    """(geometry, appearance): the crop and flip are shared by both views of an image, so the
    views stay pixel-aligned patch for patch; colour jitter, greyscale and blur are drawn per view."""
    geometry = ([] if tensor_input else [v2.ToImage()]) + [
        v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    appearance = [
        v2.RandomApply([v2.ColorJitter(*colour_jitter)], p=colour_jitter_prob),
        v2.RandomGrayscale(p=greyscale_prob),
        v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=blur_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return v2.Compose(geometry), v2.Compose(appearance)


def eval_transform(img_size: int, tensor_input: bool = False) -> v2.Compose:
    steps = [] if tensor_input else [v2.ToImage()]
    if not tensor_input:
        steps += [v2.Resize(int(img_size * 256 / 224), antialias=True), v2.CenterCrop(img_size)]
    else:
        steps += [v2.Resize(img_size, antialias=True)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class TwoViews(Dataset):
    """Wraps a labelled dataset of raw images: item -> (context view, target view, label).
    ``shared_appearance``: one appearance draw for both views (the same image twice)."""

    def __init__(self, base: Dataset, transforms: tuple, shared_appearance: bool = False):
        self.base, (self.geometry, self.appearance) = base, transforms
        self.shared_appearance = shared_appearance

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        image = self.geometry(image)
        context = self.appearance(image)
        return context, context if self.shared_appearance else self.appearance(image), label


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return self.transform(image), label


def _raw_split(cfg: DataConfig, split: str, img_size: int, seed: int):
    """(dataset of (raw image, label), number of classes, whether images are tensors)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if cfg.dataset == "embedded":
        size = {"train": cfg.embedded_train_size, "val": cfg.embedded_val_size,
                "test": cfg.embedded_test_size or cfg.embedded_val_size}[split]
        # Each split is its own draw (own seed) of the same classes.
        images, labels = make_synthetic_images(size, img_size, seed=seed * 3 + ("train", "val", "test").index(split),
                                               num_classes=cfg.embedded_num_classes or None, kind=cfg.embedded_kind)
        num_classes = cfg.embedded_num_classes or len(classes_of(cfg.embedded_kind))
        return TensorDataset(images, labels), num_classes, True
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DatasetError(f"data.root {root} does not exist (datasets are not downloaded: put the files there)")
    from torchvision import datasets

    try:
        if cfg.dataset in ("folder", "imagenet100"):
            # root/train, root/val (root/test if present; else validation doubles as test).
            names = {"train": ["train"], "val": ["val", "test"], "test": ["test", "val"]}[split]
            folder = next((root / n for n in names if (root / n).is_dir()), None)
            if folder is None:
                if split != "train":
                    raise DatasetError(f"no {' or '.join(names)} folder under {root}")
                folder = root
            ds = datasets.ImageFolder(str(folder))
            return ds, len(ds.classes), False
        if cfg.dataset == "flowers102":
            return datasets.Flowers102(str(root), split=split, download=False), 102, False
        if cfg.dataset == "pets37":
            # No validation split: the test split doubles as validation.
            ds = datasets.OxfordIIITPet(str(root), split="trainval" if split == "train" else "test",
                                        target_types="category", download=False)
            return ds, 37, False
    except (RuntimeError, FileNotFoundError) as exc:
        raise DatasetError(f"cannot open {cfg.dataset} under {root}: {exc}") from exc
    raise DatasetError(f"unknown dataset {cfg.dataset!r}")


def build_dataset(cfg: DataConfig, split: str, img_size: int, seed: int = 0, two_views: bool = False):
    """(dataset, num_classes). ``two_views`` gives (view1, view2, label) items for pretraining."""
    raw, num_classes, is_tensor = _raw_split(cfg, split, img_size, seed)
    if two_views:
        return TwoViews(raw, train_transforms(img_size, is_tensor, cfg.crop_scale, cfg.colour_jitter, cfg.colour_jitter_prob,
                                               cfg.greyscale_prob, cfg.blur_prob), cfg.view_appearance == "shared"), num_classes
    return _Transformed(raw, eval_transform(img_size, is_tensor)), num_classes
