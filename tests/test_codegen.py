"""Kernels compile for real GPUs without one: every Triton kernel the triton backend launches at
the headline workload (bf16/fp16/fp32, stage 0 reading images, stage 1 64 -> 384, forward,
backward, dense forward) is compiled for sm_90a, sm_80 and the consumer GPUs' sm_89 and sm_86
(99 KB of shared memory per block) through the real code path with a stand-in driver
(benchmarks/static/codegen.py), and the nvcc-built CUDA module's resource usage is read.

Fails on a compile error or shared memory above the target's per-block limit; spills are
asserted zero for every kernel. CI compiles the first config each autotuner keeps (``--quick``)
for (sm_90a, bf16), (sm_80, fp32), (sm_89, bf16) and (sm_86, fp16); set SCOTT_CODEGEN_ALL=1 for
every target x dtype pair (and the sm_75 check below) and SCOTT_CODEGEN_CONFIGS=all for every
kept config.

sm_75 (T4, RTX 20xx, 64 KB): Triton compiles the kernels for it, but with no tensor-core
instruction (FMA dots, in fp16 as in fp32) and with spills in every GEMM kernel, and bf16 needs
sm_80; so ``triton_supports`` refuses devices below sm_80 and the backend is not listed there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "benchmarks" / "static"   # the static-analysis tooling: in the repository, not the package
sys.path.insert(0, str(STATIC))

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

import codegen  # noqa: E402  (imports triton lazily)

HAS_CUOBJDUMP = codegen.triton_bin("cuobjdump") is not None
needs_tools = pytest.mark.skipif(not (HAS_TRITON and HAS_CUOBJDUMP),
                                 reason="needs triton with its bundled cuobjdump (triton/backends/nvidia/bin)")

LIMITS = {90: 227 * 1024, 80: 163 * 1024, 89: 99 * 1024, 86: 99 * 1024, 75: 64 * 1024}
COMBOS = [(90, "bfloat16"), (80, "float32"), (89, "bfloat16"), (86, "float16")]
ALL = os.environ.get("SCOTT_CODEGEN_ALL") == "1"
if ALL:
    COMBOS = [(arch, dtype) for arch in (90, 80, 89, 86) for dtype in ("bfloat16", "float16", "float32")]

_RESULTS: dict = {}


def _compile(arch: int, dtype: str, tmp_path_factory) -> dict:
    """Runs benchmarks/static/static_cost.py once per (arch, dtype) in a fresh process (the Triton
    interpreter must be off there) and returns its JSON."""
    key = (arch, dtype)
    if key not in _RESULTS:
        out = tmp_path_factory.mktemp(f"codegen_{arch}_{dtype}") / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("TRITON_CACHE_DIR", str(out.parent / "triton_cache"))
        cmd = [sys.executable, str(STATIC / "static_cost.py"), "--arch", str(arch), "--dtype", dtype,
               "--no-cuda", "--json", str(out)]
        if os.environ.get("SCOTT_CODEGEN_CONFIGS") != "all":
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        assert proc.returncode == 0, f"static_cost.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        _RESULTS[key] = json.loads(out.read_text())
    return _RESULTS[key]


@needs_tools
@pytest.mark.parametrize("arch,dtype", COMBOS, ids=lambda v: str(v))
def test_triton_kernels_compile(arch, dtype, tmp_path_factory):
    report = _compile(arch, dtype, tmp_path_factory)
    assert not report["errors"], "\n".join(report["errors"])
    failed = [c for c in report["configs"] if "error" in c]
    assert not failed, "compile errors:\n" + "\n".join(f"{c['kernel']} {c['config']}: {c['error']}" for c in failed)
    phases = {c["phase"] for c in report["configs"]}
    assert phases == {"masked_fwd", "masked_bwd", "dense_fwd"}, f"launches recorded only for {phases}"
    gemms = [c for c in report["configs"] if c["mma"] != "none"]
    assert gemms, "no kernel uses tensor cores"
    over = [c for c in report["configs"] if c["shared"] > LIMITS[arch]]
    assert not over, "shared memory over the sm_%d limit (%d B): %s" % (
        arch, LIMITS[arch], [(c["kernel"], c["config"], c["shared"]) for c in over])
    slow = [(c["kernel"], c["config"], round(c["compile_s"])) for c in report["configs"] if c["compile_s"] > 30]
    if slow:  # reported, not failed: compile time depends on the machine's load
        print(f"configs compiling in over 30 s: {slow}")


@needs_tools
@pytest.mark.parametrize("arch,dtype", COMBOS, ids=lambda v: str(v))
def test_triton_kernels_do_not_spill(arch, dtype, tmp_path_factory):
    report = _compile(arch, dtype, tmp_path_factory)
    spills = sorted({(c["kernel"], c["config"], c["local_bytes"], c["spill_instructions"]) for c in report["configs"]
                     if "error" not in c and (c["local_bytes"] or c["spill_instructions"])})
    assert not spills, f"register spills (kernel, config, stack+local bytes, STL/LDL count): {spills}"


def test_triton_backend_refuses_gpus_below_sm80(monkeypatch):
    import torch
    from scott_kernels import functional
    from scott_kernels import triton_configs
    from scott_kernels.triton_configs import MIN_CAPABILITY, triton_supports

    assert MIN_CAPABILITY == (8, 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # the cuda backend's own check asks the (absent) driver which code it loads: not under test here
    monkeypatch.setitem(functional.BACKENDS, "cuda", (functional.BACKENDS["cuda"][0], lambda device: False))
    for capability, ok in [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        # answers are kept per device: a fresh table each (restored after the test)
        monkeypatch.setattr(triton_configs, "_SUPPORTED", {})
        assert triton_supports(torch.device("cuda")) is ok
        assert ("triton" in functional._auto_candidates(torch.device("cuda"))) is (ok and HAS_TRITON)
    # kept per indexed device, never for "cuda" alone (whichever device is current)
    assert triton_supports(torch.device("cuda", 0)) and triton_supports(torch.device("cuda"))
    assert set(triton_configs._SUPPORTED) == {torch.device("cuda", 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert triton_supports(torch.device("cuda", 0)) and not triton_supports(torch.device("cuda"))


@needs_tools
@pytest.mark.skipif(not ALL, reason="SCOTT_CODEGEN_ALL=1: the reason the backend refuses sm_75")
def test_sm75_has_no_tensor_cores(tmp_path_factory):
    report = _compile(75, "float16", tmp_path_factory)
    assert not report["errors"] and not [c for c in report["configs"] if "error" in c]
    assert all(c["mma"] == "none" for c in report["configs"])
    assert any(c["local_bytes"] for c in report["configs"])


# ---- the nvcc-built CUDA module -------------------------------------------------------------
def _cuda_usage():
    so = sorted((ROOT / "scott_kernels").glob("_C*.so"))
    if not so:
        pytest.skip("the native module is not built (pip install -e . / setup.py build_ext)")
    if not HAS_CUOBJDUMP:
        pytest.skip("no cuobjdump (Triton's wheel ships one)")
    usage = codegen.resource_usage(str(so[0]))
    if not usage:
        pytest.skip("the native module holds no GPU code (built without nvcc)")
    return usage


def test_cuda_kernels_fit_and_do_not_spill():
    usage = _cuda_usage()
    checked = 0
    for u in usage:
        arch = u.get("arch") or "sm_90a"
        major = int("".join(ch for ch in arch.split("_")[1] if ch.isdigit()))
        limit = codegen.TARGETS.get(major, codegen.TARGETS[90])["max_shared"]
        # ptxas puts spilled registers in the stack frame (STACK) or local memory (LOCAL)
        local = u.get("LOCAL", 0) + u.get("STACK", 0)
        assert local == 0, f"{u['name']} ({arch}) spills: {local} bytes of stack/local memory per thread"
        assert u.get("SHARED", 0) <= limit, f"{u['name']} ({arch}) uses {u['SHARED']} B of shared memory > {limit}"
        checked += 1
    assert checked


def test_cuda_launch_table_matches_module():
    """benchmarks/static/static_cost.py's CUDA_LAUNCHES/CUDA_TILES describe the module's kernels:
    every launch finds its kernel, its loop structure and its dynamic shared memory fit, and the
    tensor-core launches execute at least the convolution's useful FLOPs (padding at most 1.6x)."""
    usage = _cuda_usage()
    if not any(u.get("arch") in ("sm_90a", "sm_90") for u in usage):
        pytest.skip("the native module has no sm_90a code (SCOTT_CUDA_ARCHS)")
    import static_cost
    from argparse import Namespace
    kernels, launches, notes = static_cost.cuda_rows(Namespace(arch=90, hbm=3.3e12))
    assert not notes, notes
    expected = {(p, r) for p, r, _, _ in static_cost.CUDA_LAUNCHES}
    assert {(l["phase"], l["role"]) for l in launches if l["phase"] != "dense_fwd"} == expected
    assert {l["role"] for l in launches if l["phase"] == "dense_fwd"} == {
        r for p, r, _, _ in static_cost.CUDA_LAUNCHES if p == "masked_fwd"} - static_cost.MASKED_ONLY
    for l in launches:
        assert l["local_bytes"] == 0, f"{l['role']}: {l['kernel']} spills"
        assert l["shared"] <= LIMITS[90], f"{l['role']}: {l['shared']} B of shared memory"
        assert l["estimate_s"] > 0
        if l["useful_flops"]:
            assert l["mma"] == "mma.sync (HMMA)", l
            ratio = l["mma_flops"] / l["useful_flops"]
            assert 1.0 - 1e-9 <= ratio <= 1.6, (l["role"], l["mma_flops"], l["useful_flops"])


