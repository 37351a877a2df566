"""Reading compiled GPU code without a GPU: SASS parsing (cuobjdump/nvdisasm from Triton's wheel),
loops and their instruction mix, tensor-core instruction classes, load widths, resource usage of
a cubin or of the nvcc-built module, TTIR loop trip counts, and the per-kernel cost model (issue,
memory and tensor bounds) with the per-target machine facts. ``codegen.py`` compiles the kernels
and re-exports these names.

Development tooling: it lives in the repository (benchmarks/static/), not in the installed
package; import it with this directory on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Iterable

# Per-target facts: the opt-in shared memory per block a kernel may use, SM count for waves.
TARGETS = {
    90: {"name": "sm_90a", "max_shared": 227 * 1024, "sms": 132, "regs_per_sm": 65536, "smem_per_sm": 228 * 1024,
         "max_warps_per_sm": 64},
    80: {"name": "sm_80", "max_shared": 163 * 1024, "sms": 108, "regs_per_sm": 65536, "smem_per_sm": 164 * 1024,
         "max_warps_per_sm": 64},
    # workstation / consumer GPUs, SM counts of the parts whose tensor rates the report uses:
    # L40S (sm_89; RTX 40xx / L4 alike), RTX A6000 (sm_86; RTX 30xx / A10 alike), T4 (sm_75)
    89: {"name": "sm_89", "max_shared": 99 * 1024, "sms": 142, "regs_per_sm": 65536, "smem_per_sm": 100 * 1024,
         "max_warps_per_sm": 48},
    86: {"name": "sm_86", "max_shared": 99 * 1024, "sms": 84, "regs_per_sm": 65536, "smem_per_sm": 100 * 1024,
         "max_warps_per_sm": 48},
    75: {"name": "sm_75", "max_shared": 64 * 1024, "sms": 40, "regs_per_sm": 65536, "smem_per_sm": 64 * 1024,
         "max_warps_per_sm": 32},
}


def triton_bin(tool: str) -> str | None:
    """Path of a CUDA tool Triton's wheel ships (ptxas, cuobjdump, nvdisasm), else the PATH's."""
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which(tool)


def tool_version(tool: str) -> str | None:
    path = triton_bin(tool) if tool != "nvcc" else shutil.which("nvcc")
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else None


# ------------------------------------------------------------------------------------------------
# Machine code
# ------------------------------------------------------------------------------------------------
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_MMA_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA", "QMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA")


@dataclasses.dataclass
class Sass:
    instructions: list[tuple[int, str]]  # (address, text without the predicate guard)

    @property
    def count(self) -> int:
        return sum(1 for _, t in self.instructions if not t.startswith("NOP"))


@functools.lru_cache(maxsize=256)
def cubin_sass(cubin: bytes) -> dict[str, Sass]:
    """SASS of every function in a cubin, by name (cuobjdump -sass)."""
    tool = triton_bin("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's wheel ships it in triton/backends/nvidia/bin)")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True, timeout=300).stdout
    finally:
        os.unlink(path)
    return parse_sass(text)


def parse_sass(text: str) -> dict[str, Sass]:
    out: dict[str, Sass] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = out.setdefault(m.group(1), Sass([]))
            continue
        if current is None:
            continue
        m = _SASS_LINE.search(line)
        if m:
            body = m.group(2).strip()
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body)
            current.instructions.append((int(m.group(1), 16), body))
    return out


def opcode(text: str) -> str:
    return text.split()[0] if text else ""


@dataclasses.dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the back-edge branch
    depth: int = 0
    children: list["Loop"] = dataclasses.field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self is not other


def find_loops(sass: Sass) -> list[Loop]:
    """Loops from back-edge branches (a BRA to a lower address); nested loops become children.
    Returns the top-level loops, in address order."""
    index = {addr: i for i, (addr, _) in enumerate(sass.instructions)}
    loops = []
    for i, (addr, text) in enumerate(sass.instructions):
        if opcode(text) in ("BRA", "JMP", "BRX") or text.startswith("BRA"):
            m = re.search(r"(?:BRA|JMP)\s+(?:\S+\s+)*?(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
            target = None
            m2 = re.search(r"0x([0-9a-f]+)\s*$", text)
            if m2:
                target = int(m2.group(1), 16)
            if target is not None and target < addr and target in index:
                loops.append(Loop(index[target], i))
    # merge loops sharing a head (several back-edges): keep the widest
    by_start: dict[int, Loop] = {}
    for loop in loops:
        if loop.start not in by_start or loop.end > by_start[loop.start].end:
            by_start[loop.start] = loop
    loops = sorted(by_start.values(), key=lambda l: (l.start, -l.end))
    roots: list[Loop] = []
    stack: list[Loop] = []
    for loop in loops:
        while stack and not stack[-1].contains(loop):
            stack.pop()
        if stack:
            loop.depth = stack[-1].depth + 1
            stack[-1].children.append(loop)
        else:
            roots.append(loop)
        stack.append(loop)
    return roots


def walk(loops: list[Loop]):
    for loop in loops:
        yield loop
        yield from walk(loop.children)


def _own_instructions(sass: Sass, loop: Loop) -> list[str]:
    """Instructions of a loop's body that are not inside one of its inner loops."""
    inner = [(c.start, c.end) for c in loop.children]
    return [t for i, (_, t) in enumerate(sass.instructions[loop.start:loop.end + 1], loop.start)
            if not any(s <= i <= e for s, e in inner) and not t.startswith("NOP")]


