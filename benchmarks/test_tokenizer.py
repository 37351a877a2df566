"""Tokenizer forward and forward+backward per backend and mask ratio.

    pytest benchmarks/ --benchmark-only [--benchmark-json=out.json]

Medians after warm-up; GPU calls synchronise inside the timed region. Peak GPU memory of one
call goes into each result's extra_info.
"""

import pytest
import torch

from scott_kernels import available_backends, sparse_conv_tokenize

from conftest import make_inputs, timed

MASK_RATIOS = [None, 0.0, 0.6, 0.75]  # None: keep=None, the dense path of the EMA target encoder
BACKENDS = ["reference", "torch"]


@pytest.mark.parametrize("mask_ratio", MASK_RATIOS, ids=lambda r: "dense" if r is None else f"mask{r}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_tokenizer(benchmark, setting, backend, direction, mask_ratio):
    if backend not in available_backends(setting.device):
        pytest.skip(f"backend {backend!r} does not run on {setting.device} in this build")
    x, weights, keep = make_inputs(setting, mask_ratio)
    autocast = setting.device.type == "cuda" and setting.dtype != torch.float32

    def forward():
        with torch.autocast(setting.device.type, dtype=setting.dtype, enabled=autocast):
            return sparse_conv_tokenize(x, weights, keep, backend=backend)

    if direction == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        def step():
            torch.autograd.grad(forward().float().square().mean(), weights)

    benchmark.group = f"{direction} {'dense' if mask_ratio is None else f'mask {mask_ratio}'}"
    benchmark.extra_info.update(device=str(torch.cuda.get_device_name() if setting.device.type == "cuda" else "cpu"),
                                batch=setting.batch, img_size=setting.img_size, embed_dim=setting.embed_dim,
                                dtype=str(setting.dtype))
    if setting.device.type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(timed(setting, step), rounds=setting.rounds, warmup_rounds=setting.warmup, iterations=1)
