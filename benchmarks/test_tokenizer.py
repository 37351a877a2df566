"""Tokenizer forward and forward+backward per backend, mask ratio and shape.

    pytest benchmarks/test_tokenizer.py --benchmark-only --benchmark-json=tokenizer.json
    python benchmarks/plot.py tokenizer.json tokenizer.png

Backends: every one registered in ``scott_kernels.functional.BACKENDS`` that runs on the device
("triton" and "cuda" only on a GPU: on the CPU they are the interpreter and the kernels' C++
twin; "spconv" where the [spconv] extra is installed), plus ``reference_compiled``, the dense
emulation under torch.compile, and ``spconv_indices``: spconv's index generation alone (the
rulebooks of every stage, built for each new mask), which the "spconv" rows include; the
difference is its convolutions. On the CPU the spconv rows run at three mask ratios only. The
sparse backends are given ``num_visible`` (fixed-ratio masks, no host synchronisation). Medians
after warm-up; GPU calls synchronise inside the timed region. Peak GPU memory of one call, the first
call's time (compilation and autotuning included) and the visible patches' convolution FLOPs
(``useful_gflop``: divide by the median for achieved TFLOP/s) go into each result's extra_info,
and on a GPU the median of CUDA-event times of the timed rounds (``event_median_ms``).
"""

import time

import pytest
import torch

from scott_kernels import available_backends, reference_tokenize, sparse_conv_tokenize
from scott_kernels.functional import BACKENDS as REGISTERED
from scott_kernels.spconv_backend import spconv_plan

from conftest import CHECK, CUDA, SHAPES, gpu_setting, make_inputs, timed

MASK_RATIOS = [None, 0.0, 0.6, 0.75, 0.9]  # None: keep=None, the dense path of the EMA target encoder
BACKENDS = ["reference", "reference_compiled", *[b for b in REGISTERED if b != "reference"], "spconv_indices"]
SPCONV_CPU_RATIOS = (None, 0.6, 0.9)   # spconv's native CPU path is slow: fewer rows there

torch._dynamo.config.cache_size_limit = 64   # one compiled graph per shape and mask layout
# The device check's CPU walk traces through dynamo and AOTAutograd without Inductor's C++ codegen
# (minutes on two cores); everywhere else the reference is compiled with Inductor.
COMPILE_BACKEND = "aot_eager" if CHECK and not CUDA else "inductor"
_compiled_reference = torch.compile(reference_tokenize, dynamic=False, backend=COMPILE_BACKEND)


def useful_gflop(batch: int, visible: int, widths=(64,), embed_dim: int = 384, k: int = 7, direction: str = "fwd"):
    """Convolution FLOPs over the visible patches only (what a sparse kernel must do; 2 per MAC):
    forward, plus weight gradients of both convs and the input gradient of conv2 for fwd_bwd."""
    tiles = batch * visible
    c_in, side, fwd, bwd = 3, 16, 0.0, 0.0
    for i, c_out in enumerate([*widths, embed_dim]):
        out_side = side // 2
        macs = tiles * out_side ** 2 * k * k * c_in * c_out
        fwd += 2 * macs
        bwd += 2 * macs * (2 if i > 0 else 1)   # wgrad; dgrad except for the image
        c_in, side = c_out, side // 4
    return (fwd if direction == "fwd" else fwd + bwd) / 1e9


def _runs(backend: str, device: torch.device) -> bool:
    if backend == "reference_compiled":
        return True
    return backend.removesuffix("_indices") in available_backends(device)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}_D{s[1]}")
@pytest.mark.parametrize("mask_ratio", MASK_RATIOS, ids=lambda r: "dense" if r is None else f"mask{r}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_tokenizer(benchmark, setting, backend, direction, mask_ratio, shape):
    if CUDA:
        setting = gpu_setting(*shape)
    if not _runs(backend, setting.device):
        pytest.skip(f"backend {backend!r} does not run on {setting.device} in this build")
    if backend.startswith("spconv") and not CUDA and mask_ratio not in SPCONV_CPU_RATIOS:
        pytest.skip(f"spconv runs at mask ratios {SPCONV_CPU_RATIOS} on the CPU")
    x, weights, keep, mask_kind = make_inputs(setting, mask_ratio)
    visible = None if keep is None else int(keep[0].sum())
    autocast = setting.device.type == "cuda" and setting.dtype != torch.float32

    def forward():
        with torch.autocast(setting.device.type, dtype=setting.dtype, enabled=autocast):
            if backend == "reference_compiled":
                return _compiled_reference(x, weights, keep, 16)
            return sparse_conv_tokenize(x, weights, keep, backend=backend,
                                        num_visible=None if backend == "reference" else visible)

    if backend == "spconv_indices":
        # what a new mask costs before any convolution; the backward's tables only when training
        def step():
            spconv_plan(keep, setting.batch, setting.img_size, setting.img_size, 16, [7, 7], setting.device,
                        train=direction == "fwd_bwd")
    elif direction == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        def step():
            torch.autograd.grad(forward().float().square().mean(), weights)

    benchmark.group = f"{direction} {'dense' if mask_ratio is None else f'mask {mask_ratio}'} " \
                      f"B{setting.batch} D{setting.embed_dim}"
    benchmark.extra_info.update(device=str(torch.cuda.get_device_name() if CUDA else "cpu"), backend=backend,
                                direction=direction, mask_ratio=mask_ratio, mask=mask_kind,
                                batch=setting.batch, img_size=setting.img_size, embed_dim=setting.embed_dim,
                                dtype=str(setting.dtype))
    if backend == "reference_compiled":
        benchmark.extra_info["compile_backend"] = COMPILE_BACKEND
    n = (setting.img_size // 16) ** 2
    benchmark.extra_info["useful_gflop"] = useful_gflop(setting.batch, n if visible is None else visible,
                                                        (setting.hidden,), setting.embed_dim, 7, direction)
    start = time.perf_counter()
    timed(setting, step)()
    benchmark.extra_info["first_call_s"] = time.perf_counter() - start
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    runner = timed(setting, step)
    benchmark.pedantic(runner, rounds=setting.rounds, warmup_rounds=setting.warmup, iterations=1)
    if CUDA:
        benchmark.extra_info["event_median_ms"] = runner.event_median_ms(skip=setting.warmup)