def _is_mma(text: str) -> bool:
    return opcode(text).split(".")[0] in _MMA_OPS


def mma_kind(texts: Iterable[str]) -> str:
    ops = {opcode(t).split(".")[0] for t in texts if _is_mma(t)}
    if "HGMMA" in ops:
        return "wgmma (HGMMA)"
    if "HMMA" in ops:
        return "mma.sync (HMMA)"
    if "DMMA" in ops:
        return "DMMA (fp64)"
    if ops:
        return "/".join(sorted(ops))
    return "none"


def load_widths(texts: Iterable[str]) -> dict[str, int]:
    """Global loads by width in bits: LDG (to registers) and LDGSTS (cp.async to shared)."""
    hist: dict[str, int] = {}
    for t in texts:
        op = opcode(t)
        base = op.split(".")[0]
        if base not in ("LDG", "LDGSTS", "UBLKCP", "UTMALDG"):
            continue
        parts = op.split(".")
        width = "32"
        for p in parts[1:]:
            if p in ("128", "64"):
                width = p
            elif p in ("U16", "S16", "16"):
                width = "16"
            elif p in ("U8", "S8"):
                width = "8"
        if base in ("UBLKCP", "UTMALDG"):
            width = "tma"
        key = f"{base}.{width}"
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items()))


