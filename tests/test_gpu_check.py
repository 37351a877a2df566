"""The device check's driver (tests/gpu/check.py): architecture choice, time limits, result
parsing and the report (tests/gpu/report.py), and its verification. The whole dry walk runs in CI through .ci/run."""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent / "gpu" / "check.py"
_spec = importlib.util.spec_from_file_location("scott_device_check", _PATH)
check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = check          # dataclasses resolve their module through sys.modules
_spec.loader.exec_module(check)
report = sys.modules["report"]           # its result parsing and report writing, loaded by check.py


def test_arch_for_capability():
    assert check.arch_for((9, 0)) == "90a"
    assert check.arch_for([10, 0]) == "100a"
    assert check.arch_for((8, 0)) == "80"
    assert check.arch_for((8, 9)) == "89"


def test_phase_limits_pass_unused_time_forward_and_keep_later_caps():
    caps = [120, 140, 100, 50]
    assert check.phase_limit(0, caps, now=0, deadline=415) == 415 - 290
    # the build took 40 s: the tests phase gets its cap plus the 80 s left over
    assert check.phase_limit(1, caps, now=40, deadline=415) == 415 - 40 - 150
    assert check.phase_limit(3, caps, now=300, deadline=415) == 115
    # past the deadline a phase still gets the floor, so it reports instead of vanishing
    assert check.phase_limit(3, caps, now=500, deadline=415) == 20
    assert sum(check.GPU_CAPS[max(p, key=lambda s: check.GPU_CAPS.get(s, 0))] for p in check.PHASES) \
        <= check.GPU_BUDGET - 5


