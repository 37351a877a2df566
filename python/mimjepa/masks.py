"""Patch masks for masked-image modelling, vectorised over the batch, exact counts per image.

Convention everywhere in this package and in scott_kernels: ``keep`` is (B, N) bool over the
patch grid in row-major order, True = visible. Every image keeps exactly ``num_visible(...)``
patches, so visible-only tensors have a fixed shape (B, n_keep, D) and need no host sync.
"""

from __future__ import annotations

import math

import torch

__all__ = ["num_visible", "uniform_keep", "blockwise_keep", "make_keep"]


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image for a masked fraction ``mask_ratio`` (at least one of each)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n_mask = int(round(num_patches * mask_ratio))
    return max(1, num_patches - n_mask)


def _keep_lowest(score: torch.Tensor, n_mask: int) -> torch.Tensor:
    """Masks the n_mask lowest scores of each row; returns keep (True = visible)."""
    ranks = score.argsort(dim=1).argsort(dim=1)
    return ranks >= n_mask


def uniform_keep(batch: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random masked patches, exactly the same count in every image."""
    n = grid[0] * grid[1]
    n_mask = n - num_visible(n, mask_ratio)
    return _keep_lowest(torch.rand(batch, n, generator=generator), n_mask)


def blockwise_keep(batch: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator,
                   min_block: int = 4, max_block: float = 0.4, aspect: float = 0.3,
                   blocks_per_image: int | None = None) -> torch.Tensor:
    """BEiT-style rectangular blocks, drawn for the whole batch at once.

    Each image gets ``blocks_per_image`` random rectangles (area uniform in
    [min_block, max_block * N] patches, log-uniform aspect in [aspect, 1/aspect]), in a random
    order. Patches are masked rectangle by rectangle in that order; the rectangle that crosses the
    exact count is filled from its centre outwards, so masks stay blocky, and if the rectangles
    cover too little the rest is drawn uniformly. Every image masks exactly N - num_visible.
    """
    gh, gw = grid
    n = gh * gw
    n_mask = n - num_visible(n, mask_ratio)
    if n_mask == 0:
        return torch.ones(batch, n, dtype=torch.bool)
    max_area = max(min_block, int(max_block * n))
    k = blocks_per_image or max(4, math.ceil(3 * n_mask / ((min_block + max_area) / 2)))
    u = torch.rand(batch, k, 5, generator=generator)
    area = min_block + u[..., 0] * (max_area - min_block)
    log_ratio = math.log(aspect) + u[..., 1] * (math.log(1 / aspect) - math.log(aspect))
    ratio = torch.exp(log_ratio)
    h = torch.sqrt(area * ratio).round().clamp(1, gh)
    w = torch.sqrt(area / ratio).round().clamp(1, gw)
    top = (u[..., 2] * (gh - h + 1)).floor()
    left = (u[..., 3] * (gw - w + 1)).floor()
    ys = torch.arange(gh, dtype=torch.float32).view(1, 1, gh, 1)
    xs = torch.arange(gw, dtype=torch.float32).view(1, 1, 1, gw)
    t, l, hh, ww = (v[..., None, None] for v in (top, left, h, w))
    covered = (ys >= t) & (ys < t + hh) & (xs >= l) & (xs < l + ww)            # (B, K, gh, gw)
    order = torch.arange(k, dtype=torch.float32).view(1, k, 1, 1)
    first = torch.where(covered, order, torch.full_like(order, float(k))).amin(dim=1)  # (B, gh, gw)
    # Within a rectangle, nearer its centre first (normalised distance < 1).
    idx = first.clamp(max=k - 1).long()
    cy = torch.gather(top + (h - 1) / 2, 1, idx.view(batch, -1)).view(batch, gh, gw)
    cx = torch.gather(left + (w - 1) / 2, 1, idx.view(batch, -1)).view(batch, gh, gw)
    dist = ((ys[0] - cy) ** 2 + (xs[0] - cx) ** 2).sqrt() / (gh + gw)
    noise = torch.rand(batch, gh, gw, generator=generator)
    score = torch.where(first < k, first + dist, k + noise)
    return _keep_lowest(score.view(batch, n), n_mask)


def make_keep(kind: str, batch: int, grid: tuple[int, int], mask_ratio: float, generator: torch.Generator,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """``kind`` is "blockwise" or "uniform"; drawn on the CPU from ``generator``, then moved."""
    if kind == "blockwise":
        keep = blockwise_keep(batch, grid, mask_ratio, generator)
    elif kind == "uniform":
        keep = uniform_keep(batch, grid, mask_ratio, generator)
    else:
        raise ValueError(f"mask kind must be 'blockwise' or 'uniform', got {kind!r}")
    return keep.to(device, non_blocking=True)
