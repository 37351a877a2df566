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
Every program of a launch is charged program (0, 0, 0)'s loop trips and the instructions of both
sides of every branch: a kernel whose programs do different work is overcharged (the weight
gradients' last-split sums, for one, are charged to every split), so the kernels are written with
programs that run the same code where that costs the GPU nothing (the fused last pool).

Tensor rates (dense 16-bit inputs, FP32 accumulate; TENSOR_RATES, per target and SASS class):
  sm_90 HGMMA (wgmma)    790e12  a plain bf16 GEMM measured at 780 TFLOP/s on an H100 (the
                                 project's own measurement, design notes section 3; cuBLAS issues
                                 wgmma there); NVIDIA's dense peak is 989.5e12.
  sm_90 HMMA (mma.sync)  540e12  0.684 x the wgmma rate: the ratio of two runs of the published
                                 microbenchmarks of Luo, Fan, Li, Du, Wang, Chu, "Benchmarking and
                                 Dissecting the Nvidia Hopper GPU Architecture" (IPDPS 2024,
                                 arXiv:2402.13499; code HPMLL/NVIDIA-Hopper-Benchmark) on an H100
                                 SXM5 (CUDA 12.9; raw logs in github.com/Johnsonms/NVIDIA-Hopper-
                                 Benchmark, reproduction/H100-dapperdingo/raw, a third party's run,
                                 not refereed): mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
                                 at ILP 4, 8-32 warps per SM, "Throughput(whole kernel) : 668.011
                                 TFLOPS" (mma_m16n8k16.log), against wgmma SM90_64xNx16_F32F16F16,
                                 N = 256, "976.599TFLOPS" (zero operands, A in registers; 901.9
                                 with random operands, wgmma_fp16.log): 668 / 976.6 = 0.684, applied
                                 to the 790e12 wgmma rate above. The paper itself (H800 PCIe) puts
                                 mma at 62.9% of peak on average (read in two summaries of it, not in
                                 the paper's tables), 0.65 x wgmma's 96%: the same range. Earlier
                                 reports used 0.5 (an assumption), which was harsher on the cuda
                                 backend's mma.sync GEMMs.
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
returns at once; cuda: the native calls are counters), timed in 10 blocks of ``--host-repeats``
(20) calls each, 0.3 s apart, after 5 warm-up calls, garbage collection off as in timeit; the
figure is the lowest block median (timeit's practice: on this shared machine other work slows
every call for seconds at a time, by up to 2x; the report also gives the median over every
call). What is timed: Python, the torch dispatcher, the autograd layers, the custom-op layers
where a call is dispatched (a plain eager triton call runs its two ops' bodies directly: see
``_device.dispatch_free``; from its second step it replays the launch plan recorded for its
signature, ``scott_kernels._replay``, which the report also times switched off), the Triton JIT's
binding and cache/autotuner look-ups. The figure is the process's CPU time (what the dispatch costs a core of
its own); the report also gives the wall time, which on a shared machine adds the waits for a
core. Not included: the driver's own launch call (cuLaunchKernel
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
import json
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

from static_model import *  # noqa: E402,F401,F403
from cuda_static import *  # noqa: E402,F401,F403

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
                bodies = launch_count.host_time("triton", args.dtype, repeats=args.host_repeats, plans=False)
                host.update({f"{k}_bodies": v for k, v in bodies.items()})
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
        out.append(f"\nHost dispatch (this CPU, launches stubbed, tiny tensors, 10 blocks of {args_repeats(extras)} "
                   f"calls 0.3 s apart, after warm-up): CPU time, lowest block median, forward {host['fwd'] * 1e3:.3f} ms, "
                   f"forward+backward {host['fwd_bwd'] * 1e3:.3f} ms (median over every call {w('fwd_median'):.3f} / "
                   f"{w('fwd_bwd_median'):.3f} ms; median wall time {w('fwd_wall'):.3f} / {w('fwd_bwd_wall'):.3f} "
                   f"ms, fastest {w('fwd_min'):.3f} / {w('fwd_bwd_min'):.3f} ms; load average {_load()}).\n")
        if "fwd_bwd_bodies" in host:
            out.append(f"The steps replay the launch plans recorded for their signature (scott_kernels._replay); "
                       f"the op bodies' own Python, plans off, timed the same way: forward {w('fwd_bodies'):.3f} ms, "
                       f"forward+backward {w('fwd_bwd_bodies'):.3f} ms.\n")
    return out


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def args_repeats(extras: dict) -> int:
    return extras.get("host_repeats", 0)