def test_parse_junit(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok[cuda]"/>
      <testcase classname="tests.test_a" name="test_bad[cuda]"><failure message="AssertionError: 3 != 4">tb</failure></testcase>
      <testcase classname="tests.test_a" name="test_err"><error message="fixture broke">tb</error></testcase>
      <testcase classname="tests.test_b" name="test_s1"><skipped message="needs a CUDA GPU"/></testcase>
      <testcase classname="tests.test_b" name="test_s2"><skipped message="needs a CUDA GPU"/></testcase>
    </testsuite></testsuites>""")
    r = report.parse_junit(xml)
    assert (r["passed"], r["failed"], r["errors"], r["skipped"]) == (1, 1, 1, 2)
    assert r["failures"][0] == "tests.test_a::test_bad[cuda]: AssertionError: 3 != 4"
    assert r["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert report.parse_junit(tmp_path / "absent.xml")["passed"] == 0


def test_parse_pytest_log_serial_and_xdist():
    serial = "\n".join([
        "tests/test_a.py::test_x[cuda] PASSED                       [ 25%]",
        "tests/test_a.py::test_y[cuda] FAILED                       [ 50%]",
        "tests/test_a.py::test_z SKIPPED (needs a CUDA GPU)          [ 75%]",
        "FAILED tests/test_a.py::test_y[cuda] - AssertionError",     # the -rfE summary repeats it
    ])
    r = report.parse_pytest_log(serial)
    assert (r["passed"], r["failed"], r["skipped"]) == (1, 1, 1) and r["failures"] == ["tests/test_a.py::test_y[cuda]"]
    xdist = "[gw0] [ 50%] PASSED tests/test_a.py::test_x[cuda] \n[gw1] [100%] ERROR tests/test_b.py::test_w "
    r = report.parse_pytest_log(xdist)
    assert (r["passed"], r["errors"]) == (1, 1)


def _bench_json(path, rows):
    benches = []
    for params, median_s, extra in rows:
        benches.append({"name": "n", "group": "g", "params": params, "stats": {"median": median_s, "rounds": 20},
                        "extra_info": extra})
    path.write_text(json.dumps({"benchmarks": benches}))


def test_tokenizer_tables_flag_backends_slower_than_the_compiled_reference(tmp_path):
    common = dict(batch=64, img_size=224, embed_dim=384, dtype="torch.bfloat16", mask="blockwise")
    rows = []
    for backend, ms in (("reference", 7.0), ("reference_compiled", 3.5), ("triton", 2.0), ("cuda", 5.0)):
        rows.append(({"backend": backend, "direction": "fwd_bwd", "mask_ratio": 0.6, "shape": [64, 384]}, 1.0,
                     dict(common, event_median_ms=ms, first_call_s=1.5, peak_mem_mib=100.0)))
    rows.append(({"backend": "torch", "direction": "fwd", "mask_ratio": None, "shape": [64, 384]}, 0.004, {}))
    _bench_json(tmp_path / "t.json", rows)
    parsed = report.parse_benchmarks(tmp_path / "t.json")
    assert parsed[0]["median_ms"] == 7.0 and parsed[0]["timer"] == "CUDA events"
    assert parsed[-1]["median_ms"] == pytest.approx(4.0) and parsed[-1]["timer"] == "wall clock"
    cold = [dict(parsed[0], extra=dict(parsed[0]["extra"], first_call_s=42.0))]
    lines, slower = report.tokenizer_tables(parsed, cold)
    text = "\n".join(lines)
    assert "| reference | reference_compiled | torch | triton | cuda |" in text   # reference first
    assert "2.00 (1.75×)" in text and "5.00 (0.70×)" in text
    assert len(slower) == 1 and slower[0].startswith("cuda forward + backward at mask 0.60")
    assert "| reference | fwd_bwd | – | 42.00 / 1.50 · 100 |" in text     # cold / warm first call · peak MiB
    assert "| cuda | fwd_bwd | – | – / 1.50 · 100 |" in text


def test_train_step_table_speedups(tmp_path):
    rows = [({"backend": b, "mode": m}, s, {"event_median_ms": s * 1e3})
            for b, s in (("reference", 0.040), ("triton", 0.032)) for m in ("mask_tokens", "visible_only")]
    _bench_json(tmp_path / "s.json", rows)
    text = "\n".join(report.train_step_table(report.parse_benchmarks(tmp_path / "s.json")))
    assert "| triton | 32.00 (1.25×) | 32.00 (1.25×) |" in text


def _doc(statuses):
    stages = [dict(check.StageResult(name, check.TITLES[name], status=statuses.get(name, "pass"), seconds=1.0,
                                     limit_s=10.0).__dict__) for name in check.STAGES]
    return {"schema": 1, "mode": "dry", "command": "bash tests/gpu/check.sh --dry out", "ok": True,
            "started_utc": "2026-01-01T00:00:00+00:00", "total_s": 6.0, "budget_s": 420,
            "env": {"python": "3.12", "torch": "2.11", "triton": "3.6"}, "build_info": None, "stages": stages}


def test_render_and_verify(tmp_path):
    doc = _doc({"memcheck": "unavailable", "racecheck": "unavailable"})
    (tmp_path / "check.json").write_text(json.dumps(doc))
    (tmp_path / "summary.md").write_text(report.render_markdown(doc))
    assert check.verify(tmp_path) == []
    assert "| memcheck | unavailable |" in (tmp_path / "summary.md").read_text()
    # a stage missing from the JSON, and too many files, are both reported
    doc["stages"] = doc["stages"][:-1]
    (tmp_path / "check.json").write_text(json.dumps(doc))
    for i in range(8):
        (tmp_path / f"extra{i}.log").write_text("x")
    problems = check.verify(tmp_path)
    assert any("bench_train_step missing" in p for p in problems)
    assert any("more than 8" in p for p in problems)
    assert check.verify(tmp_path / "nowhere")


def test_command_line_errors(tmp_path):
    with pytest.raises(SystemExit) as e:
        check.main(["--stages", "tests,bogus", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        check.main(["--budget", "-1", str(tmp_path)])


def test_run_command_stops_the_whole_process_group_at_its_limit(tmp_path):
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    rc, _ = check.run_command(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], tmp_path / "log",
                              dict(os.environ), timeout=1, cwd=tmp_path)
    assert rc is None and time.monotonic() - start < 30
    assert "time limit" in (tmp_path / "log").read_text()
    child = int(pid_file.read_text())
    time.sleep(0.2)
    try:     # gone, or a zombie waiting to be reaped: the background sleep was stopped with its group
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X")


def test_cmake_fallback_commands(tmp_path, monkeypatch):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("")
    monkeypatch.setattr(check, "_which_nvcc", lambda: str(nvcc))
    monkeypatch.setattr(check.shutil, "which", lambda name: f"/opt/bin/{name}")

    class Done:
        returncode, stdout = 0, "/site/pybind11/share/cmake/pybind11\n"

    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: Done())
    configure, build = check.cmake_commands("/py", tmp_path, tmp_path / "b", "90a", 16)
    assert configure[:5] == ["/opt/bin/cmake", "-S", str(tmp_path), "-B", str(tmp_path / "b")]
    assert {"-DSCOTT_WITH_CUDA=ON", "-DSCOTT_CUDA_ARCHS=90a", f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={tmp_path / 'scott_kernels'}", "-DPython_EXECUTABLE=/py",
            "-Dpybind11_DIR=/site/pybind11/share/cmake/pybind11", "-G", "Ninja"} <= set(configure)
    assert build == ["/opt/bin/cmake", "--build", str(tmp_path / "b"), "--target", "_C", "--parallel", "16"]

    def no_pybind11(*a, **k):
        raise check.subprocess.CalledProcessError(1, a[0])

    monkeypatch.setattr(check.subprocess, "run", no_pybind11)
    with pytest.raises(RuntimeError, match="pybind11"):
        check.cmake_commands("/py", tmp_path, tmp_path / "b", "90a", 16)