# ---- the tool's parsers, on fixed text ------------------------------------------------------
SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;
        /*0050*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0080*/               @P1 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_sass_loops_and_mix():
    sass = codegen.parse_sass(SASS)["k"]
    roots = codegen.find_loops(sass)
    assert [(l.start, l.end) for l in roots] == [(1, 8)]
    inner = roots[0].children
    assert [(l.start, l.end) for l in inner] == [(3, 6)]
    own = codegen._own_instructions(sass, inner[0])
    assert sum(codegen._is_mma(t) for t in own) == 1 and len(own) == 4
    assert codegen.load_widths(own) == {"LDG.16": 1}
    assert codegen.load_widths(codegen._own_instructions(sass, roots[0])) == {"LDG.128": 1}
    assert codegen.mma_kind(own) == "wgmma (HGMMA)"
    assert codegen.mma_flops(own[1], 4) == 2 * 64 * 128 * 16 / 4
    assert codegen.mma_flops("HMMA.16816.F32.BF16 R4, R8, R12, R4", 8) == 2 * 16 * 8 * 16
    assert codegen.mma_flops("HMMA.1684.F32.TF32 R4, R8, R12, R4", 8) == 2 * 16 * 8 * 4
    assert codegen.mma_flops("DMMA.884 R4, R8, R12, R4", 8) == 2 * 8 * 8 * 4