def _instr_per_mma(r: dict) -> str:
    return f"{r['instructions_per_mma']:.0f}" if r["instructions_per_mma"] else "-"


def _cost_cells(r: dict, floor_rate: float) -> str:
    """The issue | memory | MMA | tensor floor | estimate | est/floor cells of a kernel row."""
    floor = r["useful_flops"] / floor_rate
    ratio = f"{r['estimate_s'] / floor:.1f}×" if floor else "-"
    return (f"{_us(r['issue_s'])} | {_us(r['memory_s'])} | {_us(r['mma_s'])} | {_us(floor) if floor else '-'} | "
            f"**{_us(r['estimate_s'])}** | {ratio}")


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
            out.append(f"| {r['phase']} | {r['kernel']} | {r['role']} | {r['configs_kept']} | {r['config']} | "
                       f"{r['registers']} | {r['local_bytes']} | {r['shared'] / 1024:.0f} | {r['mma']} | "
                       f"{_loads(r['loop_loads'])} | {_instr_per_mma(r)} | {r['trips']} | {_cost_cells(r, tf)} |")
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
            out.append(f"| {r['phase']} | {r['kernel']} | {r['role']} | {r['config']} | {r['compile_s']:.1f} | "
                       f"{r['registers']} | {r['local_bytes']} | {r['spill_instructions']} | {r['shared'] / 1024:.0f} | "
                       f"{r['mma']} | {_instr_per_mma(r)} | {_us(r['estimate_s'])} |")
        if errors:
            out.append("\nErrors:\n" + "\n".join(f"- {e}" for e in errors))
        out.append("")
    cuda_train = cuda_dense = None
    if cuda_kernels:
        out.append(f"## cuda: module kernels ({target})\n")
        out.append("| kernel | regs | local B | spill instr | static smem B | MMA |")
        out.append("|---|---|---|---|---|---|")
        for k in cuda_kernels:
            if "bfloat16" in k["demangled"] or "tiles" in k["demangled"] or "scott_neighbour" in k["demangled"] \
                    or "scott_visible" in k["demangled"]:
                out.append(f"| {k['demangled'][:110]} | {k['registers']} | {k['local_bytes']} | "
                           f"{k['spill_instructions']} | {k['shared']} | {k['mma']} |")
        out.append("\n(bf16 and layout kernels shown; every kernel is checked in tests/test_codegen.py.)\n")
        out.append("## cuda: launches at the workload (geometry from CUDA_LAUNCHES)\n")
        out.append("| phase | role | kernel | regs | smem KB | blocks/SM | blocks | K iters | loop loads | instr/MMA | "
                   "issue µs | memory µs | MMA µs | tensor floor µs | estimate µs | est/floor |")
        out.append("|" + "---|" * 16)
        for r in cuda_launches:
            out.append(f"| {r['phase']} | {r['role']} | {r['kernel'][:60]} | {r['registers']} | "
                       f"{r['shared'] / 1024:.1f} | {r['occupancy']} | {r['programs']} | {r['trips']} | "
                       f"{_loads(r['loop_loads'])} | {_instr_per_mma(r)} | {_cost_cells(r, tf)} |")
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
    p.add_argument("--host-repeats", type=int, default=20,
                   help="timed calls in each of the host dispatch's 10 blocks")
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
