"""The one-command device check: everything a GPU must check, in one short window.

    bash tests/gpu/check.sh OUT_DIR            # on a GPU machine (no network needed)
    bash tests/gpu/check.sh --dry OUT_DIR      # the same stages on tiny shapes on a CPU
    python tests/gpu/check.py --verify OUT_DIR # the summary is complete (used by CI)

Stages, each with its status, time and limit, and each run even when an earlier one failed:

1. ``build``: the native module in place for the present GPU only (its architecture from
   ``torch.cuda.get_device_capability``, e.g. ``SCOTT_CUDA_ARCHS=90a``), by
   ``pip install --no-build-isolation --no-deps -e .`` and, if that fails or leaves no importable
   CUDA module, ``python setup.py build_ext --inplace``; then ``scott_kernels.build_info()``.
2. ``tests``: ``pytest tests/ -k "not cpu"`` on the GPU (bf16, CUDA graphs, fullgraph compile,
   the cuda backend's WMMA and SIMT paths, triton; the CPU-device cases are CI's), on
   pytest-xdist workers when installed, with ``SCOTT_TRITON_SINGLE_CONFIG=1`` (one config per
   autotuned kernel: compile time stays small).
3. ``memcheck`` and ``racecheck``: compute-sanitizer over tests/gpu/sanitize_cases.py (every
   native and triton kernel, forward and backward), through tests/gpu/sanitize.sh.
4. ``bench_compile``: benchmarks/test_tokenizer.py once per case while the tests run: torch.compile's
   graphs and the Triton kernels land in their on-disk caches, and the cold first-call times are
   recorded; ``bench_tokenizer`` then times steady state at the headline shape (B=64, 224², D=384,
   bf16 autocast; dense path and mask ratios 0 / 0.6 / 0.75 / 0.9; every registered backend that
   runs, plus the reference under torch.compile; forward and forward+backward; medians of CUDA
   events after warm-up, first-call time, peak memory).
5. ``bench_train_step``: benchmarks/test_train_step.py (ViT-S/16 SCOTT MIM-JEPA step, B=64,
   bf16, both context modes, every backend that runs, the dense reference first).
6. The report in OUT_DIR (at most 8 files): ``summary.md``, ``check.json``, the two
   pytest-benchmark JSON files and four logs (build, tests, sanitizer, benchmarks).

Time budget on a GPU (H100/H200, 16 cores; the window is 7 min = 420 s, build included). Each
phase has a cap; its actual limit is the time left to the deadline minus the caps of the phases
after it, so time a phase leaves unused goes to the next one and no phase can take another's share:

    probe (versions, device)                          ~5 s
    build, one architecture                          120 s cap (expect 30-60 s)
    tests || memcheck || racecheck || compile pass   140 s cap (concurrent; none of them times
                                                               anything, so sharing the GPU and the
                                                               16 cores is harmless)
    tokenizer benchmark, alone on the GPU            100 s cap (60 cases x 24 calls, caches warm)
    training-step benchmark, alone on the GPU         50 s cap
    report                                             5 s reserved
    ------------------------------------------------------------
    total                                            420 s (--budget changes it; the caps scale)

The benchmarks run with one config per autotuned Triton kernel too (full autotuning compiles every
config of every kernel, many minutes): their triton figures are of the first config, not the
autotuned best; ``--autotune`` turns autotuning back on for a longer window.

``--dry``: every stage on the CPU with CUDA hidden: the build makes a C++-only wheel from a copy of
the source tree (the checkout and the environment stay untouched), the tests run a cheap subset
with the same options and report parsing, the sanitizer stages report "unavailable" (not a
failure) after running the case driver on the CPU, and the benchmarks run tiny shapes
(SCOTT_BENCH_CHECK=1). No figure from a dry run is a GPU measurement.

Exit status: 0 when every stage passed (or was unavailable, or not selected), 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))   # report.py beside this file, however it is loaded
from report import STAGES, parse_benchmarks, parse_junit, parse_pytest_log, render_markdown  # noqa: E402
MAX_FILES = 8
TITLES = {
    "build": "build the native module for this GPU",
    "tests": "pytest tests/",
    "memcheck": "compute-sanitizer memcheck",
    "racecheck": "compute-sanitizer racecheck",
    "bench_compile": "tokenizer benchmark, compile pass (cold first calls)",
    "bench_tokenizer": "tokenizer benchmark (headline shape)",
    "bench_train_step": "MIM-JEPA training-step benchmark",
}
# Phases run in order; the stages of one phase run concurrently. Caps in seconds (see the docstring).
PHASES = (("build",), ("tests", "memcheck", "racecheck", "bench_compile"), ("bench_tokenizer",), ("bench_train_step",))
GPU_CAPS = {"build": 120, "tests": 140, "bench_tokenizer": 100, "bench_train_step": 50}
GPU_BUDGET = 420
REPORT_RESERVE_S = 5     # writing the report, out of the budget
# The dry walk on CI's 2 shared cores: expected ~3 min; the caps only stop a hang.
DRY_CAPS = {"build": 240, "tests": 240, "bench_tokenizer": 240, "bench_train_step": 180}
DRY_BUDGET = 960
# On a GPU: every test but the CPU-device cases (``device="cpu"`` parameters, which CI runs; here
# the triton ones would not even run, since Triton interprets only with TRITON_INTERPRET=1).
GPU_TESTS = ["tests/", "-k", "not cpu"]
# Dry: a cheap subset (CI runs the whole suite separately) with the same options and report parsing.
DRY_TESTS = ["tests/test_gpu_check.py", "tests/test_native_tiles.py", "-k",
             "test_gpu_check or build_info or bad_arguments or out_of_range"]
OK_STATUSES = {"pass", "unavailable", "not selected"}
# file names in OUT_DIR (at most MAX_FILES)
FILES = {"summary": "summary.md", "json": "check.json", "tokenizer": "tokenizer.json",
         "train_step": "train_step.json", "build": "build.log", "tests": "tests.log",
         "sanitizer": "sanitizer.log", "benchmarks": "benchmarks.log"}
assert len(FILES) <= MAX_FILES


def log(msg: str) -> None:
    print(f"[check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class StageResult:
    name: str
    title: str
    status: str = "not run"   # pass | fail | timeout | interrupted | unavailable | not selected | not run
    seconds: float = 0.0
    limit_s: float | None = None
    note: str = ""
    commands: list[str] = field(default_factory=list)
    log: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


# ------------------------------------------------------------------------------------------------
# small pure helpers (unit-tested in tests/test_gpu_check.py)
# ------------------------------------------------------------------------------------------------
def arch_for(capability) -> str:
    """CMake CUDA architecture for a compute capability: the arch-specific variant ("90a",
    "100a") from sm_90 on, where the 'a' features need it; the plain number before ("80", "89")."""
    major, minor = int(capability[0]), int(capability[1])
    return f"{major}{minor}{'a' if major >= 9 else ''}"


def phase_limit(phase: int, caps_by_phase: list[float], now: float, deadline: float, floor: float = 20.0) -> float:
    """Limit of phase ``phase``: the time left to the deadline minus the caps of the later phases
    (never below ``floor``, so a late phase still gets a try and reports instead of vanishing)."""
    reserved = sum(caps_by_phase[phase + 1:])
    return max(floor, deadline - now - reserved)


# ------------------------------------------------------------------------------------------------
# running commands
# ------------------------------------------------------------------------------------------------
_ACTIVE: set[subprocess.Popen] = set()     # running stage commands, stopped if the check is interrupted
_STOPPING = threading.Event()              # set by SIGTERM/SIGINT: no new command starts


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the check: it stops its commands and writes what it has."""


