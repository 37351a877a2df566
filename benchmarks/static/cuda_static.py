"""The CUDA module's half of the static report: per-kernel tiles and the launches of the headline
workload (the tables to update when the kernels in csrc/ change), read against the nvcc-built
module's machine code; and every launch of a phase with its gaps (see static_cost.py)."""

from __future__ import annotations

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
    # one block per image row: chunks of 256 patches (the scan's 8 steps unrolled in each), then the
    # missing tiles of a short row and the optional neighbour table (neither runs at the workload)
    "scott_visible_tables": {"threads": 256, "smem": 0, "loops": ["chunks", "fill", "nbr"]},
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


def _visible_tables(g: dict) -> dict:
    # one block per image: the row's keep mask (bytes) in, its slots (int32) and tile positions
    # (int64) out; every row holds num_visible patches, so no missing tile is filled, and the
    # tokenizer asks for no neighbour table
    h = codegen.HEADLINE
    n = (h["image"] // h["patch"]) ** 2
    return {"blocks": h["batch"], "chunks": -(-n // 256), "fill": 0, "nbr": 0,
            "bytes": h["batch"] * n * (1 + 4) + g["tiles"] * 8}


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
    # the tables from the mask, given num_visible (a dense forward has none: MASKED_ONLY)
    ("masked_fwd", "tables visible", r"scott::ig::scott_visible_tables", _visible_tables),
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

# the roles of CUDA_LAUNCHES's masked forward that a dense forward (keep=None) does not launch
MASKED_ONLY = {"tables visible"}


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
            if phase not in phase_list or (dense and role in MASKED_ONLY):
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
    # each conv call launches its neighbour table and its GEMM, each pool call one kernel, the
    # tables one
    per_call = {"conv_relu": 2, "conv_relu_wgrad": 2, "conv_relu_dgrad": 2, "max_blur_pool": 1,
                "max_blur_pool_backward": 1, "visible_tables": 1}
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