def test_resource_usage_parser():
    text = """
Fatbin elf code:
================
arch = sm_90a
 Function _Z3foo:
  REG:64 STACK:8 SHARED:1024 LOCAL:16 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3bar:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:900 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = codegen.parse_resource_usage(text)
    assert {k: usage[0][k] for k in ("REG", "STACK", "SHARED", "LOCAL", "name", "arch")} == {
        "REG": 64, "STACK": 8, "SHARED": 1024, "LOCAL": 16, "name": "_Z3foo", "arch": "sm_90a"}
    assert usage[1]["name"] == "_Z3bar" and usage[1]["LOCAL"] == 0


def test_ttir_trip_counts():
    ttir = """  tt.func public @k(%K_TOTAL: i32, %C: i32) {
    %c0_i32 = arith.constant 0 : i32
    %c32_i32 = arith.constant 32 : i32
    %c3_i32 = arith.constant 3 : i32
    %n = arith.muli %C, %c3_i32 : i32
    %acc = scf.for %k0 = %c0_i32 to %K_TOTAL step %c32_i32 iter_args(%a = %z) -> (tensor<64x64xf32>)  : i32 {
      %inner = scf.for %j = %c0_i32 to %n step %c3_i32 iter_args(%b = %a) -> (tensor<64x64xf32>)  : i32 {
        %d = tt.dot %x, %y, %b : tensor<64x32xbf16> * tensor<32x64xbf16> -> tensor<64x64xf32>
        scf.yield %d : tensor<64x64xf32>
      }
      scf.yield %inner : tensor<64x64xf32>
    }
    tt.return
  }
