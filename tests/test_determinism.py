"""Reproducibility of the triton backend: under ``torch.use_deterministic_algorithms(True)`` every
Triton op launches a fixed config (the first kept after pruning), never the autotuner's timed
choice, so forward and backward are bit-identical run to run; and a launch that runs out of
shared memory falls back to fewer pipeline stages, then to smaller configs, before it fails with
an error naming the kernel and the device's limit."""

import pytest
import torch

from scott_kernels import sparse_conv_tokenize
from scott_kernels.triton_configs import SharedMemoryError, autotune, resource_errors, triton_supports

from conftest import HAS_CUDA, random_weights

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
pytestmark = pytest.mark.skipif(not triton_supports(DEVICE),
                                reason="triton is not installed (or TRITON_INTERPRET=1 is unset on a CPU machine)")

if triton_supports(DEVICE):
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources

    # the package's autotune wrapper on a tiny kernel with two configs (the package's own kernels
    # keep one config under the interpreter, so they cannot show which one was chosen)
    CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=3),
               triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2)]

    @autotune(CONFIGS, ["N"], shared=None)
    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        tl.store(y_ptr + offs, 2.0 * tl.load(x_ptr + offs, mask=ok), mask=ok)


def _scale(x):
    y = torch.empty_like(x)
    _scale_kernel[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, y, x.numel())
    return y


@pytest.fixture
def deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.fixture
def fresh_tuner(monkeypatch, tmp_path):
    """The tiny kernel's tuner with an empty process cache, Triton's on-disk results in tmp_path,
    and a benchmark that times the second config (BLOCK 32) fastest."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_scale_kernel, "cache", {})
    monkeypatch.setattr(_scale_kernel, "_launch_configs", {})
    monkeypatch.setattr(_scale_kernel, "_bench",
                        lambda *args, config, **kw: [1.0 if config.kwargs["BLOCK"] == 32 else 2.0] * 3)
    return _scale_kernel


def _tokenize_step(x, weights, keep):
    out = sparse_conv_tokenize(x, weights, keep, patch_size=16, backend="triton")
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad((out * probe).sum(), weights)
    return out.detach(), grads


def test_forward_and_backward_are_bit_identical(deterministic):
    torch.manual_seed(0)
    weights = random_weights(3, (8, 16), (7, 7), dtype=torch.float32, device=DEVICE)
    x = torch.randn(2, 3, 48, 32, device=DEVICE)
    keep = torch.rand(2, 6, device=DEVICE) > 0.4
    out1, grads1 = _tokenize_step(x, weights, keep)
    out2, grads2 = _tokenize_step(x, weights, keep)
    assert torch.equal(out1, out2)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


def test_fixed_config_even_after_a_timed_choice(fresh_tuner, deterministic):
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    # without deterministic algorithms: the timed choice (BLOCK 32), cached for the key
    torch.use_deterministic_algorithms(False)
    assert torch.equal(_scale(x), 2 * x)
    assert fresh_tuner.last_config.kwargs["BLOCK"] == 32
    assert [c.kwargs["BLOCK"] for c in fresh_tuner.cache.values()] == [32]
    # with them: the first kept config, although the cache holds the timed one for this key
    torch.use_deterministic_algorithms(True)
    assert torch.equal(_scale(x), 2 * x)
    assert fresh_tuner.last_config is CONFIGS[0]
    # and the timed choice is still what a non-deterministic launch uses
    torch.use_deterministic_algorithms(False)
    _scale(x)
    assert fresh_tuner.last_config.kwargs["BLOCK"] == 32


def _failing(monkeypatch, tuner, fails):
    """Makes a launch raise OutOfResources when ``fails(BLOCK, num_stages)``; returns the list of
    (BLOCK, num_stages) of every launch tried."""
    tried, run = [], tuner.fn.run

    def launch(*args, **kwargs):
        tried.append((kwargs["BLOCK"], kwargs["num_stages"]))
        if fails(kwargs["BLOCK"], kwargs["num_stages"]):
            raise OutOfResources(300 * 1024, 227 * 1024, "shared memory")
        return run(*args, **kwargs)

    monkeypatch.setattr(tuner.fn, "run", launch)
    return tried


def test_resource_errors_include_out_of_resources():
    assert OutOfResources in resource_errors()


def test_out_of_shared_memory_retries_with_fewer_stages(monkeypatch, fresh_tuner, deterministic):
    tried = _failing(monkeypatch, fresh_tuner, lambda block, stages: block == 64 and stages > 1)
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    assert torch.equal(_scale(x), 2 * x)
    assert tried == [(64, 3), (64, 2), (64, 1)]
    assert fresh_tuner.last_config.kwargs["BLOCK"] == 64 and fresh_tuner.last_config.num_stages == 1
    # the working fallback is remembered for the key: no failing launch the next time
    tried.clear()
    _scale(x)
    assert tried == [(64, 1)]


def test_out_of_shared_memory_then_the_next_smaller_config(monkeypatch, fresh_tuner, deterministic):
    tried = _failing(monkeypatch, fresh_tuner, lambda block, stages: block == 64)
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    assert torch.equal(_scale(x), 2 * x)
    assert tried == [(64, 3), (64, 2), (64, 1), (32, 2)]
    assert fresh_tuner.last_config is CONFIGS[1]


def test_out_of_shared_memory_after_a_timed_choice(monkeypatch, fresh_tuner):
    # every trial of the benchmark and the launch of its choice fail at 2 stages and more
    monkeypatch.setattr(fresh_tuner, "_bench", lambda *args, config, **kw: [float("inf")] * 3)
    tried = _failing(monkeypatch, fresh_tuner, lambda block, stages: stages > 1)
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    assert torch.equal(_scale(x), 2 * x)
    assert tried == [(64, 3), (64, 2), (64, 1)]
    # the process cache now holds the config that ran
    assert [(c.kwargs["BLOCK"], c.num_stages) for c in fresh_tuner.cache.values()] == [(64, 1)]


def test_no_config_fits_is_a_clear_error(monkeypatch, fresh_tuner, deterministic):
    tried = _failing(monkeypatch, fresh_tuner, lambda block, stages: True)
    with pytest.raises(SharedMemoryError, match=r"_scale_kernel: no config fits this GPU's shared memory \(\d+ bytes"):
        _scale(torch.arange(100, dtype=torch.float32, device=DEVICE))
    assert tried == [(64, 3), (64, 2), (64, 1), (32, 2), (32, 1)]


def _counting_prune(monkeypatch, tuner):
    """Counts the tuner's config choices (each one prunes its config list)."""
    calls, prune = [], type(tuner).prune_configs

    def counted(self, kwargs):
        calls.append(1)
        return prune(self, kwargs)

    monkeypatch.setattr(type(tuner), "prune_configs", counted)
    return calls