def run_command(cmd: list[str], log_path: Path, env: dict, timeout: float, cwd: Path = ROOT) -> tuple[int | None, float]:
    """Runs cmd with its output appended to log_path; returns (exit status or None on timeout,
    seconds). On timeout the whole process group gets SIGTERM, then SIGKILL after 10 s."""
    start = time.monotonic()
    if _STOPPING.is_set():
        return None, 0.0
    with open(log_path, "ab") as f:
        f.write(f"\n$ {shlex.join(cmd)}   (cwd {cwd}, limit {timeout:.0f} s)\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _ACTIVE.add(proc)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            f.write(f"\n[check] stopped after {timeout:.0f} s (time limit)\n".encode())
            return None, time.monotonic() - start
        finally:
            _ACTIVE.discard(proc)
    return rc, time.monotonic() - start


def _on_signal(signum, frame):
    # Each command runs in its own session (so a time limit can stop its whole group): stop them
    # here too, or they would outlive the check.
    _STOPPING.set()
    for proc in list(_ACTIVE):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise Interrupted(signal.Signals(signum).name)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue



# ------------------------------------------------------------------------------------------------
# the check
# ------------------------------------------------------------------------------------------------
PROBE = r"""
import json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    device_count=torch.cuda.device_count())
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("triton", "pytest", "xdist", "pytest_benchmark", "timm", "torchvision", "pybind11", "cmake", "ninja",
            "setuptools", "scikit_build_core"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "present")
    except Exception:
        info[mod] = None
print("PROBE " + json.dumps(info))
"""

BUILD_INFO = r"""
import json, torch, scott_kernels
from scott_kernels import available_backends
info = scott_kernels.build_info()
info["module"] = scott_kernels._C.__file__
info["backends"] = available_backends("cuda" if torch.cuda.is_available() else "cpu")
print("BUILD_INFO " + json.dumps(info, default=str))
"""


class Check:
    def __init__(self, out: Path, dry: bool, budget: float | None, stages: set[str], autotune: bool,
                 python: str, argv: list[str]):
        self.out, self.dry, self.autotune, self.python, self.argv = out, dry, autotune, python, argv
        self.selected = stages
        caps = DRY_CAPS if dry else GPU_CAPS
        default_budget = DRY_BUDGET if dry else GPU_BUDGET
        scale = (budget / default_budget) if budget else 1.0
        self.budget = budget or default_budget
        self.caps = {k: v * scale for k, v in caps.items()}
        self.work = Path(tempfile.mkdtemp(prefix="scott-check-"))
        self.results = {name: StageResult(name, TITLES[name]) for name in STAGES}
        self.env_info: dict = {}
        self.build_info: dict | None = None
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.t0 = time.monotonic()
        self.ncpu = os.cpu_count() or 2
        self.interrupted: str | None = None

    # environment ------------------------------------------------------------------------------
    def base_env(self) -> dict:
        env = dict(os.environ)
        paths = [str(ROOT), str(ROOT / "python")]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["SCOTT_TRITON_SINGLE_CONFIG"] = "1"
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""      # the dry walk is a CPU run even on a GPU machine
        return env

    def probe(self) -> None:
        env = self.base_env()
        try:
            res = subprocess.run([self.python, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=120)
            line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")), None)
            self.env_info = json.loads(line[6:]) if line else {"probe_error": res.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            self.env_info = {"probe_error": "timed out"}
        self.env_info["cpu_count"] = self.ncpu
        self.env_info["host"] = platform.node()
        self.env_info["nvcc"] = _first_line_matching([_which_nvcc(), "--version"], "release")
        self.env_info["driver"] = _first_line_matching(["nvidia-smi", "--query-gpu=driver_version",
                                                        "--format=csv,noheader"], "") if not self.dry else None
        san = find_sanitizer()
        self.env_info["compute_sanitizer"] = san
        self.env_info["compute_sanitizer_version"] = _first_line_matching([san, "--version"], "Version") if san else None
        self.env_info["commit"] = _first_line_matching(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], "")
        self.env_info["dirty"] = bool(_first_line_matching(["git", "-C", str(ROOT), "status", "--porcelain"], ""))
        self.env_info["source_sha256"] = source_fingerprint(ROOT)
        dev = self.env_info.get("device") or "no GPU"
        log(f"{'dry walk on the CPU' if self.dry else 'device check'}: {dev}; torch {self.env_info.get('torch')}, "
            f"triton {self.env_info.get('triton')}, python {self.env_info.get('python')}, {self.ncpu} CPUs; "
            f"budget {self.budget:.0f} s")

    @property
    def has_gpu(self) -> bool:
        return bool(self.env_info.get("cuda_available"))

    # stages -----------------------------------------------------------------------------------
    def stage_build(self, res: StageResult, limit: float) -> None:
        log_path = self.work / FILES["build"]
        res.log = FILES["build"]
        deadline = time.monotonic() + limit
        env = self.base_env()
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(self.ncpu))
        wheels, arch = None, None
        if self.dry:
            # A C++-only wheel from a copy of the tree: proves the build runs without touching the
            # checkout's module, its build/ cache or the environment.
            env.pop("SCOTT_REQUIRE_CUDA", None)
            env["SCOTT_NO_CUDA"] = "1"
            src = self.work / "src"
            copy_tree(ROOT, src)
            wheels = self.work / "wheels"
            pip = [self.python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(wheels)]
            candidates = [("pip wheel, no build isolation", [pip + ["--no-build-isolation", str(src)]]),
                          ("pip wheel, isolated build environment", [pip + [str(src)]])]
            cwd = src
            what = "C++-only wheel (dry)"
        else:
            arch = os.environ.get("SCOTT_CUDA_ARCHS")
            if not arch:
                if not self.has_gpu:
                    res.status, res.note = "fail", "no CUDA device to read the architecture from (set SCOTT_CUDA_ARCHS, or use --dry)"
                    return
                arch = arch_for(self.env_info["capability"])
            env["SCOTT_CUDA_ARCHS"] = arch
            env["SCOTT_REQUIRE_CUDA"] = "1"
            env.pop("SCOTT_NO_CUDA", None)
            res.details["arch"] = arch
            # The package's own build first; if it fails, or leaves no importable CUDA module (e.g. a
            # build backend missing here, where nothing can be downloaded), setuptools in place; last,
            # CMake driven directly with only cmake, pybind11 and nvcc.
            candidates = [("pip editable install", [[self.python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                                                     "--no-deps", "--disable-pip-version-check", "-e", "."]])]
            if (ROOT / "setup.py").is_file():
                candidates.append(("setup.py build_ext --inplace", [[self.python, "setup.py", "build_ext", "--inplace"]]))
            candidates.append(("CMake directly", lambda: cmake_commands(self.python, ROOT, self.work / "cmake-build",
                                                                         arch, self.ncpu)))
            cwd = ROOT
            what = f"in place for SCOTT_CUDA_ARCHS={arch}"
        attempts, status = [], None
        for label, cmds in candidates:
            left = deadline - time.monotonic()
            if left <= 1:
                attempts.append(f"{label}: no time left")
                status = status or "timeout"
                break
            try:
                cmds = cmds() if callable(cmds) else cmds
            except RuntimeError as e:
                attempts.append(f"{label}: {e}")
                continue
            rc, secs = 0, 0.0
            for cmd in cmds:
                res.commands.append(shlex.join(cmd))
                rc, took = run_command(cmd, log_path, env, deadline - time.monotonic(), cwd=cwd)
                secs += took
                if rc != 0:
                    break
            if rc is None:        # the stage's time is spent: no fallback can run either
                why = "stopped: the check was interrupted" if _STOPPING.is_set() else "stopped at the limit"
                attempts.append(f"{label}: {why} ({secs:.0f} s)")
                status = "timeout"
                break
            ok, why = self._verify_build(env, log_path, wheels, arch) if rc == 0 else (False, f"exit {rc}")
            attempts.append(f"{label}: {'ok' if ok else why} ({secs:.0f} s)")
            if ok:
                status = "pass"
                break
        res.status = status or "fail"
        res.details["attempts"] = attempts
        built = self.build_info or {}
        desc = (f"cuda={built.get('cuda')} archs={built.get('cuda_archs')} CUDA {built.get('cuda_version')}, "
                f"{built.get('compiler')}; backends here: {', '.join(built.get('backends', []))}") if built else "nothing importable"
        res.note = f"{what}: " + "; ".join(attempts) + f". {'The checkout' if self.dry else 'Built'} module: {desc}"
        log(f"build: {res.status}: {res.note}")

    def _verify_build(self, env: dict, log_path: Path, wheels: Path | None, arch: str | None) -> tuple[bool, str]:
        """The module imports from the checkout and, on a GPU, holds CUDA kernels for ``arch``;
        in the dry walk the wheel holds a native module."""
        if wheels is not None:
            import zipfile

            found = [n for w in wheels.glob("*.whl") for n in zipfile.ZipFile(w).namelist()
                     if n.startswith("scott_kernels/_C")]
            if not found:
                return False, "the wheel holds no scott_kernels/_C module"
        if _STOPPING.is_set():
            return False, "the check was stopped"
        try:
            r = subprocess.run([self.python, "-c", BUILD_INFO], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return False, "importing the module timed out"
        with open(log_path, "a") as f:
            f.write(r.stdout + r.stderr)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BUILD_INFO ")), None)
        if r.returncode != 0 or line is None:
            return False, "the module does not import: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        self.build_info = json.loads(line[len("BUILD_INFO "):])
        log("built: " + json.dumps(self.build_info))
        if arch is not None:
            if not self.build_info.get("cuda"):
                return False, "the module has no CUDA kernels"
            if arch.rstrip("a") not in str(self.build_info.get("cuda_archs", "")):
                return False, f"the module was built for {self.build_info.get('cuda_archs')}, not {arch}"
        return True, "ok"

    def _pytest(self, res: StageResult, args: list[str], log_name: str, junit: Path, env: dict, limit: float) -> int | None:
        cmd = [self.python, "-m", "pytest", *args, "-p", "no:cacheprovider", f"--junitxml={junit}"]
        res.commands.append(shlex.join(cmd))
        rc, secs = run_command(cmd, self.work / log_name, env, limit)
        res.seconds = secs
        if junit.is_file():
            res.details.update(parse_junit(junit))
        else:                 # stopped at the limit: count what the -v log shows
            res.details.update(parse_pytest_log((self.work / log_name).read_text(errors="replace")))
            res.details["partial"] = True
        return rc

    @staticmethod
    def _status(rc: int | None) -> str:
        return "timeout" if rc is None else ("pass" if rc == 0 else "fail")

    def stage_tests(self, res: StageResult, limit: float) -> None:
        res.log = FILES["tests"]
        env = self.base_env()
        args = (DRY_TESTS if self.dry else GPU_TESTS) + ["-v", "-rfE", "--durations=15"]
        workers = 0
        if self.env_info.get("xdist"):
            # 8 workers on 16 cores, 2 threads each; every worker holds its own CUDA context (~0.5 GB)
            workers = max(1, min(8, self.ncpu // 2)) if not self.dry else 2
            args += ["-n", str(workers)]
            env["OMP_NUM_THREADS"] = str(max(1, self.ncpu // workers))
        rc = self._pytest(res, args, FILES["tests"], self.work / "tests.xml", env, limit)
        res.status = self._status(rc)
        d = res.details
        if rc == 5:
            res.note = "no tests collected"
        else:
            res.note = (f"{d['passed']} passed, {d['failed']} failed, {d['errors']} errors, {d['skipped']} skipped"
                        + (" (counted before the limit stopped it)" if d.get("partial") else "")
                        + (f" ({workers} xdist workers)" if workers else " (serial: pytest-xdist not installed)")
                        + ("; dry subset: " + shlex.join(DRY_TESTS) if self.dry else "; CPU-device cases deselected (CI runs them)"))
        log(f"tests: {res.status}: {res.note}")

    def stage_sanitizer(self, res: StageResult, limit: float) -> None:
        tool = res.name
        log_name = f"{tool}.log"
        res.log = FILES["sanitizer"]
        env = self.base_env()
        sanitizer = self.env_info.get("compute_sanitizer")
        if self.dry or not self.has_gpu or not sanitizer:
            why = ("dry walk: no GPU" if self.dry else "no CUDA device" if not self.has_gpu
                   else "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)")
            if tool == "memcheck":
                # still drive the case list on the CPU (cuda ops through their C++ twin) so it cannot rot
                cmd = [self.python, "tests/gpu/sanitize_cases.py", "--cpu", "cuda"]
                res.commands.append(shlex.join(cmd))
                rc, res.seconds = run_command(cmd, self.work / log_name, env, limit)
                if rc != 0:
                    res.status = self._status(rc)
                    res.note = f"{why}; the case driver failed on the CPU"
                    log(f"{tool}: {res.status}: {res.note}")
                    return
                why += "; the case driver ran on the CPU (cuda ops' C++ twin)"
            res.status, res.note = "unavailable", why
            log(f"{tool}: unavailable: {why}")
            return
        env["COMPUTE_SANITIZER"] = sanitizer
        env["SANITIZE_TOOLS"] = tool
        env["PYTHON"] = self.python
        cmd = ["bash", "tests/gpu/sanitize.sh"]
        res.commands.append(f"SANITIZE_TOOLS={tool} " + shlex.join(cmd))
        rc, res.seconds = run_command(cmd, self.work / log_name, env, limit)
        res.status = self._status(rc)
        text = (self.work / log_name).read_text(errors="replace")
        cases = [ln for ln in text.splitlines() if ln.endswith(": ok")]
        summary = [ln.strip() for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        res.details.update(cases_ok=cases, summary=summary)
        res.note = f"{len(cases)} cases ran clean" + (f"; {summary[-1]}" if summary else "")
        if rc is None:
            res.note += f"; stopped at the limit after {cases[-1] if cases else 'no case'}"
        log(f"{tool}: {res.status}: {res.note}")

    def _bench(self, res: StageResult, test_file: str, json_name: str, junit: str, limit: float,
               mode: str = "1", select: list[str] | None = None) -> None:
        res.log = FILES["benchmarks"]
        env = self.base_env()
        env["SCOTT_BENCH_CHECK"] = mode
        if self.autotune:
            env.pop("SCOTT_TRITON_SINGLE_CONFIG", None)
        out_json = self.work / json_name
        args = [test_file, "--benchmark-only", f"--benchmark-json={out_json}", "-v", "-rfE", *(select or [])]
        rc = self._pytest(res, args, f"{res.name}.log", self.work / junit, env, limit)
        res.status = self._status(rc)
        rows = parse_benchmarks(out_json)
        res.details["rows"] = rows
        d = res.details
        res.note = (f"{len(rows)} results; {d['failed']} failed, {d['errors']} errors, {d['skipped']} skipped"
                    + ("" if self.dry else "; triton: autotuned" if self.autotune else "; triton: first config per kernel"))
        log(f"{res.name}: {res.status}: {res.note}")

    def stage_bench_compile(self, res: StageResult, limit: float) -> None:
        """Every tokenizer case once, while the tests run: torch.compile's graphs and the Triton
        kernels land in their on-disk caches, so the timed stage measures steady state and fits its
        limit; the first-call times recorded here are the cold ones (on a shared machine)."""
        # dry: the dense cases only (the driver is the same; CI time is short)
        self._bench(res, "benchmarks/test_tokenizer.py", "compile_pass.json", "compile_pass.xml", limit,
                    mode="warm", select=["-k", "dense"] if self.dry else None)

    def stage_bench_tokenizer(self, res: StageResult, limit: float) -> None:
        self._bench(res, "benchmarks/test_tokenizer.py", FILES["tokenizer"], "tokenizer.xml", limit)

    def stage_bench_train_step(self, res: StageResult, limit: float) -> None:
        self._bench(res, "benchmarks/test_train_step.py", FILES["train_step"], "train_step.xml", limit)

    # driver -----------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            self._run_phases()
        except Interrupted as e:
            for res in self.results.values():
                if res.status == "running":
                    res.status = "interrupted"
                    res.note = f"the check was stopped ({e}) while this stage ran"
            log(f"interrupted ({e}): writing the report")
            self.interrupted = str(e)
        return self.report()

    def _run_phases(self) -> None:
        self.probe()
        deadline = self.t0 + self.budget - REPORT_RESERVE_S
        phase_caps = [max(self.caps.get(s, 0) for s in phase) for phase in PHASES]
        for i, phase in enumerate(PHASES):
            todo = [s for s in phase if s in self.selected]
            for s in phase:
                if s not in self.selected:
                    self.results[s].status = "not selected"
            if not todo:
                continue
            limit = phase_limit(i, phase_caps, time.monotonic(), deadline)
            log(f"phase {i + 1}/{len(PHASES)}: {', '.join(todo)} (limit {limit:.0f} s)")
            for name in todo:
                self.results[name].status = "running"
            with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
                futures = {pool.submit(self._run_stage, name, limit): name for name in todo}
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()
            # a report after every phase: if the window closes on the check, the last one is there
            self.report(final=False)

    def _run_stage(self, name: str, limit: float) -> None:
        res = self.results[name]
        res.limit_s = round(limit, 1)
        start = time.monotonic()
        try:
            fn = self.stage_sanitizer if name in ("memcheck", "racecheck") else getattr(self, f"stage_{name}")
            fn(res, limit)
        except Exception as e:      # a bug in a stage's driver is that stage's failure, not the run's
            res.status, res.note = "fail", f"the check's driver raised {type(e).__name__}: {e}"
            log(f"{name}: {res.note}")
        if _STOPPING.is_set():
            res.status, res.note = "interrupted", "the check was stopped while this stage ran; " + res.note
        res.seconds = round(time.monotonic() - start, 1)

    # report -----------------------------------------------------------------------------------
    def report(self, final: bool = True) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        # logs: one file per kind (the sanitizer's two tools and the two benchmarks share one)
        for key, parts in (("build", ["build.log"]), ("tests", ["tests.log"]),
                           ("sanitizer", ["memcheck.log", "racecheck.log"]),
                           ("benchmarks", ["bench_compile.log", "bench_tokenizer.log", "bench_train_step.log"])):
            chunks = [f"===== {p}\n" + (self.work / p).read_text(errors="replace") for p in parts if (self.work / p).is_file()]
            (self.out / FILES[key]).write_text("\n".join(chunks) if chunks else "(stage not run)\n")
        for key in ("tokenizer", "train_step"):
            src = self.work / FILES[key]
            if src.is_file():
                shutil.copyfile(src, self.out / FILES[key])
            elif (self.out / FILES[key]).exists():
                (self.out / FILES[key]).unlink()     # a stale file from an earlier run would mislead
        total = time.monotonic() - self.t0
        ok = all(r.ok for r in self.results.values())
        doc = {
            "schema": 1,
            "mode": "dry" if self.dry else "gpu",
            "command": "bash tests/gpu/check.sh " + shlex.join(self.argv),
            "ok": ok,
            "started_utc": self.started.isoformat(timespec="seconds"),
            "total_s": round(total, 1),
            "budget_s": self.budget,
            "triton_autotune": self.autotune,
            "interrupted": self.interrupted,
            "env": self.env_info,
            "build_info": self.build_info,
            "stages": [asdict(self.results[s]) for s in STAGES],
        }
        if not final:
            doc["partial"] = True
        (self.out / FILES["json"]).write_text(json.dumps(doc, indent=1, default=str))
        (self.out / FILES["summary"]).write_text(render_markdown(doc, self.work))
        if not final:
            return 0 if ok else 1
        log(f"{'PASS' if ok else 'FAIL'} in {total:.0f} s; summary: {self.out / FILES['summary']}")
        for r in self.results.values():
            log(f"  {r.name:17s} {r.status:12s} {r.seconds:7.1f} s  {r.note[:150]}")
        shutil.rmtree(self.work, ignore_errors=True)
        return 0 if ok else 1


def source_fingerprint(root: Path) -> str:
    """sha256 (12 hex digits) over the sources that decide the results (kernels, package, build
    files, tests, benchmarks): names the code measured even where the copy has no git history."""
    import hashlib

    h = hashlib.sha256()
    files = [p for d in ("csrc", "scott_kernels", "python", "benchmarks", "tests") if (root / d).is_dir()
             for p in (root / d).rglob("*") if p.is_file() and p.suffix in {".py", ".cu", ".h", ".cpp", ".cuh", ".sh", ".yaml"}]
    files += [root / n for n in ("setup.py", "pyproject.toml", "CMakeLists.txt") if (root / n).is_file()]
    for p in sorted(files):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def cmake_commands(python: str, root: Path, build_dir: Path, arch: str, jobs: int) -> list[list[str]]:
    """Configure and build the native module with CMake alone (what setup.py drives), its output
    in place in root/scott_kernels. Raises RuntimeError naming what is missing."""
    cmake = shutil.which("cmake") or _module_bin(python, "cmake", "CMAKE_BIN_DIR", "cmake")
    if not cmake:
        raise RuntimeError("cmake not found (PATH or the cmake package)")
    try:
        pybind11_dir = subprocess.run([python, "-c", "import pybind11; print(pybind11.get_cmake_dir())"],
                                      capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        raise RuntimeError("pybind11 is not importable") from None
    nvcc = _which_nvcc()
    if not Path(nvcc).is_file():
        raise RuntimeError("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
    configure = [cmake, "-S", str(root), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={python}", f"-Dpybind11_DIR={pybind11_dir}",
                 f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={root / 'scott_kernels'}",
                 "-DSCOTT_WITH_CUDA=ON", f"-DSCOTT_CUDA_ARCHS={arch}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    ninja = shutil.which("ninja") or _module_bin(python, "ninja", "BIN_DIR", "ninja")
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return [configure, [cmake, "--build", str(build_dir), "--target", "_C", "--parallel", str(jobs)]]


def _module_bin(python: str, module: str, attr: str, exe: str) -> str | None:
    """The executable a pip-installed tool package (cmake, ninja) ships, when not on PATH."""
    try:
        r = subprocess.run([python, "-c", f"import {module}; print({module}.{attr})"], capture_output=True,
                           text=True, timeout=60)
    except (subprocess.SubprocessError, OSError):
        return None
    path = Path(r.stdout.strip()) / exe
    return str(path) if r.returncode == 0 and path.is_file() else None


def copy_tree(src: Path, dst: Path) -> None:
    """The source files of the checkout (tracked and untracked-not-ignored when it is a git
    checkout; else everything but build outputs) copied to dst."""
    try:
        names = subprocess.run(["git", "-C", str(src), "ls-files", "-co", "--exclude-standard", "-z"],
                               capture_output=True, check=True).stdout.decode().split("\0")
        names = [n for n in names if n and (src / n).is_file()]
    except (subprocess.CalledProcessError, FileNotFoundError):
        names = None
    if names is None:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                 "__pycache__", "*.so"))
        return
    for n in names:
        (dst / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / n, dst / n)


def _which_nvcc() -> str:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def find_sanitizer() -> str | None:
    """compute-sanitizer from COMPUTE_SANITIZER, PATH, next to nvcc, CUDA_HOME or /usr/local/cuda."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer")]
    nvcc_dir = Path(_which_nvcc()).parent
    for base in (nvcc_dir.parent, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")), Path("/usr/local/cuda")):
        candidates += [str(base / "bin" / "compute-sanitizer"), str(base / "compute-sanitizer" / "compute-sanitizer")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _first_line_matching(cmd: list[str], needle: str) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    for ln in r.stdout.splitlines():
        if needle in ln and ln.strip():
            return ln.strip()
    return None


def verify(out: Path) -> list[str]:
    """Problems with a check's OUT_DIR (empty when it is complete): the summary and JSON exist,
    at most MAX_FILES files, every stage ran and is reported in both with a known status."""
    problems = []
    files = [p for p in out.iterdir()] if out.is_dir() else []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out}, more than {MAX_FILES}")
    summary, js = out / FILES["summary"], out / FILES["json"]
    missing = [f"missing or empty: {p}" for p in (summary, js) if not p.is_file() or p.stat().st_size == 0]
    if missing:
        return problems + missing
    doc = json.loads(js.read_text())
    md = summary.read_text()
    known = OK_STATUSES | {"fail", "timeout", "interrupted", "running", "not run"}
    by_name = {s["name"]: s for s in doc.get("stages", [])}
    for name in STAGES:
        s = by_name.get(name)
        if s is None:
            problems.append(f"stage {name} missing from {js.name}")
            continue
        if s["status"] not in known:
            problems.append(f"stage {name} has an unknown status {s['status']!r}")
        if s["status"] in ("not run", "not selected", "running"):
            problems.append(f"stage {name} did not run ({s['status']})")
        if f"| {name} | {s['status']} |" not in md:
            problems.append(f"stage {name} missing from {summary.name}")
    for key in ("device" if doc.get("mode") == "gpu" else "python", "torch", "triton"):
        if key not in doc.get("env", {}):
            problems.append(f"{js.name} lacks env.{key}")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="bash tests/gpu/check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="where the summary, JSON and logs go (at most 8 files)")
    p.add_argument("--dry", action="store_true", help="walk every stage on tiny shapes on the CPU")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check (default {GPU_BUDGET}, dry {DRY_BUDGET}); the stage caps scale with it")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset to run (default: all): " + ", ".join(STAGES))
    p.add_argument("--autotune", action="store_true",
                   help="benchmarks with Triton's full autotuning (needs a longer window than 7 minutes)")
    p.add_argument("--verify", action="store_true", help="only check that OUT_DIR holds a complete report")
    args = p.parse_args(argv)
    if args.verify:
        problems = verify(args.out_dir)
        for msg in problems:
            print(f"check --verify: {msg}", file=sys.stderr)
        if not problems:
            print(f"check --verify: {args.out_dir} holds a complete report")
        return 1 if problems else 0
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = stages - set(STAGES)
    if unknown:
        p.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be positive seconds, got {args.budget}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"OUT_DIR {args.out_dir} exists and is not a directory")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(args.out_dir.resolve(), args.dry, args.budget, stages, args.autotune, sys.executable, argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return check.run()


if __name__ == "__main__":
    sys.exit(main())