def resource_usage(binary_path: str) -> list[dict[str, Any]]:
    """cuobjdump --dump-resource-usage of a cubin or a host object/.so: one dict per function and
    architecture with REG, STACK, SHARED (static), LOCAL (bytes per thread: spills and stack
    arrays), name and arch; empty for a binary without device code (a module built without nvcc)."""
    tool = triton_bin("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    proc = subprocess.run([tool, "--dump-resource-usage", binary_path], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        if "does not contain device code" in proc.stdout + proc.stderr:
            return []
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return parse_resource_usage(proc.stdout)


def parse_resource_usage(text: str) -> list[dict[str, Any]]:
    out = []
    current = arch = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            vals: dict[str, Any] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            vals.update(name=current, arch=arch)
            out.append(vals)
            current = None
    return out


@functools.lru_cache(maxsize=256)
def cubin_resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = resource_usage(path)
    finally:
        os.unlink(path)
    return usage[0] if usage else {}


def spill_bytes(ptx_or_ptxas_log: str) -> int | None:
    m = re.search(r"(\d+) bytes spill stores", ptx_or_ptxas_log)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------
# Loop trip counts from the TTIR, evaluated with a launch's scalar arguments
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class IrLoop:
    line: int
    indent: int
    bounds: tuple[str, str, str]  # lb, ub, step SSA names
    has_dot: bool = False
    children: list["IrLoop"] = dataclasses.field(default_factory=list)
    parent: "IrLoop | None" = None


_FOR = re.compile(r"scf\.for %[\w.]+ = (%[\w.]+) to (%[\w.]+) step (%[\w.]+)")
_DEF = re.compile(r"^\s*(%[\w.]+) = (\S+) (.*?)(?: loc\(.*)?$")


def ir_loops(ttir: str) -> list[IrLoop]:
    """The scf.for loops of a kernel's TTIR, as a tree (by indentation), top level in order."""
    roots: list[IrLoop] = []
    stack: list[IrLoop] = []
    for i, line in enumerate(ttir.splitlines()):
        indent = len(line) - len(line.lstrip())
        while stack and indent <= stack[-1].indent and line.strip().startswith("}"):
            if indent == stack[-1].indent:
                stack.pop()
                break
            break
        while stack and indent <= stack[-1].indent and not line.strip().startswith("}"):
            stack.pop()
        m = _FOR.search(line)
        if m:
            loop = IrLoop(i, indent, (m.group(1), m.group(2), m.group(3)))
            if stack:
                loop.parent = stack[-1]
                stack[-1].children.append(loop)
            else:
                roots.append(loop)
            stack.append(loop)
        elif stack and ("tt.dot" in line or "ttng.warp_group_dot" in line or "tt.dot_scaled" in line):
            for loop in stack:
                loop.has_dot = True
    return roots


def _ints(text: str) -> int | None:
    m = re.match(r"\s*(-?\d+)", text)
    return int(m.group(1)) if m else None


def ir_scalars(ttir: str, args: dict[str, Any], pid: tuple[int, int, int] = (0, 0, 0)) -> dict[str, int]:
    """Values of the scalar integer SSA values of the TTIR that follow from the launch's
    arguments (a small evaluator of arith ops; anything else stays unknown)."""
    env: dict[str, int] = {f"%{k}": int(v) for k, v in args.items() if isinstance(v, (int, bool))}
    ops = {
        "arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b, "arith.muli": lambda a, b: a * b,
        "arith.divsi": lambda a, b: int(a / b) if b else None, "arith.divui": lambda a, b: a // b if b else None,
        "arith.floordivsi": lambda a, b: a // b if b else None,
        "arith.ceildivsi": lambda a, b: -(-a // b) if b else None, "arith.ceildivui": lambda a, b: -(-a // b) if b else None,
        "arith.remsi": lambda a, b: int(a - b * int(a / b)) if b else None, "arith.remui": lambda a, b: a % b if b else None,
        "arith.maxsi": max, "arith.minsi": min, "arith.maxui": max, "arith.minui": min,
        "arith.andi": lambda a, b: a & b, "arith.ori": lambda a, b: a | b, "arith.xori": lambda a, b: a ^ b,
        "arith.shli": lambda a, b: a << b, "arith.shrsi": lambda a, b: a >> b, "arith.shrui": lambda a, b: a >> b,
    }
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        if "tensor<" in rest:
            continue
        operands = re.findall(r"%[\w.]+", rest)
        try:
            if op == "arith.constant":
                v = _ints(rest)
                if v is None and rest.strip().startswith("true"):
                    v = 1
                elif v is None and rest.strip().startswith("false"):
                    v = 0
                if v is not None and re.search(r":\s*i\d+", rest):
                    env[name] = v
            elif op == "tt.get_program_id":
                env[name] = pid["xyz".index(rest.strip()[0])]
            elif op in ops and len(operands) >= 2 and all(o in env for o in operands[:2]):
                v = ops[op](env[operands[0]], env[operands[1]])
                if v is not None:
                    env[name] = v
            elif op in ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast") and operands and operands[0] in env:
                env[name] = env[operands[0]]
            elif op == "arith.cmpi" and len(operands) >= 2 and all(o in env for o in operands[:2]):
                pred = rest.split(",")[0].strip()
                a, b = env[operands[0]], env[operands[1]]
                env[name] = int({"eq": a == b, "ne": a != b, "slt": a < b, "sle": a <= b, "sgt": a > b, "sge": a >= b,
                                 "ult": a < b, "ule": a <= b, "ugt": a > b, "uge": a >= b}.get(pred, False))
            elif op == "arith.select" and len(operands) >= 3 and all(o in env for o in operands[:3]):
                env[name] = env[operands[1]] if env[operands[0]] else env[operands[2]]
        except (ValueError, TypeError, OverflowError):
            continue
    return env


def trip_count(loop: IrLoop, env: dict[str, int]) -> int | None:
    lb, ub, st = (env.get(x) for x in loop.bounds)
    if lb is None or ub is None or not st:
        return None
    return max(0, -(-(ub - lb) // st))


# ------------------------------------------------------------------------------------------------
# Per-kernel analysis and the static time estimate
# ------------------------------------------------------------------------------------------------
# Machine model (an H200; the H100 SXM differs only in HBM bandwidth): 132 SMs x 4 schedulers
# x 1.98 GHz boost issue about 1.05e12 warp-instructions/s; dense bf16/fp16 tensor math ~790e12
# FLOP/s (tf32 half of it); HBM about 3.3e12 B/s measured-class copy rate (H100: 2.98e12).
MACHINE = {"name": "H200 (132 SMs, 1.98 GHz)", "sms": 132, "schedulers": 4, "clock": 1.98e9,
           "tensor_flops": 790e12, "hbm": 3.3e12}


def tensor_rate(machine: dict, texts: Iterable[str]) -> float:
    """Dense tensor-core FLOP/s for a kernel's tensor-core instructions: the machine's per-class
    rate (``machine["tensor_rates"]``, keyed by SASS class: HGMMA = wgmma, HMMA = mma.sync), else
    its single ``tensor_flops``; TF32 runs at half the 16-bit rate."""
    ops = [opcode(t) for t in texts if _is_mma(t)]
    classes = {op.split(".")[0] for op in ops}
    rates = machine.get("tensor_rates") or {}
    kind = "HGMMA" if "HGMMA" in classes else "HMMA" if "HMMA" in classes else next(iter(sorted(classes)), "")
    rate = rates.get(kind, machine["tensor_flops"])
    return rate / (2 if any("TF32" in op for op in ops) else 1)


def mma_flops(text: str, num_warps: int) -> float:
    """FLOPs one warp's issue of this tensor-core instruction performs (a wgmma is issued by each
    of the 4 warps of its warpgroup, so a quarter of the instruction's work is counted per warp)."""
    op = opcode(text)
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2.0 * a * b * c / 4
    m = re.match(r"[HDIQ]MMA\.(16|8)(8)(\d+)", op)  # m16n8k16 is written 16816, m8n8k4 884
    if m:
        a, b, c = map(int, m.groups())
        return 2.0 * a * b * c
    return 0.0


@dataclasses.dataclass
class KernelCost:
    """Static cost of one compiled kernel at the launches recorded for it."""
    name: str
    config: str
    registers: int
    local_bytes: int  # per thread: spills and stack
    spill_instructions: int  # STL/LDL in the SASS
    shared: int
    mma: str
    loop_instructions: int | None  # per iteration of the main (innermost tensor-core or hottest) loop
    loop_mma: int
    loop_loads: dict[str, int]
    instructions_per_mma: float | None
    warp_instructions: float  # executed, all launches of the phase
    mma_flops: float  # executed tensor-core FLOPs
    bytes: float  # compulsory: every tensor argument once
    programs: int
    issue_s: float
    memory_s: float
    mma_s: float
    estimate_s: float
    trips: str
    notes: list[str]


def analyze(record, launches: list, arch: int = 90, machine: dict = MACHINE,
            tensor_bytes: Callable[[Any], float] | None = None) -> KernelCost:
    kernel = record.kernel
    sass_all = cubin_sass(kernel.asm["cubin"])
    sass = sass_all.get(kernel.name) or next(iter(sass_all.values()))
    res = cubin_resources(kernel.asm["cubin"])
    texts = [t for _, t in sass.instructions if not t.startswith("NOP")]
    notes = []
    roots = find_loops(sass)
    loops = list(walk(roots))
    mma_loops = [l for l in loops if any(_is_mma(t) for t in _own_instructions(sass, l))]
    main = max(mma_loops, key=lambda l: len(_own_instructions(sass, l)), default=None)
    if main is None and loops:
        main = max(loops, key=lambda l: len(_own_instructions(sass, l)))
    own = _own_instructions(sass, main) if main else []
    loop_mma = sum(1 for t in own if _is_mma(t))

    # trip counts: the TTIR's loops in preorder against the SASS loops in preorder when the
    # trees have the same shape; else only the tensor-core loops are paired, in order.
    ttir = kernel.asm.get("ttir", "")
    ir = list(_walk_ir(ir_loops(ttir)))
    pairs: dict[int, IrLoop] = {}
    if len(ir) == len(loops) and all(len(a.children) == len(b.children) for a, b in zip(ir, loops)):
        pairs = {id(s): i for s, i in zip(loops, ir)}
    else:
        ir_dot = [l for l in ir if l.has_dot and not any(c.has_dot for c in l.children)]
        if len(ir_dot) == len(mma_loops):
            pairs = {id(s): i for s, i in zip(mma_loops, ir_dot)}
        if len(ir) != len(loops):
            notes.append(f"{len(ir)} IR loops vs {len(loops)} SASS loops: unpaired SASS loops counted once")

    warp_instr_per_warp_total = 0.0
    mma_flop_total = 0.0
    programs_total = 0
    issue_s = 0.0
    trips_seen = []
    top = [t for i, (_, t) in enumerate(sass.instructions)
           if not any(r.start <= i <= r.end for r in roots) and not t.startswith("NOP")]
    occupancy = _resident_programs(res.get("REG", 0), record.num_warps, record.shared, arch)
    for launch in launches:
        env = ir_scalars(ttir, launch.scalars)
        per_warp = float(len(top))
        flops = sum(mma_flops(t, record.num_warps) for t in top)
        for loop in loops:
            mult = 1
            ir_loop = pairs.get(id(loop))
            node = ir_loop
            while node is not None:
                n = trip_count(node, env)
                if n is None:
                    notes.append("a loop bound is not a function of the launch's scalars: counted once")
                    break
                mult *= n
                node = node.parent
            body = _own_instructions(sass, loop)
            per_warp += len(body) * mult
            flops += sum(mma_flops(t, record.num_warps) for t in body) * mult
            if loop is main and ir_loop is not None:
                trips_seen.append(mult)
        programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
        programs_total += programs
        warp_instr_per_warp_total += per_warp * record.num_warps * programs
        mma_flop_total += flops * record.num_warps * programs
        waves = -(-programs // (machine["sms"] * occupancy))
        # programs sharing an SM's schedulers: as many as fit, or as the grid gives each SM
        resident = min(occupancy, -(-programs // machine["sms"]))
        per_wave_cycles = max(per_warp, resident * record.num_warps * per_warp / machine["schedulers"])
        issue_s += waves * per_wave_cycles / machine["clock"]
    nbytes = sum(tensor_bytes(l) if tensor_bytes else l.tensor_bytes for l in launches)
    mma_s = mma_flop_total / tensor_rate(machine, texts)
    memory_s = nbytes / machine["hbm"]
    return KernelCost(
        name=record.name, config=record.config, registers=res.get("REG", 0),
        local_bytes=res.get("LOCAL", 0) + res.get("STACK", 0),
        spill_instructions=sum(1 for t in texts if opcode(t).split(".")[0] in ("STL", "LDL")),
        shared=record.shared, mma=mma_kind(texts), loop_instructions=len(own) if main else None, loop_mma=loop_mma,
        loop_loads=load_widths(own), instructions_per_mma=(len(own) / loop_mma) if loop_mma else None,
        warp_instructions=warp_instr_per_warp_total, mma_flops=mma_flop_total, bytes=nbytes,
        programs=programs_total, issue_s=issue_s, memory_s=memory_s, mma_s=mma_s,
        estimate_s=max(issue_s, memory_s, mma_s), trips="/".join(str(t) for t in sorted(set(trips_seen))) or "-",
        notes=sorted(set(notes)))


def _walk_ir(loops):
    for l in loops:
        yield l
        yield from _walk_ir(l.children)


def _resident_programs(regs: int, num_warps: int, shared: int, arch: int) -> int:
    """Programs an SM holds at once, by registers, shared memory and warps."""
    t = TARGETS.get(arch, TARGETS[90])
    by_regs = t["regs_per_sm"] // max(1, (max(regs, 1) + 7) // 8 * 8 * 32 * num_warps)
    by_smem = t["smem_per_sm"] // shared if shared else 32
    by_warps = t["max_warps_per_sm"] // num_warps
    return max(1, min(by_regs, by_smem, by_warps, 32))
