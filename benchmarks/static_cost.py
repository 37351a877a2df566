"""Static machine-code cost report: a STATIC ESTIMATE from compiled code, not a timing.

    python benchmarks/static_cost.py [--arch 90|80] [--quick] [--first-config REGEX]
                                     [--dtype bfloat16] [--json OUT.json] [--no-cuda]

Triton backend. The real code path, ``sparse_conv_tokenize(..., backend="triton")`` forward and
backward at the headline workload (bf16, B=64, 224², 78 of 196 patches visible per image, D=384,
hidden 64, 7×7 kernels) and the dense forward (``keep=None``), runs on CPU tensors with Triton's
driver replaced by a fake GPU (``scott_kernels.codegen``): every launch compiles exactly as on a
GPU of the chosen target, and each autotuned kernel is compiled with every config its autotuner
keeps after pruning (``--quick``: the first kept config; ``--first-config REGEX``: the first kept
config for kernels whose name matches). Kernels and configs are discovered, not listed here.

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
  mma    = executed tensor-core FLOPs (padding included) / 790e12 FLOP/s (tf32: half)
  estimate = max(issue, memory, mma); the kernel's tensor floor is the useful FLOPs of the
           convolution it computes / 790e12.

A loop body is counted statically: both sides of a branch inside it count, which overcounts
where a loop branches (predicated Triton loops rarely do; the CUDA loaders' 64-bit division fast
and slow paths do). Per autotuned kernel the best kept config is taken (what a perfect autotuner
would pick). Sums
per backend: one forward+backward at mask 0.6, and the dense forward. Only the kernels are
counted (not the torch ops between them: table builds, the weight gradient's partial sum, the
token scatter). It is a lower bound in spirit: no latency, cache misses or bank conflicts.

CUDA backend (the nvcc-built ``scott_kernels/_C*.so``, sm_90a): registers, spills and shared
memory from ``cuobjdump --dump-resource-usage``; SASS from ``--dump-sass``. A compiled module has
no record of its launches, so :data:`CUDA_LAUNCHES` maps each launch of the headline workload to
a kernel (a regular expression on the demangled name), its compulsory bytes and its geometry: GEMM dimensions
(M, N, K, reduction splits) from which blocks and K-loop iterations follow with the tile sizes in
:data:`CUDA_TILES`, or the element count of an elementwise kernel. When the CUDA kernels change,
update those two tables from the launch code in csrc/ (a pattern that matches no kernel is
reported as such, not skipped silently).

The report ends with one line per backend a script can read:
    static estimate <backend>: fwd+bwd mask 0.6 <X> ms, dense fwd <Y> ms
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

ROOT = Path(__file__).resolve().parents[1]

PHASES = ("masked_fwd", "masked_bwd", "dense_fwd")


# --------------------------------------------------------------------------------------------
# The workload's useful convolution FLOPs, per GEMM role
# --------------------------------------------------------------------------------------------
def workload_geometry(visible: int | None = None) -> dict:
    from scott_kernels.codegen import HEADLINE as h
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
    from scott_kernels import codegen

    quick = (lambda name: True) if args.quick else (
        (lambda name: re.search(args.first_config, name) is not None) if args.first_config else (lambda name: False))
    with codegen.fake_gpu(args.arch, first_config_only=quick, cache_dir=args.cache_dir) as rec:
        errors = []
        try:
            codegen.run_workload(rec, args.dtype, batch=args.batch)
        except Exception as e:  # report what compiled, and why the path stopped
            errors.append(f"workload stopped at {rec.loading or '?'}: {type(e).__name__}: {str(e).strip()[:1000]}")
        # a config the autotuner skipped (it ranks last) is reported, not an error of the path
        skipped = list(rec.errors)
        records = list(rec.records)
    errors += [f"config skipped by the autotuner: {e}" for e in skipped]
    machine = dict(codegen.MACHINE, hbm=args.hbm)
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
    from scott_kernels.codegen import tunables
    tunable = tunables().get(record.name, set())
    return ",".join(f"{k}={v}" for k, v in sorted(record.constexprs.items()) if k not in tunable)


# --------------------------------------------------------------------------------------------
# CUDA module
# --------------------------------------------------------------------------------------------
# Tile geometry of each kernel family in csrc/ (update with the kernels): rows x cols x K per
# block and threads per block; for elementwise kernels only the threads per block.
# "inner_trips": iterations, per K step, of each loop nested in the K loop, in address order
# (today's loaders: one thread loads BM*BK/threads elements of A, then BK*BN/threads of B).
CUDA_TILES = {
    "wmma_gemm_kernel": {"BM": 128, "BN": 64, "BK": 32, "threads": 256, "inner_trips": [16, 8]},
    "gather_gemm_kernel": {"BM": 64, "BN": 64, "BK": 16, "threads": 256, "inner_trips": [4, 4]},
    "elementwise_kernel": {"threads": 256},
}

# One entry per launch of the cuda backend at the headline workload, bf16 (the dtype picks the
# WMMA path): phase, role, kernel pattern (regex on the demangled name), geometry from
# workload_geometry(g). A GEMM: M, N, K, splits (grid z; each split runs ceil(K/splits) of K).
# "count": launches of that geometry (the input gradient is four parity-class launches).
CUDA_LAUNCHES = [
    ("masked_fwd", "conv0 fwd", r"wmma_gemm_kernel<__nv_bfloat16, scott::ConvWindow<__nv_bfloat16",
     lambda g: {"M": g["rows0"], "N": g["hidden"], "K": g["k0"],
                "bytes": g["image"] + 2 * (g["k0"] * g["hidden"] + g["rows0"] * g["hidden"])}),
    ("masked_fwd", "pool0 fwd", r"elementwise_kernel<__nv_bfloat16, float, .*PoolForward",
     lambda g: {"elements": g["pool0_rows"] * g["hidden"], "bytes": 2 * (g["rows0"] + g["pool0_rows"]) * g["hidden"]}),
    ("masked_fwd", "conv1 fwd", r"wmma_gemm_kernel<__nv_bfloat16, scott::ConvWindow<__nv_bfloat16",
     lambda g: {"M": g["rows1"], "N": g["dim"], "K": g["k1"],
                "bytes": 2 * (g["pool0_rows"] * g["hidden"] + g["k1"] * g["dim"] + g["rows1"] * g["dim"])}),
    ("masked_fwd", "pool1 fwd", r"elementwise_kernel<__nv_bfloat16, float, .*PoolForward",
     lambda g: {"elements": g["pool1_rows"] * g["dim"], "bytes": 2 * (g["rows1"] + g["pool1_rows"]) * g["dim"]}),
    ("masked_bwd", "pool1 bwd", r"elementwise_kernel<__nv_bfloat16, float, .*PoolBackward",
     lambda g: {"elements": g["rows1"] * g["dim"], "bytes": 2 * (2 * g["rows1"] + g["pool1_rows"]) * g["dim"]}),
    ("masked_bwd", "conv1 wgrad", r"wmma_gemm_kernel<__nv_bfloat16, .*Transposed<scott::ConvWindow<__nv_bfloat16",
     lambda g: {"M": g["k1"], "N": g["dim"], "K": g["rows1"], "splits": _splits(g["rows1"], g["k1"], g["dim"]),
                "bytes": 2 * (g["pool0_rows"] * g["hidden"] + 2 * g["rows1"] * g["dim"])
                + 4 * _splits(g["rows1"], g["k1"], g["dim"]) * g["k1"] * g["dim"]}),
    ("masked_bwd", "conv1 dgrad", r"wmma_gemm_kernel<__nv_bfloat16, scott::ReluGradWindow",
     lambda g: {"M": g["in_rows1"] // 4, "N": g["hidden"], "K": ((g["kernel"] + 1) // 2) ** 2 * g["dim"],
                "count": 4, "bytes": 2 * (2 * g["rows1"] * g["dim"] + g["k1"] * g["dim"] + g["in_rows1"] * g["hidden"]) / 4}),
    ("masked_bwd", "pool0 bwd", r"elementwise_kernel<__nv_bfloat16, float, .*PoolBackward",
     lambda g: {"elements": g["rows0"] * g["hidden"], "bytes": 2 * (2 * g["rows0"] + g["pool0_rows"]) * g["hidden"]}),
    ("masked_bwd", "conv0 wgrad", r"wmma_gemm_kernel<__nv_bfloat16, .*Transposed<scott::ConvWindow<__nv_bfloat16",
     lambda g: {"M": g["k0"], "N": g["hidden"], "K": g["rows0"], "splits": _splits(g["rows0"], g["k0"], g["hidden"]),
                "bytes": g["image"] + 2 * 2 * g["rows0"] * g["hidden"]
                + 4 * _splits(g["rows0"], g["k0"], g["hidden"]) * g["k0"] * g["hidden"]}),
]
# ("bytes": compulsory traffic of one launch, bf16 activations, float32 partials: each tensor the
# launch touches read or written once; the image stage reads the whole image in place.)


def _splits(rows, k_total, c_out, min_rows=1024):
    """The cuda backend's weight-gradient split on a 132-SM GPU (scott_kernels.compact)."""
    from scott_kernels import compact
    saved = compact._multiprocessors
    compact._multiprocessors = lambda index: 132
    try:
        import torch
        return compact.reduction_splits(rows, k_total, c_out, torch.device("cuda", 0), min_rows=min_rows)
    finally:
        compact._multiprocessors = saved


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
    from scott_kernels import codegen
    so = cuda_module()
    if so is None:
        return [], [], ["no built CUDA module (scott_kernels/_C*.so)"]
    usage = codegen.resource_usage(str(so))
    if not usage:
        return [], [], [f"{so.name} holds no GPU code (built without nvcc)"]
    tool = codegen.triton_bin("cuobjdump")
    text = subprocess.run([tool, "--dump-sass", str(so)], capture_output=True, text=True, timeout=600).stdout
    sass = codegen.parse_sass(text)
    names = _demangle(sorted(set(u["name"] for u in usage) | set(sass)))
    arch = "sm_90a" if args.arch == 90 else f"sm_{args.arch}"
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
    machine = dict(codegen.MACHINE, hbm=args.hbm)
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
            useful = {"conv0": g["conv0"], "conv1": g["conv1"]}.get(role.split()[0], 0.0)
            row["useful_flops"] = useful
            launches.append(row)
    return kernels, launches, notes


