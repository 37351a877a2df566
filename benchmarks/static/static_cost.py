"""Static machine-code cost report: a STATIC ESTIMATE from compiled code, not a timing.

    python benchmarks/static/static_cost.py [--arch 90|89|86|80|75] [--quick] [--first-config REGEX]
                                            [--dtype bfloat16] [--json OUT.json] [--no-cuda | --no-triton]
                                            [--launch-gap SECONDS] [--no-host] [--host-repeats N]

Triton backend. The real code path, ``sparse_conv_tokenize(..., backend="triton")`` forward and
backward at the headline workload (bf16, B=64, 224², 78 of 196 patches visible per image, D=384,
hidden 64, 7×7 kernels) and the dense forward (``keep=None``), runs on CPU tensors with Triton's
driver replaced by a fake GPU (``codegen.py``, next to this script): every launch compiles exactly
as on a GPU of the chosen target, and each autotuned kernel is compiled with every config its
autotuner keeps after pruning (``--quick``: the first kept config; ``--first-config REGEX``: the
first kept config for kernels whose name matches). Kernels and configs are discovered, not listed
here.

For each compiled kernel the report reads from the cubin (cuobjdump): registers, local memory
(spills), shared memory, the tensor-core instruction (HGMMA = wgmma, HMMA = mma.sync), global load
widths in the main loop (LDG = to registers, LDGSTS = cp.async to shared memory; .128 is a 16-byte
vector), and instructions per tensor-core instruction in the main loop (loops found by back-edge
branches; the main loop is the one with the most instructions among those issuing tensor-core
instructions). Loop trip counts come from the kernel's TTIR ``scf.for`` bounds evaluated with
the launch's scalar arguments. Per kernel:

  issue  = executed warp-instructions, scheduled in waves of the programs an SM holds at once
           (registers, shared memory, warps), 4 schedulers per SM, 1 instruction per cycle per
           warp, 132 SMs at 1.98 GHz (about 1.05e12 warp-instructions/s when the grid fills it)
  memory = compulsory bytes (each distinct tensor argument read or written once) / HBM bandwidth
           (3.3e12 B/s, an H200; --hbm 2.98e12 for an H100) - the HBM floor
  mma    = executed tensor-core FLOPs (padding included) / the tensor rate of the kernel's
           instruction class on the target (TENSOR_RATES; tf32: half)
  estimate = max(issue, memory, mma); the kernel's tensor floor is the useful FLOPs of the
           convolution it computes / the target's best rate (sm_90: wgmma's).

Tensor rates (dense 16-bit inputs, FP32 accumulate; TENSOR_RATES, per target and SASS class):
  sm_90 HGMMA (wgmma)    790e12  a plain bf16 GEMM measured at 780 TFLOP/s on an H100 (the
                                 project's own measurement, design notes section 3; cuBLAS issues
                                 wgmma there); NVIDIA's dense peak is 989.5e12.
  sm_90 HMMA (mma.sync)  395e12  half the wgmma rate: a STATED ASSUMPTION, not a measurement.
                                 Luo, Fan, Li, Du, Wang, Chu, "Benchmarking and Dissecting the
                                 Nvidia Hopper GPU Architecture" (IPDPS 2024, arXiv:2402.13499) and
                                 Luo, Fan, Li, Du, Liu, Wang, Chu, "Dissecting the NVIDIA Hopper
                                 Architecture through Microbenchmarking and Multiple Level Analysis"
                                 (arXiv:2501.12084, 2025) measure mma against wgmma on an H800 and
                                 conclude that Hopper's tensor cores reach their throughput only
                                 through wgmma; the copies readable here held their abstracts and
                                 summaries, not their tables, so no mma.sync figure is taken from
                                 them. The factor 0.5 matches an unrefereed report (r/CUDA, "Since
                                 WGMMA has 2x throughput of WMMA in H100 GPU...") of WMMA reaching
                                 about 50% of H100's FP16 peak. A GPU measurement should replace it.
  sm_80 HMMA             312e12  A100 dense peak (NVIDIA A100 whitepaper: 108 SMs x 2048
                                 FLOP/clock x 1.41 GHz, as derived by R. Crovella in the NVIDIA
                                 forum thread "How to calculate the Tensor Core FP16 performance of
                                 H100?", 2023): a vendor peak.
  sm_86 HMMA             154.8e12  RTX A6000 (84 SMs) dense peak from NVIDIA's datasheet, not
                                 verified from a stored source here: a stated assumption.
  sm_89 HMMA             362e12  L40S dense peak from NVIDIA's datasheet, not verified here: a
                                 stated assumption.
Every target shares the rest of the machine model (132 SMs, 1.98 GHz, the HBM rate): for sm_8x
the report checks what compiles and fits (99 KB of shared memory per block on sm_86/sm_89), and
its times are those of that code on an H200-shaped machine at the part's tensor rate.

A loop body is counted statically: both sides of a branch inside it count, which overcounts
where a loop branches (predicated Triton loops rarely do; the CUDA loaders' 64-bit division fast
and slow paths do). Per autotuned kernel the best kept config is taken (what a perfect autotuner
would pick). Sums
per backend: one forward+backward at mask 0.6, and the dense forward. It is a lower bound in
spirit: no latency, cache misses or bank conflicts.

Every launch (``launches.py``, next to this script): the real code path runs under
``torch.profiler`` (CPU, shapes and dtypes recorded) around each phase's calls into the backend;
every outermost aten op that launches a kernel on a GPU (views, allocations and metadata ops do
not; wrappers such as ``to``/``contiguous``/``zeros`` count the copies and fills they make) is one
launch with its compulsory bytes at the HBM rate (table builds, dtype casts, the weight
gradients' partial sums, index_select/index_copy, copies, zero fills). Triton launches are the
code path's (the autotuner's trial launches are not counted); the cuda backend's Python path runs
on CPU tensors as on an sm_90 GPU with its native kernels replaced by counters (each conv call is
a neighbour-table launch and a GEMM launch, each pool call one launch: checked against
CUDA_LAUNCHES). Each launch adds a GPU gap of ``--launch-gap`` (2 µs): a STATED ASSUMPTION for
the device-side idle time between dependent kernels in one stream when the host runs ahead. The
published launch figures found (e.g. the "pegainfer (3): From Launch Overhead to CUDA Graph" blog:
about 4-6 µs of host-side submission per kernel; "Tensor Core Throughput at Scale", factryze:
5-20 µs per cudaLaunchKernel on the host) are host costs, which the host timing below measures
instead. A phase's total = its kernels' estimates + its torch ops' bytes / HBM + launches x gap.

Host dispatch (``launches.host_time``): the public API's masked forward and forward+backward on
tiny CPU tensors (one 64x64 image, 6 of 16 patches visible, 64 channels, the headline's 16-px
patches and 7x7 kernels), every GPU launch a no-op (Triton: the stand-in driver's launcher
returns at once; cuda: the native calls are counters), median of ``--host-repeats`` (40) after 5
warm-up calls: Python, the torch dispatcher, the custom-op and autograd layers, the Triton JIT's
binding and cache/autotuner look-ups. The figure is the process's CPU time (what the dispatch costs
a core of its own); the report also gives the wall time, which on a shared machine adds the waits
for a core. Not included: the driver's own launch call (cuLaunchKernel
or cudaLaunchKernel), so it is a floor of the host time on a GPU machine. Eager time on a GPU is
at best the larger of this and the GPU estimate.

CUDA backend (the nvcc-built ``scott_kernels/_C*.so``, sm_90a): registers, spills and static
shared memory from ``cuobjdump --dump-resource-usage``; SASS from ``--dump-sass``. A compiled module
has no record of its launches, so :data:`CUDA_LAUNCHES` maps each kernel launch of the headline
workload (bf16: the implicit-GEMM conv kernels, their neighbour tables, the tiled pools) to a
kernel (a regular expression on the demangled name), its compulsory bytes, its blocks and the
trip counts of its loops; :data:`CUDA_TILES` gives each kernel's threads, dynamic shared
memory and which loop of its machine code runs which count (the tensor-core K loop's trips follow
from the K steps and the mma.sync per K step, so executed FLOPs are exact). Issue counts every loop
body x its trips (a loop that is a switch of n cases counts 1/n of its body), in full waves of the
blocks an SM holds plus a partial last wave; a persistent grid's busiest block sets the path and
its mean block the throughput. When the CUDA kernels change, update those two tables from the
launch code in csrc/ (a pattern that matches no kernel, or a loop count that disagrees with the
machine code, is reported, not skipped silently; tests/test_codegen.py checks both).

The report ends with the figures against the targets and one line per backend a script can
read (X and Y with every launch counted, N the launches of one forward+backward, H its host time):
    static estimate <backend>: fwd+bwd mask 0.6 <X> ms, dense fwd <Y> ms, launches <N>, host <H> ms
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # codegen sits next to this script
    sys.path.insert(0, str(HERE))

import codegen  # noqa: E402  (imports triton and scott_kernels lazily)
import launches as launch_count  # noqa: E402

PHASES = ("masked_fwd", "masked_bwd", "dense_fwd")

# Dense 16-bit tensor-core FLOP/s per target and SASS instruction class (HGMMA = wgmma, HMMA =
# mma.sync); TF32 runs at half. Sources and assumptions in the module docstring ("Tensor rates").
TENSOR_RATES = {
    90: {"HGMMA": 790e12, "HMMA": 395e12},
    80: {"HMMA": 312e12},
    86: {"HMMA": 154.8e12},
    89: {"HMMA": 362e12},
    75: {"HMMA": 65e12},   # T4 datasheet fp16 peak (an assumption like sm_86/89's); the triton backend refuses sm_75
}
ARCHS = (90, 89, 86, 80, 75)   # codegen.TARGETS: sm_86/sm_89 cap a block's shared memory at 99 KB, sm_75 at 64 KB
LAUNCH_GAP = 2e-6  # seconds of GPU idle per dependent launch (a stated assumption, see the docstring)


def machine_for(args) -> dict:
    """codegen.MACHINE with the command line's HBM rate and the target's per-class tensor rates."""
    return dict(codegen.MACHINE, hbm=getattr(args, "hbm", 3.3e12),
                tensor_rates=TENSOR_RATES.get(getattr(args, "arch", 90), TENSOR_RATES[90]))


def floor_rate(arch: int) -> float:
    """The target's best dense tensor rate: the tensor floor of a convolution."""
    return max(TENSOR_RATES.get(arch, TENSOR_RATES[90]).values())


