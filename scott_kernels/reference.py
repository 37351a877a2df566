"""Dense emulation of the SCOTT tokenizer: the oracle every backend is tested against.

Every convolution and every pool runs over the whole image; after each, the result is multiplied
by the patch mask upsampled (nearest) to that resolution, as the published code computes its
"sparse" convolutions, in any dtype (float64 included) and on any device. "Multiplied" is done as
a selection (``torch.where(mask, x, 0)``): the same values for finite inputs, but a NaN or Inf in
a masked region stays there instead of spreading (NaN * 0 is NaN) into visible patches that the
sparse function never connects to it.
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


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the (B, 1, GH, GW) patch mask, upsampled (nearest) to its resolution, applied by
    selection: exactly 0 where masked, whatever ``x`` holds there."""
    fy, fx = x.shape[2] // mask.shape[2], x.shape[3] // mask.shape[3]
    up = mask.repeat_interleave(fy, dim=2).repeat_interleave(fx, dim=3)
    return torch.where(up, x, torch.zeros((), dtype=x.dtype, device=x.device))


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
        x = _masked(x, mask)
    for weight in weights:
        x = F.conv2d(x, weight, stride=2, padding=weight.shape[-1] // 2)
        if mask is not None:
            x = _masked(x, mask)
        x = max_blur_pool(torch.relu(x))
        if mask is not None:
            x = _masked(x, mask)
    return x.flatten(2).transpose(1, 2)