def _cuda_launch_cost(k: dict, sass, geo: dict, machine: dict, role: str) -> dict:
    from scott_kernels import codegen
    family = next((f for f in CUDA_TILES if k["demangled"].startswith(f"void ") and f in k["demangled"]), None)
    tile = CUDA_TILES[family]
    threads = tile["threads"]
    warps = threads // 32
    roots = codegen.find_loops(sass)
    loops = list(codegen.walk(roots))
    mma_loops = [l for l in loops if any(codegen._is_mma(t) for t in codegen._own_instructions(sass, l))]
    main = max(mma_loops or loops, key=lambda l: len(codegen._own_instructions(sass, l)), default=None)
    own = codegen._own_instructions(sass, main) if main else []
    # the K step's loops nested in it run inner_trips times each (CUDA_TILES)
    trips = tile.get("inner_trips", [])
    inner = list(codegen.walk(main.children)) if main else []
    own = own + [t for i, child in enumerate(inner)
                 for t in codegen._own_instructions(sass, child) * (trips[i] if i < len(trips) else 1)]
    outside = [t for i, (_, t) in enumerate(sass.instructions)
               if not (main and main.start <= i <= main.end) and not t.startswith("NOP")]
    count = geo.get("count", 1)
    if "M" in geo:
        splits = geo.get("splits", 1)
        blocks = -(-geo["M"] // tile["BM"]) * -(-geo["N"] // tile["BN"]) * splits
        k_chunk = -(-(-(-geo["K"] // splits)) // tile["BK"]) * tile["BK"]
        iters = k_chunk // tile["BK"]
    else:
        blocks = -(-geo["elements"] // threads)
        iters = 1  # the grid covers the elements: one pass through the grid-stride loop
    per_warp = len(outside) + len(own) * iters  # code outside the main loop counted once
    mma_per_warp = sum(codegen.mma_flops(t, warps) for t in own) * iters + sum(
        codegen.mma_flops(t, warps) for t in outside)
    occupancy = codegen._resident_programs(k["registers"], warps, k["shared"], 90)
    waves = -(-blocks // (machine["sms"] * occupancy))
    issue = count * waves * max(per_warp, occupancy * warps * per_warp / machine["schedulers"]) / machine["clock"]
    mma_s = count * mma_per_warp * warps * blocks / machine["tensor_flops"]
    loop_mma = sum(1 for t in own if codegen._is_mma(t))
    memory_s = count * geo.get("bytes", 0.0) / machine["hbm"]
    return {"role": role, "kernel": k["demangled"][:90], "registers": k["registers"], "local_bytes": k["local_bytes"],
            "shared": k["shared"], "mma": k["mma"], "loop_instructions": len(own), "loop_mma": loop_mma,
            "instructions_per_mma": len(own) / loop_mma if loop_mma else None,
            "loop_loads": codegen.load_widths(own), "programs": blocks * count, "trips": iters,
            "warp_instructions": count * per_warp * warps * blocks, "issue_s": issue, "mma_s": mma_s,
            "memory_s": memory_s, "estimate_s": max(issue, mma_s, memory_s), "mma_flops": count * mma_per_warp * warps * blocks}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _us(s):
    return f"{s * 1e6:.1f}" if s is not None else "-"


def _loads(d):
    return " ".join(f"{k}×{v}" for k, v in d.items()) or "-"


def versions() -> dict:
    from scott_kernels import codegen
    import triton
    import torch
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": codegen.tool_version("ptxas"),
            "cuobjdump": codegen.tool_version("cuobjdump"), "nvcc": codegen.tool_version("nvcc"),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def sums(rows: list[dict]) -> tuple[float, float]:
    train = sum(r["estimate_s"] for r in rows if r["phase"] in ("masked_fwd", "masked_bwd"))
    dense = sum(r["estimate_s"] for r in rows if r["phase"] == "dense_fwd")
    return train, dense


def render(args, info, configs, best, errors, cuda_kernels, cuda_launches, cuda_notes) -> str:
    tf = 790e12
    out = []
    target = {90: "sm_90a", 80: "sm_80"}[args.arch]
    out.append(f"# Static cost report (static estimate, not a timing)\n")
    out.append(f"Target {target}; dtype {args.dtype}; workload B=64, 224², 78/196 visible (mask 0.6), D=384, "
               f"hidden 64, k=7; dense forward keep=None. Machine model: 132 SMs × 4 schedulers × 1.98 GHz, "
               f"{tf / 1e12:.0f} TFLOP/s tensor, HBM {args.hbm / 1e12:.2f} TB/s "
               f"({'H200' if args.hbm >= 3.2e12 else 'H100'}).")
    out.append(f"Compilers: triton {info['triton']}, ptxas {info['ptxas']}, nvcc {info['nvcc']}; torch {info['torch']}; "
               f"{info['date']}." + (" Configs: first kept config only (--quick)." if args.quick else
                                      f" Configs: every kept config; first kept only for kernels matching "
                                      f"'{args.first_config}'." if args.first_config else " Configs: every kept config."))
    out.append("")
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
            if "bfloat16" in k["demangled"] or "PoolForward<__nv" in k["demangled"] or "tiles" in k["demangled"]:
                out.append(f"| {k['demangled'][:110]} | {k['registers']} | {k['local_bytes']} | "
                           f"{k['spill_instructions']} | {k['shared']} | {k['mma']} |")
        out.append("\n(bf16 and layout kernels shown; every kernel is checked in tests/test_codegen.py.)\n")
        out.append("## cuda: launches at the workload (geometry from CUDA_LAUNCHES)\n")
        out.append("| phase | role | kernel | blocks | K iters | loop loads | instr/MMA | issue µs | memory µs | "
                   "MMA µs | tensor floor µs | estimate µs | est/floor |")
        out.append("|" + "---|" * 13)
        for r in cuda_launches:
            floor = r["useful_flops"] / tf
            ipm = f"{r['instructions_per_mma']:.0f}" if r["instructions_per_mma"] else "-"
            ratio = f"{r['estimate_s'] / floor:.1f}×" if floor else "-"
            out.append(f"| {r['phase']} | {r['role']} | {r['kernel'][:60]} | {r['programs']} | {r['trips']} | "
                       f"{_loads(r['loop_loads'])} | {ipm} | {_us(r['issue_s'])} | {_us(r['memory_s'])} | "
                       f"{_us(r['mma_s'])} | "
                       f"{_us(floor) if floor else '-'} | **{_us(r['estimate_s'])}** | {ratio} |")
        cuda_train, cuda_dense = sums(cuda_launches)
        out.append(f"\nSum: fwd+bwd mask 0.6 **{cuda_train * 1e3:.3f} ms**, dense fwd **{cuda_dense * 1e3:.3f} ms**.\n")
    for n in cuda_notes:
        out.append(f"- cuda: {n}")
    out.append("")
    out.append(f"static estimate triton: fwd+bwd mask 0.6 {train * 1e3:.3f} ms, dense fwd {dense * 1e3:.3f} ms")
    if cuda_train is not None:
        out.append(f"static estimate cuda: fwd+bwd mask 0.6 {cuda_train * 1e3:.3f} ms, dense fwd {cuda_dense * 1e3:.3f} ms")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, choices=(90, 80))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--quick", action="store_true", help="first kept config of every autotuned kernel")
    p.add_argument("--first-config", default=None, metavar="REGEX",
                   help="first kept config only for kernels whose name matches")
    p.add_argument("--batch", type=int, default=None, help="batch (default 64, the headline workload)")
    p.add_argument("--hbm", type=float, default=3.3e12, help="HBM bytes/s (3.3e12 H200, 2.98e12 H100)")
    p.add_argument("--json", default=None, help="write every row as JSON here")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA module")
    p.add_argument("--cache-dir", default=os.environ.get("SCOTT_STATIC_CACHE"),
                   help="Triton cache directory for these compiles (default: Triton's own)")
    args = p.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":  # compiled kernels need the real JIT
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    sys.path.insert(0, str(ROOT))
    info = versions()
    configs, best, errors = triton_rows(args)
    cuda_kernels, cuda_launches, cuda_notes = ([], [], ["skipped (--no-cuda)"]) if args.no_cuda else cuda_rows(args)
    print(render(args, info, configs, best, errors, cuda_kernels, cuda_launches, cuda_notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "versions": info, "configs": configs, "kernels": best, "errors": errors,
                       "cuda_kernels": cuda_kernels, "cuda_launches": cuda_launches, "cuda_notes": cuda_notes},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
