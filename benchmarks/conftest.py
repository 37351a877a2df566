"""Shapes and helpers for the tokenizer benchmarks (pytest-benchmark).

On a GPU: B=64, 224x224, D=384, bf16 autocast (the SCOTT ViT-S/16 setting). On a CPU: B=4,
224x224, D=192, float32, so that the suite runs in about a minute on two cores.
"""

from dataclasses import dataclass

import pytest
import torch

from scott_kernels.compare import exact_count_keep


@dataclass(frozen=True)
class BenchSetting:
    device: torch.device
    batch: int
    img_size: int
    embed_dim: int
    hidden: int
    dtype: torch.dtype
    rounds: int
    warmup: int


@pytest.fixture(scope="session")
def setting() -> BenchSetting:
    if torch.cuda.is_available():
        return BenchSetting(torch.device("cuda"), 64, 224, 384, 64, torch.bfloat16, rounds=50, warmup=5)
    return BenchSetting(torch.device("cpu"), 4, 224, 192, 64, torch.float32, rounds=5, warmup=1)


def make_inputs(s: BenchSetting, mask_ratio: float | None, seed: int = 0):
    """Float32 images and weights (autocast casts on GPU) and an exact-count random mask."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s.batch, 3, s.img_size, s.img_size, generator=gen).to(s.device)
    weights = [
        (torch.randn(s.hidden, 3, 7, 7, generator=gen) * (2 / 147) ** 0.5).to(s.device).requires_grad_(True),
        (torch.randn(s.embed_dim, s.hidden, 7, 7, generator=gen) * (2 / (49 * s.hidden)) ** 0.5)
        .to(s.device).requires_grad_(True),
    ]
    n = (s.img_size // 16) ** 2
    keep = None if mask_ratio is None else exact_count_keep(s.batch, n, mask_ratio, s.device, gen)
    return x, weights, keep


def timed(s: BenchSetting, fn):
    """Wraps fn so that GPU work is finished inside the timed call."""
    if s.device.type != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize()

    return synced
