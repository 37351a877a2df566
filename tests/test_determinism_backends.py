"""Under ``torch.use_deterministic_algorithms(True)`` the torch backend and the cuda kernels' C++
twin give bit-identical tokens and gradients run to run (no atomics; split counts fixed per
device). The triton backend's fixed-config rule is tested in test_determinism.py."""

from unittest import mock

import pytest
import torch

from scott_kernels import functional, sparse_conv_tokenize
from scott_kernels.cuda_backend import cuda_tokenize

from conftest import random_weights


def _run(backend, x, weights, keep):
    w = [t.detach().clone().requires_grad_(True) for t in weights]
    out = sparse_conv_tokenize(x, w, keep, backend=backend, num_visible=int(keep[0].sum()))
    out.backward(torch.ones_like(out))
    return out.detach(), [t.grad for t in w]


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_reruns(backend, dtype):
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    twin = mock.patch.dict(functional.BACKENDS, {"cuda": (cuda_tokenize, lambda device: True)})
    try:
        with twin:
            weights = random_weights(3, (16, 24), (7, 7), dtype=dtype)
            x = torch.randn(3, 3, 64, 48, dtype=dtype)
            keep = torch.zeros(3, 12, dtype=torch.bool)
            for b in range(3):
                keep[b, torch.randperm(12)[:5]] = True
            first = _run(backend, x, weights, keep)
            second = _run(backend, x, weights, keep)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