# --------------------------------------------------------------------------------------------
# The workload's useful convolution FLOPs, per GEMM role
# --------------------------------------------------------------------------------------------
def workload_geometry(visible: int | None = None) -> dict:
    h = codegen.HEADLINE
    vis = h["visible"] if visible is None else visible
    tiles = h["batch"] * vis
    s0 = h["patch"] // 2  # stage-0 conv output side per patch
    s1 = h["patch"] // 8  # stage-1 conv output side per patch
    k2 = h["kernel"] ** 2
    return {
        "tiles": tiles,
        "rows0": tiles * s0 * s0, "rows1": tiles * s1 * s1, "in_rows1": tiles * (h["patch"] // 4) ** 2,
        "pool0_rows": tiles * (s0 // 2) ** 2, "pool1_rows": tiles * (s1 // 2) ** 2,
        "conv0": 2.0 * tiles * s0 * s0 * h["hidden"] * h["in_chans"] * k2,
        "conv1": 2.0 * tiles * s1 * s1 * h["dim"] * h["hidden"] * k2,
        "k0": h["in_chans"] * k2, "k1": h["hidden"] * k2, "hidden": h["hidden"], "dim": h["dim"],
        "kernel": h["kernel"], "image": 2.0 * h["batch"] * h["in_chans"] * h["image"] ** 2,
    }


def gemm_roles(phase: str) -> list[tuple[str, float]]:
    """(role, useful FLOPs) of each convolution GEMM a phase computes."""
    g = workload_geometry(196 if phase == "dense_fwd" else None)
    if phase == "masked_bwd":  # images need no gradient: no stage-0 input gradient
        return [("conv0 wgrad", g["conv0"]), ("conv1 wgrad", g["conv1"]), ("conv1 dgrad", g["conv1"])]
    return [("conv0 fwd", g["conv0"]), ("conv1 fwd", g["conv1"])]


def assign_roles(rows: list[dict], phase: str) -> None:
    """Gives each tensor-core kernel of a phase its convolution role and useful FLOPs: a one-to-one
    match by executed FLOPs when the counts agree, else shares in proportion to executed FLOPs."""
    roles = gemm_roles(phase)
    gemms = [r for r in rows if r["mma_flops"] > 0]
    for r in rows:
        r.setdefault("role", "-" if r["mma_flops"] == 0 else "?")
        r.setdefault("useful_flops", 0.0)
    if not gemms:
        return
    if len(gemms) == len(roles):
        best = min(itertools.permutations(roles),
                   key=lambda p: sum(abs(math.log(r["mma_flops"] / f)) for r, (_, f) in zip(gemms, p)))
        for r, (role, f) in zip(gemms, best):
            r["role"], r["useful_flops"] = role, f
    else:
        total = sum(f for _, f in roles)
        executed = sum(r["mma_flops"] for r in gemms)
        for r in gemms:
            r["role"], r["useful_flops"] = "conv (share)", total * r["mma_flops"] / executed


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
def triton_rows(args) -> tuple[list[dict], list[dict], list[str]]:
    """(per-config rows, per-kernel best rows, errors)."""
    quick = (lambda name: True) if args.quick else (
        (lambda name: re.search(args.first_config, name) is not None) if args.first_config else (lambda name: False))
    torch_ops: dict[str, list[dict]] = {}
    host = {}
    with codegen.fake_gpu(args.arch, first_config_only=quick, cache_dir=args.cache_dir) as rec:
        errors = []
        try:
            codegen.run_workload(rec, args.dtype, batch=args.batch,
                                 phase_context=launch_count.profiled(torch_ops))
        except Exception as e:  # report what compiled, and why the path stopped
            errors.append(f"workload stopped at {rec.loading or '?'}: {type(e).__name__}: {str(e).strip()[:1000]}")
        # a config the autotuner skipped (it ranks last) is reported, not an error of the path
        skipped = list(rec.errors)
        records = list(rec.records)
        if not getattr(args, "no_host", False) and not errors:
            rec.lean, rec.phase = True, "host"
            try:
                host = launch_count.host_time("triton", args.dtype, repeats=args.host_repeats)
            except Exception as e:
                errors.append(f"host timing failed: {type(e).__name__}: {str(e).strip()[:500]}")
            rec.lean = False
    errors += [f"config skipped by the autotuner: {e}" for e in skipped]
    kernel_launches = {p: sum(1 for r in records for l in r.launches if l.phase == p and not l.trial) for p in PHASES}
    args.triton_extras = {"torch_ops": torch_ops, "kernel_launches": kernel_launches, "host": host}
    machine = machine_for(args)
    configs = []
    for r in records:
        if r.error:
            configs.append({"kernel": r.name, "config": r.config, "error": r.error, "compile_s": r.compile_s,
                            "phase": "-"})
            continue
        for phase in PHASES:
            launches = _distinct([l for l in r.launches if l.phase == phase])
            if not launches:
                continue
            c = codegen.analyze(r, launches, args.arch, machine)
            row = {"kernel": r.name, "phase": phase, "group": _group_key(r), "compile_s": r.compile_s,
                   "num_warps": r.num_warps, "num_stages": r.num_stages, **vars(c)}
            configs.append(row)
    best = []
    for phase in PHASES:
        groups: dict = {}
        for row in configs:
            if row.get("phase") == phase:
                groups.setdefault((row["kernel"], row["group"]), []).append(row)
        rows = []
        for (_, _), members in groups.items():
            b = dict(min(members, key=lambda m: m["estimate_s"]))
            b["configs_kept"] = len(members)
            rows.append(b)
        assign_roles(rows, phase)
        best += rows
    # the per-config rows get the role of their kernel
    roles = {(b["phase"], b["kernel"], b["group"]): (b["role"], b["useful_flops"]) for b in best}
    for row in configs:
        if "group" in row:
            row["role"], row["useful_flops"] = roles[(row["phase"], row["kernel"], row["group"])]
    return configs, best, errors


def _distinct(launches):
    """A launch repeated with the same grid and scalars (the autotuner's trial, then the real
    launch of the chosen config) counts once."""
    seen, out = set(), []
    for l in launches:
        key = (l.grid, tuple(sorted(l.scalars.items())))
        if key not in seen:
            seen.add(key)
            out.append(l)
    return out


def _group_key(record) -> str:
    """The kernel's identity apart from its tunables: the constexprs no autotune config sets."""
    tunable = codegen.tunables().get(record.name, set())
    return ",".join(f"{k}={v}" for k, v in sorted(record.constexprs.items()) if k not in tunable)


# --------------------------------------------------------------------------------------------
# CUDA module
# --------------------------------------------------------------------------------------------
# Per kernel of csrc/*.cu (update with the kernels; the host launch code is the truth):
# threads per block, dynamic shared memory per block (the module's resource usage has only the
# static part; both set occupancy), "mma_step": mma.sync per warp in one K step of the launch
# geometry's "k", and "loops": the trip count of each loop of the machine code, per run of its
# enclosing loop, in nesting order (codegen.walk: a loop, then the loops inside it), as a number
# or a name the launch geometry gives ("k": the tensor-core K loop, computed from "k" and
# "mma_step"; "groups": a persistent block's work items; "stage_rows", "stage_vectors", "tasks",
# "tables", "g_rows"; a warp none of whose threads enters a loop runs it 0 times, which the
# geometry's "mean" says).
# The K loops are fully unrolled over a K step's fragments; a loop count that does not match the
# machine code is reported, not guessed.
CUDA_TILES = {
    # stage-1 forward: 128 rows x 128 output channels, 8 warps of 64 x 32; K step = 32 channels
    # (two k16 steps of 4 x 4 mma); loops: neighbour staging (33 tiles x 9 / 256), K
    "scott_conv_fwd_igemm": {"threads": 256, "smem": 4 * (128 * 40 + 32 * 136) * 2 + 129 * 9 * 4,
                             "mma_step": 32, "loops": [2, "k"]},
    # stage-1 input gradient: 128 input pixels of one parity class x 64 input channels
    "scott_conv_dgrad_igemm": {"threads": 128, "smem": 4 * (128 * 40 + 32 * 72) * 2 + 129 * 9 * 4,
                               "mma_step": 32, "loops": [3, "k"]},
    # stage-1 weight gradient: one tap x 64 input channels x 128 output channels; K step = 32 pixels
    "scott_conv_wgrad_igemm": {"threads": 128, "smem": 4 * (32 * 72 + 32 * 136) * 2, "mma_step": 32, "loops": ["k"]},
    # stage 0 (image, channels padded to 4; K = 7 rows x 4 tap pairs x 8 = 224): persistent over
    # groups of two 8 x 8-output tiles (128 pixels) x 64 channels; smem = image_smem_bytes (weight
    # slice 224 x 72, two staged 21 x 22 x 4 windows, tables, 16 bytes of alignment, the epilogue's
    # 4 warps x 16 x 40). K step = k16 (4 x 4 mma). Loops: weight slice copy (224 x 8 vectors /
    # 128), three short setup loops, then per group: the neighbour rows (2 x 10 / 128), the window
    # staging (42 window rows, 128 / 22 = 5 at a time), K
    "scott_conv_image_igemm": {"threads": 128,
                               "smem": 224 * 72 * 2 + 2 * 21 * 22 * 4 * 2 + 2 * 10 * 4 + 7 * 4 * 4 + 16
                               + 4 * 16 * 40 * 2,
                               "mma_step": 16, "loops": [14, 1, 1, 1, "groups", "tables", "stage_rows", "k"]},
    # stage-0 weight gradient: k_rows / 32 x 2 = 14 warps (each 32 K rows x 32 channels, kept in
    # registers across groups); image_wgrad_smem_bytes of a clustered launch (the accumulator
    # exchange, 8 float4 a thread, is larger than the staging buffers). K step = k16 over 128
    # pixels (2 x 4 mma). Loops: two setup loops, then per group: g' rows (128 x 8 / 448),
    # neighbour rows, window staging (42 window rows, 448 / 22 = 20 at a time), K
    "scott_conv_image_wgrad_igemm": {"threads": 448,
                                     "smem": max(128 * 72 * 2 + 2 * 21 * 22 * 4 * 2 + 2 * 10 * 4 + 128 * 4,
                                                 8 * 16 * 448),
                                     "mma_step": 8, "loops": [1, 1, "groups", "g_rows", "tables", "stage_rows", "k"]},
    "scott_neighbour_table": {"threads": 256, "smem": 0, "loops": []},
    "scott_relu_grad_mask": {"threads": 256, "smem": 0, "loops": []},  # only for a standalone gradient op
    # MaxBlurPool: one thread per (tile, pooled pixel, 8-channel vector), fully unrolled: no loops
    "scott_pool_forward": {"threads": 128, "smem": 0, "loops": []},
    "scott_pool_backward": {"threads": 128, "smem": 0, "loops": []},
}

SMS = 132  # the machine model's GPU (codegen.MACHINE)


def _pool_geo(g: dict, stage: int, backward: bool) -> dict:
    """tiled_pool_plan (csrc/pool_ops.h) and the pool launches: one thread per (tile, pooled pixel,
    8-channel vector), 128 per block; the backward's thread writes the pixel's 2 x 2 input pixels."""
    side, c = (8, g["hidden"]) if stage == 0 else (2, g["dim"])
    rows, pooled_rows = (g["rows0"], g["pool0_rows"]) if stage == 0 else (g["rows1"], g["pool1_rows"])
    tasks = pooled_rows * (c // 8)
    return {"blocks": -(-tasks // 128),
            # forward: activation in, pooled out; backward: pooled gradient and activation in, gradient out
            "bytes": 2 * c * ((2 * rows + pooled_rows) if backward else (rows + pooled_rows))}


def _neighbours(g: dict) -> dict:
    # one thread per tile: tile_pos (int64) and the slot table in, 3 x 3 neighbour slots (int32) out
    return {"blocks": -(-g["tiles"] // 256), "bytes": g["tiles"] * (8 + 4 + 9 * 4)}


def _strided_trips(items: int, threads: int) -> tuple[int, float]:
    """A loop `for (i = tid; i < items; i += threads)`: trips of the busiest warp, mean over warps."""
    warps = [max((items - t + threads - 1) // threads if t < items else 0 for t in range(w * 32, w * 32 + 32))
             for w in range(threads // 32)]
    return max(warps), sum(warps) / len(warps)


def _persistent(g: dict, blocks_per_sm: int, k: int, threads: int) -> dict:
    """A persistent image-stage grid over groups of two tiles: the busiest block runs
    ceil(groups / blocks) groups (the issue term's path), the mean one groups / blocks (the
    throughput term and the executed FLOPs). Its window staging (staging_lane in csrc): threads //
    22 staged columns make threads // 22 window rows at a time over the group's 2 x 21 rows; the
    threads past the last full row idle."""
    groups = -(-g["tiles"] // 2)
    blocks = min(groups, blocks_per_sm * SMS)
    width, rows = 16 - 2 + 2 * ((g["kernel"] + 1) // 2), 2 * (16 - 2 + g["kernel"])
    step = threads // width
    per_thread = [((rows - t // width + step - 1) // step if t // width < step else 0) for t in range(threads)]
    warps = [max(per_thread[w * 32:(w + 1) * 32]) for w in range(threads // 32)]
    g_busy, g_mean = _strided_trips(128 * g["hidden"] // 8, threads)  # the wgrad's g' copy
    t_busy, t_mean = _strided_trips(2 * 10, threads)  # the group's tables: 9 slots + base per tile
    return {"blocks": blocks, "k": k, "groups": -(-groups // blocks), "stage_rows": max(warps), "g_rows": g_busy,
            "tables": t_busy,
            "mean": {"groups": groups / blocks, "stage_rows": sum(warps) / len(warps), "g_rows": g_mean,
                     "tables": t_mean}}


def _wgrad_splits(g: dict) -> int:
    """cuda_backend._implicit_wgrad_splits for the stage-1 weight gradient on a 132-SM GPU: about
    one wave of (tap, 64 input channels) x 128 output channel blocks at four per SM, >= 1024 pixels each."""
    blocks = g["kernel"] ** 2 * -(-g["hidden"] // 64) * -(-g["dim"] // 128)
    return max(1, min(-(-g["rows1"] // 1024), -(-4 * SMS // blocks), 65535))


# One entry per kernel launch of the cuda backend at the headline workload, bf16 (the implicit
# GEMM path; the image arrives in the workload dtype): phase, role, kernel pattern (regex on the
# demangled name), geometry from workload_geometry(g): "blocks", the loop counts CUDA_TILES names
# (for the busiest block; "mean" overrides them for the average block), "bytes" (compulsory
# traffic: each tensor the launch touches read or written once, bf16 activations, float32
# partials, the image read once in place). Every conv launch first builds its neighbour table;
# the gradients read g' = relu'(out) * grad as the pool backward before them wrote it (relu_mask), so
# no separate masking launch runs (scott_relu_grad_mask serves only a gradient op called with out).
CUDA_LAUNCHES = [
    ("masked_fwd", "conv0 nbr", r"scott::ig::scott_neighbour_table", _neighbours),
    ("masked_fwd", "conv0 fwd", r"scott_conv_image_igemm<__nv_bfloat16, __nv_bfloat16>",
     lambda g: {**_persistent(g, 4, 224 // 16, 128),
                "bytes": g["image"] + 2 * (224 * g["hidden"] + g["rows0"] * g["hidden"])}),
    ("masked_fwd", "pool0 fwd", r"scott_pool_forward<__nv_bfloat16>", lambda g: _pool_geo(g, 0, False)),
    ("masked_fwd", "conv1 nbr", r"scott::ig::scott_neighbour_table", _neighbours),
    ("masked_fwd", "conv1 fwd", r"scott_conv_fwd_igemm<__nv_bfloat16>",
     lambda g: {"blocks": -(-g["rows1"] // 128) * -(-g["dim"] // 128), "k": g["kernel"] ** 2 * -(-g["hidden"] // 32),
                "bytes": 2 * (g["pool0_rows"] * g["hidden"] + g["k1"] * g["dim"] + g["rows1"] * g["dim"])}),
    ("masked_fwd", "pool1 fwd", r"scott_pool_forward<__nv_bfloat16>", lambda g: _pool_geo(g, 1, False)),
    ("masked_bwd", "pool1 bwd", r"scott_pool_backward<__nv_bfloat16>", lambda g: _pool_geo(g, 1, True)),
    ("masked_bwd", "conv1 nbr", r"scott::ig::scott_neighbour_table", _neighbours),
    ("masked_bwd", "conv1 wgrad", r"scott_conv_wgrad_igemm<__nv_bfloat16>",
     lambda g: {"blocks": g["kernel"] ** 2 * -(-g["hidden"] // 64) * -(-g["dim"] // 128) * _wgrad_splits(g),
                "k": -(-(-(-g["rows1"] // _wgrad_splits(g))) // 32),
                "bytes": 2 * (g["pool0_rows"] * g["hidden"] + g["rows1"] * g["dim"])
                + 4 * _wgrad_splits(g) * g["k1"] * g["dim"]}),
    ("masked_bwd", "conv1 nbr", r"scott::ig::scott_neighbour_table", _neighbours),
    # four parity classes of input pixels (grid z) of a stride-2 7 x 7 kernel: 4x4, 4x3, 3x4, 3x3
    # taps x (384 / 32) channel steps; the busiest class sets the path, the mean the throughput
    ("masked_bwd", "conv1 dgrad", r"scott_conv_dgrad_igemm<__nv_bfloat16>",
     lambda g: {"blocks": 4 * -(-g["in_rows1"] // 4 // 128) * -(-g["hidden"] // 64),
                "k": 16 * -(-g["dim"] // 32), "mean": {"k": (16 + 12 + 12 + 9) / 4 * -(-g["dim"] // 32)},
                "bytes": 2 * (g["rows1"] * g["dim"] + g["k1"] * g["dim"] + g["in_rows1"] * g["hidden"])}),
    ("masked_bwd", "pool0 bwd", r"scott_pool_backward<__nv_bfloat16>", lambda g: _pool_geo(g, 0, True)),
    ("masked_bwd", "conv0 nbr", r"scott::ig::scott_neighbour_table", _neighbours),
    # persistent, one block per SM in clusters of two (sm_90): one float32 (k*k*C_in, C_out)
    # partial per cluster (the pair sums through distributed shared memory), summed afterwards by torch
    ("masked_bwd", "conv0 wgrad", r"scott_conv_image_wgrad_igemm<__nv_bfloat16, __nv_bfloat16>",
     lambda g: {**_persistent(g, 1, 128 // 16, 448),
                "bytes": g["image"] + 2 * g["rows0"] * g["hidden"]
                + 4 * (_persistent(g, 1, 8, 448)["blocks"] // 2) * g["k0"] * g["hidden"]}),
]


def cuda_module() -> Path | None:
    found = sorted((ROOT / "scott_kernels").glob("_C*.so"))
    return found[0] if found else None


def _demangle(names: list[str]) -> dict[str, str]:
    import shutil
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def cuda_rows(args) -> tuple[list[dict], list[dict], list[str]]:
    """(kernel resource rows, launch estimate rows, notes) for the built CUDA module."""
    so = cuda_module()
    if so is None:
        return [], [], ["no built CUDA module (scott_kernels/_C*.so)"]
    usage = codegen.resource_usage(str(so))
    if not usage:
        return [], [], [f"{so.name} holds no GPU code (built without nvcc)"]
    tool = codegen.triton_bin("cuobjdump")
    arch = "sm_90a" if args.arch == 90 else f"sm_{args.arch}"
    # one architecture's machine code only: a module built for several holds each kernel once per
    # architecture under the same name
    text = subprocess.run([tool, "--dump-sass", "-arch", arch, str(so)], capture_output=True, text=True,
                          timeout=600).stdout
    sass = codegen.parse_sass(text)
    names = _demangle(sorted(set(u["name"] for u in usage) | set(sass)))
    kernels = []
    for u in usage:
        if u.get("arch") not in (arch, arch.rstrip("a"), None):
            continue
        s = sass.get(u["name"])
        texts = [t for _, t in s.instructions if not t.startswith("NOP")] if s else []
        kernels.append({"name": u["name"], "demangled": names.get(u["name"], u["name"]), "arch": u.get("arch"),
                        "registers": u.get("REG", 0), "local_bytes": u.get("LOCAL", 0) + u.get("STACK", 0),
                        "shared": u.get("SHARED", 0), "mma": codegen.mma_kind(texts),
                        "spill_instructions": sum(1 for t in texts if codegen.opcode(t).split(".")[0] in ("STL", "LDL"))})
    notes = []
    if not kernels:
        return [], [], [f"{so.name} has no {arch} code"]
    machine = machine_for(args)
    launches = []
    for phase_list, dense in (((("masked_fwd", "masked_bwd")), False), ((("masked_fwd",)), True)):
        g = workload_geometry(196 if dense else None)
        for phase, role, pattern, geometry in CUDA_LAUNCHES:
            if phase not in phase_list:
                continue
            match = [k for k in kernels if re.search(pattern, k["demangled"])]
            if not match:
                notes.append(f"{role}: no kernel matches {pattern!r}")
                continue
            k = match[0]
            row = _cuda_launch_cost(k, sass[k["name"]], geometry(g), machine, role)
            row["phase"] = "dense_fwd" if dense else phase
            stage, op = role.split()
            useful = g[stage] if stage in ("conv0", "conv1") and op in ("fwd", "wgrad", "dgrad") else 0.0
            row["useful_flops"] = useful
            launches.append(row)
    return kernels, launches, notes


def cuda_extras(args) -> dict:
    """The cuda backend's torch ops between its native launches (its Python path run on CPU tensors
    as on an sm_90 GPU, native kernels replaced by counters: launches.stub_native), the native
    calls each phase makes, and its host dispatch time."""
    import contextlib

    if cuda_module() is None:
        return {}
    torch_ops: dict[str, list[dict]] = {}
    profiled = launch_count.profiled(torch_ops)
    out: dict = {"torch_ops": torch_ops, "errors": [], "host": {}}
    with launch_count.stub_native(codegen.TARGETS[90]["sms"]) as stub:
        @contextlib.contextmanager
        def around(phase):
            stub.phase = phase
            with profiled(phase):
                yield
            stub.phase = ""

        try:
            codegen.run_workload(None, args.dtype, batch=args.batch, backend="cuda", phase_context=around)
        except Exception as e:
            out["errors"].append(f"cuda path stopped: {type(e).__name__}: {str(e).strip()[:500]}")
        calls = list(stub.calls)
        if not getattr(args, "no_host", False) and not out["errors"]:
            try:
                out["host"] = launch_count.host_time("cuda", args.dtype, repeats=args.host_repeats)
            except Exception as e:
                out["errors"].append(f"cuda host timing failed: {type(e).__name__}: {str(e).strip()[:500]}")
    # each conv call launches its neighbour table and its GEMM, each pool call one kernel
    per_call = {"conv_relu": 2, "conv_relu_wgrad": 2, "conv_relu_dgrad": 2, "max_blur_pool": 1,
                "max_blur_pool_backward": 1}
    out["native_calls"] = {p: [n for ph, n in calls if ph == p] for p in PHASES}
    out["native_launches"] = {p: sum(per_call[n] for n in names) for p, names in out["native_calls"].items()}
    return out


def every_launch(rows: list[dict], extras: dict, hbm: float, gap: float, kernel_launches: dict | None = None) -> dict:
    """Per phase: the kernels' estimate, the torch ops' bytes at the HBM rate, the launches
    (kernels + torch ops) and their gaps, and the total."""
    out = {}
    for p in PHASES:
        kernels_s = sum(r["estimate_s"] for r in rows if r["phase"] == p)
        n_kernels = (kernel_launches or {}).get(p, sum(1 for r in rows if r["phase"] == p))
        ops = extras.get("torch_ops", {}).get(p, [])
        torch_bytes = sum(o["bytes"] for o in ops)
        n = n_kernels + len(ops)
        out[p] = {"kernels_s": kernels_s, "kernel_launches": n_kernels, "torch_launches": len(ops),
                  "torch_bytes": torch_bytes, "torch_s": torch_bytes / hbm, "launches": n, "gap_s": n * gap,
                  "syncs": sum(1 for o in ops if o["sync"]),
                  "total_s": kernels_s + torch_bytes / hbm + n * gap}
    train = {k: out["masked_fwd"][k] + out["masked_bwd"][k] for k in out["masked_fwd"]}
    out["train"] = train
    return out


def _cuda_launch_cost(k: dict, sass, geo: dict, machine: dict, role: str) -> dict:
    """Issue, memory and tensor-core estimates of one launch: the machine code's loops run the
    trip counts CUDA_TILES names, with the launch geometry's values."""
    family = next((f for f in CUDA_TILES if f in k["demangled"]), None)
    if family is None:
        raise KeyError(f"{role}: no CUDA_TILES entry for {k['demangled'][:80]}")
    tile = CUDA_TILES[family]
    threads = tile["threads"]
    warps = threads // 32
    loops = list(codegen.walk(codegen.find_loops(sass)))
    if len(loops) != len(tile["loops"]):
        raise ValueError(f"{role}: {family} has {len(loops)} loops in its machine code, CUDA_TILES names "
                         f"{len(tile['loops'])}: update CUDA_TILES from the kernel")
    parent = {id(c): l for l in loops for c in l.children}
    own = {id(l): [t for t in codegen._own_instructions(sass, l) if not t.startswith("NOP")] for l in loops}
    inside = set()
    for l in loops:
        inside.update(range(l.start, l.end + 1))
    straight = [t for i, (_, t) in enumerate(sass.instructions) if i not in inside and not t.startswith("NOP")]
    n_mma = lambda ts: sum(1 for t in ts if codegen._is_mma(t))
    flops = lambda ts: sum(codegen.mma_flops(t, warps) for t in ts)

    def trips(values: dict) -> dict:
        out = {}
        for l, spec in zip(loops, tile["loops"]):
            if spec == "k":  # the K loop: the K steps' mma.sync, less any its enclosing code issues itself
                around = own[id(parent[id(l)])] if id(l) in parent else straight
                out[id(l)] = (values["k"] * tile["mma_step"] - n_mma(around)) / n_mma(own[id(l)])
            else:
                out[id(l)] = values[spec] if isinstance(spec, str) else spec
        return out

    position = {id(l): i for i, l in enumerate(loops)}
    share = tile.get("exclusive", {})  # loop position -> n: its body is n cases of which one runs

    def per_warp(values: dict) -> tuple[float, float]:
        """(warp-instructions, tensor FLOPs) of one warp of a block with these loop counts."""
        t = trips(values)
        instr, fl = len(straight), flops(straight)
        for l in loops:
            runs, a = t[id(l)], l
            while id(a) in parent:
                a = parent[id(a)]
                runs *= t[id(a)]
            instr += len(own[id(l)]) / share.get(position[id(l)], 1) * runs
            fl += flops(own[id(l)]) * runs
        return instr, fl

    busiest, _ = per_warp(geo)
    mean, mma_per_warp = per_warp({**geo, **geo.get("mean", {})})
    main = next((l for l, spec in zip(loops, tile["loops"]) if spec == "k"), None)
    main_own = own[id(main)] if main else []
    count = geo.get("count", 1)
    blocks = geo["blocks"]
    occupancy = codegen._resident_programs(k["registers"], warps, k["shared"] + tile.get("smem", geo.get("smem", 0)),
                                           90)
    # a wave lasts as long as its busiest warp's path or its SM's issue work, whichever is longer; a
    # last partial wave (or a grid smaller than one) holds ceil(blocks left / SMs) blocks per SM
    full, tail = divmod(blocks, machine["sms"] * occupancy)
    wave = lambda resident: max(busiest, resident * warps * mean / machine["schedulers"])
    cycles = full * wave(occupancy) + (wave(-(-tail // machine["sms"])) if tail else 0.0)
    issue = count * cycles / machine["clock"]
    mma_s = count * mma_per_warp * warps * blocks / codegen.tensor_rate(machine, straight + [
        t for l in loops for t in own[id(l)]])
    loop_mma = n_mma(main_own)
    memory_s = count * geo.get("bytes", 0.0) / machine["hbm"]
    k_trips = trips(geo)[id(main)] if main else None
    return {"role": role, "kernel": k["demangled"][:90], "registers": k["registers"], "local_bytes": k["local_bytes"],
            "shared": k["shared"] + tile.get("smem", geo.get("smem", 0)), "mma": k["mma"],
            "occupancy": occupancy, "loop_instructions": len(main_own), "loop_mma": loop_mma,
            "instructions_per_mma": len(main_own) / loop_mma if loop_mma else None,
            "loop_loads": codegen.load_widths(main_own), "programs": blocks * count,
            "trips": f"{k_trips:g}" if k_trips is not None else "-",
            "warp_instructions": count * mean * warps * blocks, "issue_s": issue, "mma_s": mma_s,
            "memory_s": memory_s, "estimate_s": max(issue, mma_s, memory_s),
            "mma_flops": count * mma_per_warp * warps * blocks}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _us(s):
    return f"{s * 1e6:.1f}" if s is not None else "-"


def _loads(d):
    return " ".join(f"{k}×{v}" for k, v in d.items()) or "-"


def versions() -> dict:
    import triton
    import torch
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": codegen.tool_version("ptxas"),
            "cuobjdump": codegen.tool_version("cuobjdump"), "nvcc": codegen.tool_version("nvcc"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def sums(rows: list[dict]) -> tuple[float, float]:
    train = sum(r["estimate_s"] for r in rows if r["phase"] in ("masked_fwd", "masked_bwd"))
    dense = sum(r["estimate_s"] for r in rows if r["phase"] == "dense_fwd")
    return train, dense


def _every_launch_section(name: str, totals: dict, extras: dict, gap: float) -> list[str]:
    out = [f"## {name}: every launch (kernels, torch ops between them, {gap * 1e6:.1f} µs gap per launch)\n",
           "| phase | kernels µs | kernel launches | torch launches | torch MB | torch µs (HBM) | syncs | "
           "gap µs | total µs |", "|" + "---|" * 9]
    for p in (*PHASES, "train"):
        t = totals[p]
        label = "fwd+bwd (mask 0.6)" if p == "train" else p
        out.append(f"| {label} | {_us(t['kernels_s'])} | {t['kernel_launches']} | {t['torch_launches']} | "
                   f"{t['torch_bytes'] / 1e6:.1f} | {_us(t['torch_s'])} | {t['syncs']} | {_us(t['gap_s'])} | "
                   f"**{_us(t['total_s'])}** |")
    out.append("\nTorch ops (one launch each; bytes: see launches.op_bytes):\n")
    out.append("| phase | op | tensor shapes | MB |")
    out.append("|---|---|---|---|")
    for p in PHASES:
        for o in extras.get("torch_ops", {}).get(p, []):
            shapes = " ".join("×".join(map(str, s)) or "0-d" for s in o["shapes"][:3])
            out.append(f"| {p} | {o['op']}{' (sync)' if o['sync'] else ''} | {shapes} | {o['bytes'] / 1e6:.2f} |")
    host = extras.get("host") or {}
    if host:
        w = lambda k: host.get(k, float("nan")) * 1e3
        out.append(f"\nHost dispatch (this CPU, launches stubbed, tiny tensors, {args_repeats(extras)} repetitions "
                   f"after warm-up): median CPU time forward {host['fwd'] * 1e3:.3f} ms, forward+backward "
                   f"{host['fwd_bwd'] * 1e3:.3f} ms (median wall time {w('fwd_wall'):.3f} / {w('fwd_bwd_wall'):.3f} "
                   f"ms, fastest {w('fwd_min'):.3f} / {w('fwd_bwd_min'):.3f} ms; load average {_load()}).\n")
    return out


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def args_repeats(extras: dict) -> int:
    return extras.get("host_repeats", 0)


def render(args, info, configs, best, errors, cuda_kernels, cuda_launches, cuda_notes) -> str:
    tf = floor_rate(args.arch)
    rates = TENSOR_RATES.get(args.arch, TENSOR_RATES[90])
    out = []
    target = "sm_90a" if args.arch == 90 else f"sm_{args.arch}"
    out.append(f"# Static cost report (static estimate, not a timing)\n")
    out.append(f"Target {target}; dtype {args.dtype}; workload B=64, 224², 78/196 visible (mask 0.6), D=384, "
               f"hidden 64, k=7; dense forward keep=None. Machine model: 132 SMs × 4 schedulers × 1.98 GHz, "
               f"tensor rates {', '.join(f'{k} {v / 1e12:.0f}' for k, v in rates.items())} TFLOP/s "
               f"(the tensor floor at {tf / 1e12:.0f}), HBM {args.hbm / 1e12:.2f} TB/s "
               f"({'H200' if args.hbm >= 3.2e12 else 'H100'}), {args.launch_gap * 1e6:.1f} µs per launch.")
    out.append(f"Compilers: triton {info['triton']}, ptxas {info['ptxas']}, nvcc {info['nvcc']}; torch {info['torch']}; "
               f"{info['date']}." + (" Configs: first kept config only (--quick)." if args.quick else
                                      f" Configs: every kept config; first kept only for kernels matching "
                                      f"'{args.first_config}'." if args.first_config else " Configs: every kept config."))
    out.append("")
    train = dense = None
    if not args.no_triton:
        out.append("## triton: per kernel (best kept config)\n")
        out.append("| phase | kernel | role | configs | best config | regs | local B | smem KB | MMA | loop loads | "
                   "instr/MMA | trips | issue µs | memory µs | MMA µs | tensor floor µs | estimate µs | est/floor |")
        out.append("|" + "---|" * 18)
        for r in best:
            floor = r["useful_flops"] / tf
            ratio = f"{r['estimate_s'] / floor:.1f}×" if floor else "-"
            ipm = f"{r['instructions_per_mma']:.0f}" if r["instructions_per_mma"] else "-"
            out.append(f"| {r['phase']} | {r['kernel']} | {r['role']} | {r['configs_kept']} | {r['config']} | "
                       f"{r['registers']} | {r['local_bytes']} | {r['shared'] / 1024:.0f} | {r['mma']} | "
                       f"{_loads(r['loop_loads'])} | {ipm} | {r['trips']} | {_us(r['issue_s'])} | {_us(r['memory_s'])} | "
                       f"{_us(r['mma_s'])} | {_us(floor) if floor else '-'} | **{_us(r['estimate_s'])}** | {ratio} |")
        train, dense = sums(best)
        out.append(f"\nSum of kernels: fwd+bwd mask 0.6 **{train * 1e3:.3f} ms**, dense fwd **{dense * 1e3:.3f} ms**.\n")
        extras = getattr(args, "triton_extras", {})
        triton_totals = every_launch(best, extras, args.hbm, args.launch_gap, extras.get("kernel_launches"))
        out += _every_launch_section("triton", triton_totals, dict(extras, host_repeats=args.host_repeats),
                                     args.launch_gap)
        out.append("## triton: every compiled config\n")
        out.append("| phase | kernel | group | config | compile s | regs | local B | spill instr | smem KB | MMA | "
                   "instr/MMA | estimate µs |")
        out.append("|" + "---|" * 12)
        for r in configs:
            if "error" in r:
                out.append(f"| - | {r['kernel']} | - | {r['config']} | {r['compile_s']:.1f} | compile error: "
                           f"{r['error'][:200]} |||||||")
                continue
            ipm = f"{r['instructions_per_mma']:.0f}" if r["instructions_per_mma"] else "-"
            out.append(f"| {r['phase']} | {r['kernel']} | {r['role']} | {r['config']} | {r['compile_s']:.1f} | "
                       f"{r['registers']} | {r['local_bytes']} | {r['spill_instructions']} | {r['shared'] / 1024:.0f} | "
                       f"{r['mma']} | {ipm} | {_us(r['estimate_s'])} |")
        if errors:
            out.append("\nErrors:\n" + "\n".join(f"- {e}" for e in errors))
        out.append("")
    cuda_train = cuda_dense = None
    if cuda_kernels:
        out.append(f"## cuda: module kernels ({target})\n")
        out.append("| kernel | regs | local B | spill instr | static smem B | MMA |")
        out.append("|---|---|---|---|---|---|")
        for k in cuda_kernels:
            if "bfloat16" in k["demangled"] or "tiles" in k["demangled"] or "scott_neighbour" in k["demangled"]:
                out.append(f"| {k['demangled'][:110]} | {k['registers']} | {k['local_bytes']} | "
                           f"{k['spill_instructions']} | {k['shared']} | {k['mma']} |")
        out.append("\n(bf16 and layout kernels shown; every kernel is checked in tests/test_codegen.py.)\n")
        out.append("## cuda: launches at the workload (geometry from CUDA_LAUNCHES)\n")
        out.append("| phase | role | kernel | regs | smem KB | blocks/SM | blocks | K iters | loop loads | instr/MMA | "
                   "issue µs | memory µs | MMA µs | tensor floor µs | estimate µs | est/floor |")
        out.append("|" + "---|" * 16)
        for r in cuda_launches:
            floor = r["useful_flops"] / tf
            ipm = f"{r['instructions_per_mma']:.0f}" if r["instructions_per_mma"] else "-"
            ratio = f"{r['estimate_s'] / floor:.1f}×" if floor else "-"
            out.append(f"| {r['phase']} | {r['role']} | {r['kernel'][:60]} | {r['registers']} | "
                       f"{r['shared'] / 1024:.1f} | {r['occupancy']} | {r['programs']} | {r['trips']} | "
                       f"{_loads(r['loop_loads'])} | {ipm} | {_us(r['issue_s'])} | {_us(r['memory_s'])} | "
                       f"{_us(r['mma_s'])} | "
                       f"{_us(floor) if floor else '-'} | **{_us(r['estimate_s'])}** | {ratio} |")
        cuda_train, cuda_dense = sums(cuda_launches)
        out.append(f"\nSum: fwd+bwd mask 0.6 **{cuda_train * 1e3:.3f} ms**, dense fwd **{cuda_dense * 1e3:.3f} ms**.\n")
        extras = getattr(args, "cuda_extras", {})
        table = {p: sum(1 for l in cuda_launches if l["phase"] == p) for p in PHASES}
        cuda_totals = every_launch(cuda_launches, extras, args.hbm, args.launch_gap)
        out += _every_launch_section("cuda", cuda_totals, dict(extras, host_repeats=args.host_repeats),
                                     args.launch_gap)
        for e in extras.get("errors", []):
            out.append(f"- cuda: {e}")
        if extras.get("native_launches") and extras["native_launches"] != table:
            out.append(f"- cuda: the code path's native calls make {extras['native_launches']} launches, "
                       f"CUDA_LAUNCHES lists {table}: update CUDA_LAUNCHES")
    for n in cuda_notes:
        out.append(f"- cuda: {n}")
    out.append("")
    closing = []
    if train is not None:
        closing.append(("triton", triton_totals, getattr(args, "triton_extras", {}).get("host") or {}))
    if cuda_train is not None:
        closing.append(("cuda", cuda_totals, getattr(args, "cuda_extras", {}).get("host") or {}))
    if closing:
        out += targets_section(closing)
    for name, totals, host in closing:
        out.append(closing_line(name, totals, host))
    return "\n".join(out)


def closing_line(name: str, totals: dict, host: dict) -> str:
    h = f"{host['fwd_bwd'] * 1e3:.3f}" if host.get("fwd_bwd") is not None else "-"
    return (f"static estimate {name}: fwd+bwd mask 0.6 {totals['train']['total_s'] * 1e3:.3f} ms, "
            f"dense fwd {totals['dense_fwd']['total_s'] * 1e3:.3f} ms, launches {totals['train']['launches']}, "
            f"host {h} ms")


CLOSING = re.compile(r"^static estimate (\w+): fwd\+bwd mask 0\.6 ([\d.]+) ms, dense fwd ([\d.]+) ms, "
                     r"launches (\d+), host ([\d.]+|-) ms$")


def targets_section(closing) -> list[str]:
    """The figures against the targets: best fwd+bwd <= 0.36 ms with every launch counted, at most
    10 launches per fwd+bwd for triton, host dispatch below the backend's GPU estimate."""
    out = ["## Against the targets (static estimates; host times measured on this CPU)\n"]
    best_name, best = min(((n, t["train"]["total_s"]) for n, t, _ in closing), key=lambda x: x[1])
    out.append(f"- best fwd+bwd at mask 0.6, every launch counted: {best_name} {best * 1e3:.3f} ms "
               f"(target <= 0.36 ms): {'met' if best <= 0.36e-3 else 'NOT met'}")
    for name, totals, host in closing:
        n = totals["train"]["launches"]
        if name == "triton":
            out.append(f"- triton launches per fwd+bwd: {n} (target <= 10): {'met' if n <= 10 else 'NOT met'}")
        if host.get("fwd_bwd") is not None:
            gpu = totals["train"]["total_s"]
            out.append(f"- {name} host dispatch per fwd+bwd {host['fwd_bwd'] * 1e3:.3f} ms vs its GPU estimate "
                       f"{gpu * 1e3:.3f} ms: {'met' if host['fwd_bwd'] < gpu else 'NOT met'} (eager time is at best "
                       f"the larger: {max(gpu, host['fwd_bwd']) * 1e3:.3f} ms)")
    out.append("")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, choices=ARCHS)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--quick", action="store_true", help="first kept config of every autotuned kernel")
    p.add_argument("--first-config", default=None, metavar="REGEX",
                   help="first kept config only for kernels whose name matches")
    p.add_argument("--batch", type=int, default=None, help="batch (default 64, the headline workload)")
    p.add_argument("--hbm", type=float, default=3.3e12, help="HBM bytes/s (3.3e12 H200, 2.98e12 H100)")
    p.add_argument("--json", default=None, help="write every row as JSON here")
    p.add_argument("--launch-gap", type=float, default=LAUNCH_GAP, help="GPU seconds per dependent launch")
    p.add_argument("--no-host", action="store_true", help="skip the host dispatch timing")
    p.add_argument("--host-repeats", type=int, default=40, help="timed repetitions of the host dispatch")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA module")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton compiles (the CUDA module only)")
    p.add_argument("--cache-dir", default=os.environ.get("SCOTT_STATIC_CACHE"),
                   help="Triton cache directory for these compiles (default: Triton's own)")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":  # compiled kernels need the real JIT
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    sys.path.insert(0, str(ROOT))
    info = versions()
    configs, best, errors = ([], [], []) if args.no_triton else triton_rows(args)
    cuda_kernels, cuda_launches, cuda_notes = ([], [], ["skipped (--no-cuda)"]) if args.no_cuda else cuda_rows(args)
    if cuda_launches and args.arch == 90:
        args.cuda_extras = cuda_extras(args)
    text = render(args, info, configs, best, errors, cuda_kernels, cuda_launches, cuda_notes)
    print(text)
    if args.json:
        extras = {k: getattr(args, k) for k in ("triton_extras", "cuda_extras") if hasattr(args, k)}
        plain = {k: v for k, v in vars(args).items() if k not in extras}
        closing = [CLOSING.match(l).groups() for l in text.splitlines() if CLOSING.match(l)]
        with open(args.json, "w") as f:
            json.dump({"args": plain, "versions": info, "configs": configs, "kernels": best, "errors": errors,
                       "cuda_kernels": cuda_kernels, "cuda_launches": cuda_launches, "cuda_notes": cuda_notes,
                       "tensor_rates": TENSOR_RATES, **extras,
                       "closing": [{"backend": b, "train_ms": float(x), "dense_ms": float(y), "launches": int(n),
                                    "host_ms": None if h == "-" else float(h)} for b, x, y, n, h in closing]},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
