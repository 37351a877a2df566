"""Shapes and helpers for the tokenizer benchmarks (pytest-benchmark).

On a GPU: 224x224, bf16 autocast, B in (64, 256) x D in (192, 384, 768) (B=64, D=384 is the SCOTT
ViT-S/16 setting). On a CPU: B=4, 224x224, D=192, float32, so that the suite runs in a few minutes
on two cores. Masks are blockwise (as in pretraining) with an exact visible count per image when
the training loop is installed, uniform otherwise.

SCOTT_BENCH_CHECK=1 (set by the one-command device check, tests/gpu/check.sh): on a GPU only the
headline shape (B=64, D=384) with 20 rounds after 3 warm-up, so the tokenizer and training-step
benchmarks fit its time window; on a CPU (its --dry walk) tiny shapes and 2 rounds.
SCOTT_BENCH_CHECK=warm: the same shapes, one round and no warm-up: the check's compile pass, which
fills the torch.compile and Triton caches (and records cold first-call times) before the timed run.
"""

import os
import statistics
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


CUDA = torch.cuda.is_available()
_CHECK_MODE = os.environ.get("SCOTT_BENCH_CHECK", "").strip().lower()
WARM = _CHECK_MODE == "warm"
CHECK = WARM or _CHECK_MODE in {"1", "true", "yes", "on"}
# (batch, embed_dim) points of the tokenizer benchmark
if CHECK:
    SHAPES = [(64, 384)] if CUDA else [(2, 32)]
else:
    SHAPES = [(b, d) for b in (64, 256) for d in (192, 384, 768)] if CUDA else [(4, 192)]


def gpu_setting(batch: int = 64, embed_dim: int = 384) -> BenchSetting:
    rounds, warmup = (1, 0) if WARM else (20, 3) if CHECK else (50, 5)
    return BenchSetting(torch.device("cuda"), batch, 224, embed_dim, 64, torch.bfloat16, rounds=rounds, warmup=warmup)


def cpu_setting(batch: int = 4, embed_dim: int = 192) -> BenchSetting:
    if CHECK:   # tiny: 64x64 images (16 patches), 16 hidden channels
        rounds, warmup = (1, 0) if WARM else (2, 1)
        return BenchSetting(torch.device("cpu"), batch, 64, embed_dim, 16, torch.float32, rounds=rounds, warmup=warmup)
    return BenchSetting(torch.device("cpu"), batch, 224, embed_dim, 64, torch.float32, rounds=5, warmup=1)


@pytest.fixture(scope="session")
def setting() -> BenchSetting:
    return gpu_setting() if CUDA else cpu_setting(*SHAPES[0])


def _keep(batch: int, n: int, mask_ratio: float, device, gen) -> tuple[torch.Tensor, str]:
    try:
        from mimjepa.masks import blockwise_keep
    except ImportError:
        return exact_count_keep(batch, n, mask_ratio, device, gen), "uniform"
    if mask_ratio == 0.0:
        return torch.ones(batch, n, dtype=torch.bool, device=device), "none masked"
    side = int(round(n ** 0.5))
    return blockwise_keep(batch, (side, side), mask_ratio, gen).to(device), "blockwise"


def make_inputs(s: BenchSetting, mask_ratio: float | None, seed: int = 0):
    """Float32 images and weights (autocast casts on GPU), an exact-count mask (None: dense) and
    the mask's kind for the results."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s.batch, 3, s.img_size, s.img_size, generator=gen).to(s.device)
    weights = [
        (torch.randn(s.hidden, 3, 7, 7, generator=gen) * (2 / 147) ** 0.5).to(s.device).requires_grad_(True),
        (torch.randn(s.embed_dim, s.hidden, 7, 7, generator=gen) * (2 / (49 * s.hidden)) ** 0.5)
        .to(s.device).requires_grad_(True),
    ]
    n = (s.img_size // 16) ** 2
    if mask_ratio is None:
        return x, weights, None, "keep=None"
    return (x, weights, *_keep(s.batch, n, mask_ratio, s.device, gen))


class timed:
    """Wraps fn so that GPU work is finished inside the timed call. On a GPU each call is also
    bracketed by CUDA events: pytest-benchmark's wall-clock stats include the synchronisation,
    the events give the device-side time of the same calls (``event_median_ms``)."""

    def __init__(self, s: BenchSetting, fn):
        self.fn = fn
        self.cuda = s.device.type == "cuda"
        self.event_ms: list[float] = []

    def __call__(self):
        if not self.cuda:
            return self.fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.fn()
        end.record()
        torch.cuda.synchronize()
        self.event_ms.append(start.elapsed_time(end))

    def event_median_ms(self, skip: int = 0) -> float | None:
        """Median over the calls after the first ``skip`` ones (pedantic's warm-up rounds)."""
        times = self.event_ms[skip:]
        return statistics.median(times) if times else None
