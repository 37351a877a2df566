import os

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter: set before scott_kernels imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def _cuda_param():
    return pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none present)"))


DEVICES = ["cpu", _cuda_param()]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def random_weights(in_chans, widths, kernels, dtype=torch.float64, device="cpu", requires_grad=True):
    weights, c_in = [], in_chans
    for width, k in zip(widths, kernels):
        w = torch.randn(width, c_in, k, k, dtype=dtype, device=device) * (2.0 / (c_in * k * k)) ** 0.5
        weights.append(w.requires_grad_(requires_grad))
        c_in = width
    return weights


def random_keep(batch, num_patches, ratio, device="cpu", generator=None):
    """Bool (B, N) with roughly `ratio` of each row masked, plus the edge cases mixed in."""
    keep = torch.rand(batch, num_patches, generator=generator).to(device) >= ratio
    return keep