def test_a_repeated_launch_reuses_its_config(monkeypatch, fresh_tuner, deterministic):
    # a fixed-config launch prunes the config list each time it chooses
    chosen = _counting_prune(monkeypatch, fresh_tuner)
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    assert torch.equal(_scale(x), 2 * x)
    assert len(chosen) == 1 and fresh_tuner.last_config is CONFIGS[0]
    # same key and dtypes: the same config, without choosing
    fresh_tuner.last_config = None
    assert torch.equal(_scale(x + 1), 2 * (x + 1))
    assert len(chosen) == 1 and fresh_tuner.last_config is CONFIGS[0]
    # another key value, another dtype: each chooses once
    assert torch.equal(_scale(x[:50]), 2 * x[:50])
    assert len(chosen) == 2
    assert torch.equal(_scale(x.double()), 2 * x.double())
    assert len(chosen) == 3
    _scale(x.double())
    assert len(chosen) == 3
    # the other mode chooses for itself: the timed choice, then reused
    torch.use_deterministic_algorithms(False)
    _scale(x)
    _scale(x)
    assert len(chosen) == 4 and fresh_tuner.last_config.kwargs["BLOCK"] == 32
    torch.use_deterministic_algorithms(True)
    _scale(x)
    assert len(chosen) == 4 and fresh_tuner.last_config is CONFIGS[0]
    # forgetting the choices chooses again
    fresh_tuner.forget_choices()
    assert not fresh_tuner.cache
    _scale(x)
    assert len(chosen) == 5


def test_a_reused_config_that_does_not_fit_is_chosen_again(monkeypatch, fresh_tuner, deterministic):
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    _scale(x)
    assert fresh_tuner.last_config is CONFIGS[0]
    # the reused config now runs out of shared memory (as on a smaller GPU of the same process):
    # the launch falls back as a first launch would
    tried = _failing(monkeypatch, fresh_tuner, lambda block, stages: block == 64 and stages > 2)
    assert torch.equal(_scale(x), 2 * x)
    assert tried == [(64, 3), (64, 3), (64, 2)]
    assert fresh_tuner.last_config.num_stages == 2
    tried.clear()
    _scale(x)
    assert tried == [(64, 2)]


@pytest.mark.parametrize("fixed", [True, False], ids=["deterministic", "timed"])
def test_the_reused_config_is_the_one_launched(monkeypatch, fresh_tuner, fixed):
    # another thread's launch of the same kernel rewrites the tuner's last/best config while this
    # launch runs: what is kept for the key must still be the config this launch ran
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(fixed)
    try:
        chosen = CONFIGS[0] if fixed else CONFIGS[1]
        other = CONFIGS[1] if fixed else CONFIGS[0]
        tried, run = [], fresh_tuner.fn.run

        def launch(*args, **kwargs):
            tried.append(kwargs["BLOCK"])
            ret = run(*args, **kwargs)
            fresh_tuner.last_config = fresh_tuner.best_config = other
            return ret

        monkeypatch.setattr(fresh_tuner.fn, "run", launch)
        x = torch.arange(100, dtype=torch.float32, device=DEVICE)
        _scale(x)
        tried.clear()
        assert torch.equal(_scale(x), 2 * x)
        assert tried == [chosen.kwargs["BLOCK"]]
    finally:
        torch.use_deterministic_algorithms(was)
