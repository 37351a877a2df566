"""The embedded dataset: procedurally drawn, labelled images, made in code from a seed.

Ten classes of shapes (disk, square, triangle, ring, cross, horizontal stripes, vertical stripes,
checkerboard, twin disks, ellipse), each drawn large at a random position, size, angle and colour
over a faint gradient background in a contrasting colour, with pixel noise. Colour and position carry no label, so a model
must see shape and texture to separate the classes. Nothing is downloaded; the same seed gives the
same images on every machine.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CLASS_NAMES", "make_synthetic_images"]

CLASS_NAMES = ("disk", "square", "triangle", "ring", "cross", "h_stripes", "v_stripes", "checker",
               "twin_disks", "ellipse")


def _shape_mask(kind: int, ys: torch.Tensor, xs: torch.Tensor, cy: float, cx: float, r: float,
                angle: float) -> torch.Tensor:
    """Soft-free boolean mask of one shape on a unit-square grid."""
    dy, dx = ys - cy, xs - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy          # rotated coordinates
    dist = torch.sqrt(dy ** 2 + dx ** 2)
    square = (u.abs() < r) & (v.abs() < r)
    if kind == 0:
        return dist < r
    if kind == 1:
        return square
    if kind == 2:
        return (v < r * 0.8) & (v > -r) & (u.abs() < (r * 0.8 - v) * 0.6)
    if kind == 3:
        return (dist < r) & (dist > r * 0.55)
    if kind == 4:
        return ((u.abs() < r * 0.3) & (v.abs() < r)) | ((v.abs() < r * 0.3) & (u.abs() < r))
    if kind == 5:
        return square & (torch.floor((v + r) / (r / 2.5)) % 2 == 0)
    if kind == 6:
        return square & (torch.floor((u + r) / (r / 2.5)) % 2 == 0)
    if kind == 7:
        return square & ((torch.floor((u + r) / (r / 2)) + torch.floor((v + r) / (r / 2))) % 2 == 0)
    if kind == 8:
        off = r * 0.6
        return (torch.sqrt((u - off) ** 2 + v ** 2) < r * 0.45) | (torch.sqrt((u + off) ** 2 + v ** 2) < r * 0.45)
    return (u / r) ** 2 + (v / (0.45 * r)) ** 2 < 1.0


def make_synthetic_images(num_images: int, img_size: int, seed: int, num_classes: int = 10):
    """(images (N, 3, S, S) float in [0, 1], labels (N,) int64), balanced over the classes."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % num_classes
    labels = labels[torch.randperm(num_images, generator=g)]
    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size
    ys, xs = coords.view(-1, 1), coords.view(1, -1)
    images = torch.empty(num_images, 3, img_size, img_size)
    params = torch.rand(num_images, 12, generator=g)
    noise = torch.randn(num_images, 3, img_size, img_size, generator=g) * 0.04
    for i in range(num_images):
        p = params[i]
        r = 0.26 + 0.14 * p[0].item()
        cy = r + (1 - 2 * r) * p[1].item()
        cx = r + (1 - 2 * r) * p[2].item()
        # Stripes keep their orientation (a quarter turn would swap the two stripe classes).
        angle = (p[3].item() - 0.5) * 0.6 if labels[i] in (5, 6) else p[3].item() * math.pi
        fg = p[4:7]
        bg_a, bg_b = p[7:10], p[7:10].roll(1)
        # Background: a faint gradient in a colour kept away from the shape's.
        t = (ys * math.cos(p[10].item() * 6.28) + xs * math.sin(p[10].item() * 6.28)).clamp(0, 1)
        background = 0.2 * (bg_a.view(3, 1, 1) * (1 - t) + bg_b.view(3, 1, 1) * t) + 0.8 * (1 - fg).view(3, 1, 1)
        mask = _shape_mask(int(labels[i]), ys, xs, cy, cx, r, angle)
        images[i] = torch.where(mask, fg.view(3, 1, 1), background)
    return (images + noise).clamp(0, 1), labels