"""
    loops = codegen.ir_loops(ttir)
    assert len(loops) == 1 and len(loops[0].children) == 1 and loops[0].has_dot
    env = codegen.ir_scalars(ttir, {"K_TOTAL": 3136, "C": 5})
    assert codegen.trip_count(loops[0], env) == 98
    assert codegen.trip_count(loops[0].children[0], env) == 5


# ---- shared-memory pruning helper ----------------------------------------------------------
def test_shared_memory_pruning():
    import torch
    triton = pytest.importorskip("triton")
    from scott_kernels.triton_configs import gemm_shared_bytes, keep_fitting, prune_hook, shared_fits

    args = {"slot": torch.empty(1, dtype=torch.int32), "a": torch.empty(1, dtype=torch.bfloat16),
            "partial": torch.empty(1, dtype=torch.float32)}
    big = triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128}, num_warps=8, num_stages=4)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    # the first floating argument (bf16) is the operand: 2 bytes per element
    assert gemm_shared_bytes(small, args) == 3 * (64 * 32 + 32 * 64) * 2
    assert keep_fitting([big, small], lambda c: gemm_shared_bytes(c, args), limit=227 * 1024) == [small]
    # nothing fits: the smallest stays, so the autotuner always has a config
    assert keep_fitting([big], lambda c: gemm_shared_bytes(c, args), limit=1) == [big]
    prune = prune_hook(lambda cs, named, **kw: cs[::-1], shared_fits(limit=227 * 1024))
    assert prune([small, big], args) == [small]


# ---- every launch, per-class tensor rates, the closing lines ---------------------------------
def test_tensor_rate_per_instruction_class():
    """A kernel's tensor time uses its instruction class's rate on the target: on sm_90 mma.sync
    (HMMA) is not credited with wgmma's (HGMMA) rate; TF32 runs at half."""
    import static_cost

    machine = static_cost.machine_for(type("A", (), {"arch": 90, "hbm": 3.3e12})())
    rates = static_cost.TENSOR_RATES[90]
    assert rates["HMMA"] < rates["HGMMA"]
    assert codegen.tensor_rate(machine, ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"]) == rates["HGMMA"]
    assert codegen.tensor_rate(machine, ["HMMA.16816.F32.BF16 R4, R8, R12, R4"]) == rates["HMMA"]
    assert codegen.tensor_rate(machine, ["HMMA.1684.F32.TF32 R4, R8, R12, R4"]) == rates["HMMA"] / 2
    assert static_cost.floor_rate(90) == rates["HGMMA"]
    for arch in (80, 86, 89):
        assert set(static_cost.TENSOR_RATES[arch]) == {"HMMA"}, "no wgmma before sm_90"
    assert codegen.TARGETS[86]["max_shared"] == codegen.TARGETS[89]["max_shared"] == 99 * 1024


def test_torch_launch_classification():
    """Views and allocations launch nothing; wrappers count the copies and fills they make."""
    import launches
    import torch
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(64, 32, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        a.view(32, 64).t().unsqueeze(0)  # views: nothing
        torch.empty(10)  # allocation: nothing
        a.contiguous()  # already contiguous: nothing
        a.float()  # one copy: 64*32*(2 + 4) bytes
        torch.zeros(100)  # one fill
        a.t().contiguous()  # one copy
        a.float().sum(0)  # a copy and a reduction
    ops = launches.torch_launches(prof.events())
    assert [o["op"] for o in ops] == ["copy_", "zero_", "copy_", "copy_", "sum"], ops
    assert ops[0]["bytes"] == 64 * 32 * (2 + 4)
    assert ops[1]["bytes"] == 100 * 4


@needs_tools
def test_report_counts_every_launch(tmp_path_factory):
    """The report's triton run counts its Triton launches and the torch ops between them per
    phase, adds them to the kernels' sum, times the host dispatch, and ends with the closing line."""
    import static_cost

    report = _compile(90, "bfloat16", tmp_path_factory)
    extras = report["triton_extras"]
    kernels, ops = extras["kernel_launches"], extras["torch_ops"]
    assert all(kernels[p] > 0 for p in ("masked_fwd", "masked_bwd", "dense_fwd")), kernels
    # every phase was profiled; the masked ones launch no torch op any more, the dense forward's
    # table aranges show that the profiling sees them
    assert set(ops) >= {"masked_fwd", "masked_bwd", "dense_fwd"}, ops
    assert [o["op"] for o in ops["dense_fwd"]].count("arange") == 2, ops["dense_fwd"]
    assert not any(o["sync"] for phase in ops.values() for o in phase)
    (line,) = [c for c in report["closing"] if c["backend"] == "triton"]
    expected = sum(kernels[p] + len(ops.get(p, [])) for p in ("masked_fwd", "masked_bwd"))
    assert line["launches"] == expected
    assert line["launches"] <= 10, "a masked forward+backward launches at most 10 kernels"
    kernels_only = sum(k["estimate_s"] for k in report["kernels"] if k["phase"] in ("masked_fwd", "masked_bwd"))
    assert line["train_ms"] > kernels_only * 1e3, "launch gaps and torch ops add to the kernels' sum"
    assert line["host_ms"] and line["host_ms"] > 0
    totals = {"train": {"total_s": 4.5e-4, "launches": 40}, "dense_fwd": {"total_s": 2.8e-4}}
    text = static_cost.closing_line("triton", totals, {"fwd_bwd": 2.5e-3})
    assert text == "static estimate triton: fwd+bwd mask 0.6 0.450 ms, dense fwd 0.280 ms, launches 40, host 2.500 ms"
    assert static_cost.CLOSING.match(text)
    wgmma = [k for k in report["kernels"] if k["mma"] == "wgmma (HGMMA)"]
    assert wgmma and all(abs(k["mma_s"] * static_cost.TENSOR_RATES[90]["HGMMA"] / k["mma_flops"] - 1) < 1e-9
                         for k in wgmma)


def test_cuda_every_launch():
    """The cuda backend's Python path (native kernels replaced by counters) makes the launches
    CUDA_LAUNCHES lists, and its torch ops are counted per phase."""
    usage = _cuda_usage()
    if not any(u.get("arch") in ("sm_90a", "sm_90") for u in usage):
        pytest.skip("the native module has no sm_90a code (SCOTT_CUDA_ARCHS)")
    import static_cost
    from argparse import Namespace

    extras = static_cost.cuda_extras(Namespace(dtype="bfloat16", batch=None, no_host=True, host_repeats=1))
    assert not extras["errors"], extras["errors"]
    table = {p: sum(1 for q, *_ in static_cost.CUDA_LAUNCHES if q == p) for p in ("masked_fwd", "masked_bwd")}
    assert {p: extras["native_launches"][p] for p in table} == table
    assert extras["native_launches"]["dense_fwd"] == table["masked_fwd"] - len(static_cost.MASKED_ONLY)
    assert extras["torch_ops"].get("masked_fwd") and extras["torch_ops"].get("masked_bwd")


def _on_stand_in_gpu(body: str, timeout: int = 900) -> str:
    """Runs ``body`` (lines indented under ``with codegen.fake_gpu(90) as rec:``, ``torch``
    imported) in a fresh process without TRITON_INTERPRET, so that Triton compiles for sm_90a;
    returns its standard output."""
    code = (f"import sys, torch\nsys.path.insert(0, {str(STATIC)!r})\nimport codegen\n"
            f"with codegen.fake_gpu(90) as rec:\n{body}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@needs_tools
def test_tables_kernel_keeps_its_device_assertion():
    """The visible-tables kernel compiles for sm_90a with its row-count assertion (debug=True) and
    without the integer-overflow checks that debug mode would otherwise add to every operation."""
    stdout = _on_stand_in_gpu(
        "    from scott_kernels.triton_tables import visible_tables\n"
        "    visible_tables(torch.ones(2, 4, dtype=torch.bool), 4, 2, 2, 1)\n"
        "    (kernel,) = [r.kernel for r in rec.records if r.name == '_visible_tables_kernel']\n"
        "    ptx = kernel.asm['ptx']\n"
        "    print('assert' if '__assertfail' in ptx else 'no-assert', ptx.count('\\n'))\n")
    verdict, lines = stdout.split()[-2:]
    assert verdict == "assert", "the row-count assertion was compiled out"
    assert int(lines) < 800, f"{lines} PTX lines (618 without, 1057 with overflow checks in Triton 3.8)"


@needs_tools
def test_weight_gradient_split_sums_are_ordered():
    """What the GPU runs for the weight gradients' last-split sums (sm_90a PTX of both kernels):
    every partial store precedes a CTA barrier, then one thread's arrival (atom.add acq_rel at GPU
    scope), whose count every thread reads after a second barrier; the partials are then read past
    L1 (ld.global.cg) and the counter zeroed last. The interpreter cannot check this ordering."""
    stdout = _on_stand_in_gpu(
        "    from scott_kernels.compact import visible_tables\n"
        "    from scott_kernels.triton_backend import conv_relu_wgrad\n"
        "    from scott_kernels.triton_image import conv_relu_wgrad_image\n"
        "    b = torch.bfloat16\n"
        "    keep = torch.ones(2, 4, dtype=torch.bool)\n"
        "    slot, pos = visible_tables(keep, 2, 2, 2, keep.device)\n"
        "    conv_relu_wgrad(torch.randn(8, 4, 4, 16, dtype=b), None, torch.randn(8, 8, 8, 32, dtype=b),\n"
        "                    torch.randn(16, 32, 5, 5, dtype=b), slot, pos, 8, False)\n"
        "    conv_relu_wgrad_image(torch.randn(8, 8, 8, 16, dtype=b), None, torch.randn(2, 3, 32, 32, dtype=b),\n"
        "                          torch.randn(16, 3, 7, 7, dtype=b), slot, pos, 16)\n"
        "    for name in ('_conv_relu_wgrad_kernel', '_conv_relu_image_wgrad_kernel'):\n"
        "        ptx = [r.kernel for r in rec.records if r.name == name and r.kernel is not None][0].asm['ptx']\n"
        "        print('PTX', name, '|'.join(l.strip() for l in ptx.splitlines()\n"
        "                                    if l.strip() and not l.strip().startswith(('.loc', '//', '$'))))\n")
    found = [line.split(" ", 2)[1:] for line in stdout.splitlines() if line.startswith("PTX ")]
    assert len(found) == 2, stdout[-2000:]
    for name, text in found:
        ins = text.split("|")
        (arrive,) = [i for i, l in enumerate(ins) if "atom.global.gpu.acq_rel.add" in l]
        stores = [i for i, l in enumerate(ins) if "st.global" in l]
        assert stores and max(i for i in stores if i < arrive) < max(
            i for i, l in enumerate(ins[:arrive]) if l.startswith("bar.sync")), f"{name}: no barrier after the stores"
        after = ins[arrive + 1:]
        broadcast = next(i for i, l in enumerate(after) if l.startswith("bar.sync"))
        assert any("st.shared" in l for l in after[:broadcast]), f"{name}: the count is not shared with the CTA"
        loads = [i for i, l in enumerate(after) if "ld.global" in l]
        assert loads and all(".cg" in after[i] for i in loads), f"{name}: partials read through L1"
        assert min(loads) > broadcast, f"{name}: partials read before the count is known"
        (reset,) = [i for i, l in enumerate(after) if "atom.global" in l and "exch" in l]
        assert reset > max(loads), f"{name}: counter zeroed before the sums"


_DIRECT_LAUNCH_SCRIPT = r"""
import json, sys
import torch
import codegen
from triton.runtime.jit import JITFunction

from scott_kernels import _replay, triton_backend
with codegen.fake_gpu(90, first_config_only=lambda name: True) as rec:
    runs, bodies = [], []
    original = JITFunction.run
    def counted(self, *args, **kwargs):
        runs.append(self.fn.__name__)
        return original(self, *args, **kwargs)
    JITFunction.run = counted
    for body in ("_tokenize_forward", "_tokenize_backward"):
        def called(*args, _body=getattr(triton_backend, body), _name=body):
            bodies.append(_name)
            return _body(*args)
        setattr(triton_backend, body, called)
    out = {}
    for name, batch in (("first", 2), ("second", 2), ("again", 2), ("direct", 2), ("other", 3)):
        for r in rec.records:
            r.launches.clear()
        runs.clear()
        bodies.clear()
        _replay.enabled = name != "direct"   # the bodies' own direct launches, without a plan
        codegen.run_workload(rec, "bfloat16", batch=batch, phases=("masked_fwd", "masked_bwd"))
        _replay.enabled = True
        out[name] = {"jit": sorted(runs), "bodies": list(bodies),
                     "launches": sorted((r.name, l.phase, l.grid, sorted(l.scalars.items()), l.tensor_bytes)
                                        for r in rec.records for l in r.launches if not l.trial)}
    JITFunction.run = original
json.dump(out, sys.stdout, default=str)
"""


def test_direct_launch_passes_launch_hooks_only_when_set(monkeypatch):
    """A direct launch hands the launcher Triton's launch hooks and their metadata when a hook is
    set (a profiler's), and neither when the hook chains are empty or unset."""
    from scott_kernels import triton_pool
    tuner = triton_pool._max_blur_pool_fwd_kernel
    knobs = tuner._knobs
    if knobs is None:
        pytest.skip("this Triton has no launch hooks in its knobs")
    seen = []

    class Kernel:
        function, packed_metadata = "function", "packed"

        def launch_metadata(self, grid, stream, *args):
            return ("metadata", grid, args)

        def run(self, g0, g1, g2, stream, function, packed, metadata, enter, leave, *args):
            seen.append((metadata, enter, leave, args))

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return "stream"

    monkeypatch.setattr(type(tuner), "_driver", property(lambda self: Driver()))
    compiled = (Kernel(), (7,), {}, None)
    runtime = knobs.runtime
    chain = type(runtime.launch_enter_hook) if hasattr(runtime.launch_enter_hook, "calls") else None
    empty = chain() if chain else None
    monkeypatch.setattr(runtime, "launch_enter_hook", empty)
    monkeypatch.setattr(runtime, "launch_exit_hook", chain() if chain else None)
    assert tuner._launch_compiled(compiled, (1, 2), (3,))
    assert seen[-1] == (None, None, None, (1, 2, 7))
    hook = lambda metadata: None
    if chain:
        hooked = chain()
        hooked.add(hook)
    else:
        hooked = hook
    monkeypatch.setattr(runtime, "launch_enter_hook", hooked)
    assert tuner._launch_compiled(compiled, (1, 2), (3,))
    metadata, enter, leave, args = seen[-1]
    assert metadata == ("metadata", (3,), (1, 2, 7)) and enter is hooked and leave is None and args == (1, 2, 7)
    # an exit hook alone still gets the launch's metadata
    monkeypatch.setattr(runtime, "launch_enter_hook", empty)
    monkeypatch.setattr(runtime, "launch_exit_hook", hooked)
    assert tuner._launch_compiled(compiled, (1, 2), (3,))
    assert seen[-1] == (("metadata", (3,), (1, 2, 7)), None, hooked, (1, 2, 7))


@needs_tools
def test_repeated_launches_call_the_compiled_kernel():
    """An autotuned launch whose arguments all match an earlier one's (only tensor addresses
    differ) calls that launch's compiled kernel directly, with the same grid and arguments as the
    JIT's launch; new argument values go through the JIT again. (The second step keeps the
    compiled kernels: the first one's configs are timed choices.) The second step also records
    the tokenizer's launch plans (scott_kernels._replay) and the third replays them; the fourth,
    plans off, runs the bodies, whose launches call the compiled kernels directly."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(STATIC), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _DIRECT_LAUNCH_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, again, direct, other = out["first"], out["again"], out["direct"], out["other"]
    assert direct["launches"] == first["launches"] and first["launches"], "a direct launch differs from the JIT's"
    assert direct["bodies"] == ["_tokenize_forward", "_tokenize_backward"], direct["bodies"]
    assert again["launches"] == first["launches"], "a replayed launch differs from the JIT's"
    # the second step recorded the launch plans, the third replayed them: the same launches (kernel,
    # grid, scalar arguments, bytes of tensor arguments), and neither body ran
    assert out["second"]["bodies"] == ["_tokenize_forward", "_tokenize_backward"], out["second"]["bodies"]
    assert again["bodies"] == [], again["bodies"]
    tuned = set(first["jit"])
    assert "_visible_tables_kernel" in tuned, first["jit"]   # one config, through the autotuner all the same
    assert not tuned & set(again["jit"]), f"repeated autotuned launches went through the JIT: {again['jit']}"
    assert not tuned & set(direct["jit"]), f"repeated autotuned launches went through the JIT: {direct['jit']}"
    assert tuned & set(other["jit"]), "launches with new argument values must go through the JIT"
