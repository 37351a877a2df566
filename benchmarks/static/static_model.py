"""The static report's model of the workload and the machine: phases, per-target tensor rates by
instruction class, the launch gap, the workload's geometry and the useful FLOPs of each GEMM role
(see static_cost.py's docstring for how they are used and where the figures come from)."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(HERE) not in sys.path:  # codegen sits next to this script
    sys.path.insert(0, str(HERE))

import codegen  # noqa: E402  (imports triton and scott_kernels lazily)


PHASES = ("masked_fwd", "masked_bwd", "dense_fwd")

# Dense 16-bit tensor-core FLOP/s per target and SASS instruction class (HGMMA = wgmma, HMMA =
# mma.sync); TF32 runs at half. Sources and assumptions in the module docstring ("Tensor rates").
TENSOR_RATES = {
    90: {"HGMMA": 790e12, "HMMA": 540e12},   # mma.sync at 0.684 x wgmma (a published benchmark run on an H100; see the docstring)
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
