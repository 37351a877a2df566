"""Dense emulation of the SCOTT tokenizer: the oracle every backend is tested against.

Every convolution and every pool runs over the whole image; after each, the result is multiplied
by the patch mask upsampled (nearest) to that resolution. This is exactly how the published code
computes its "sparse" convolutions, in any dtype (float64 included) and on any device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["blur_kernel", "max_blur_pool", "reference_tokenize"]


def blur_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Depthwise 3x3 binomial blur outer([1, 2, 1], [1, 2, 1]) / 16, shaped (C, 1, 3, 3)."""
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    kernel = (taps[:, None] * taps[None, :]) / 16.0
    return kernel.to(dtype=dtype, device=device).expand(channels, 1, 3, 3)


def max_blur_pool(x: torch.Tensor) -> torch.Tensor:
    """MaxBlurPool: 2x2 max-pool with stride 1 and no padding, then blur with stride 2, pad 1."""
    x = F.max_pool2d(x, kernel_size=2, stride=1)
    return F.conv2d(x, blur_kernel(x.shape[1], x.dtype, x.device), stride=2, padding=1, groups=x.shape[1])


def _upsampled(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, GH, GW) patch mask -> (B, 1, h, w) at `like`'s resolution, in its dtype."""
    fy, fx = like.shape[2] // mask.shape[2], like.shape[3] // mask.shape[3]
    return mask.repeat_interleave(fy, dim=2).repeat_interleave(fx, dim=3).to(like.dtype)


def reference_tokenize(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: torch.Tensor | None,
                       patch_size: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, N, D) tokens, dense emulation of the sparse tokenizer.

    ``keep`` is (B, N) bool, True = visible, or None for the plain dense stack (no masking).
    Inputs are assumed validated (see ``scott_kernels.functional``).
    """
    B, _, H, W = x.shape
    mask = None
    if keep is not None:
        mask = keep.view(B, 1, H // patch_size, W // patch_size)
        x = x * _upsampled(mask, x)
    for weight in weights:
        x = F.conv2d(x, weight, stride=2, padding=weight.shape[-1] // 2)
        if mask is not None:
            x = x * _upsampled(mask, x)
        x = max_blur_pool(torch.relu(x))
        if mask is not None:
            x = x * _upsampled(mask, x)
    return x.flatten(2).transpose(1, 2)
