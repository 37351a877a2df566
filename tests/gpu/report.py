"""Reading the GPU check's results and writing its report (tests/gpu/check.py runs the stages):
pytest junit files and logs, pytest-benchmark JSON, the benchmark tables and summary.md."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ("build", "tests", "memcheck", "racecheck", "bench_compile", "bench_tokenizer", "bench_train_step")


def parse_junit(path: Path) -> dict:
    """Counts, failing test ids and skip reasons (with counts) from a pytest junit XML file."""
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    if not path.is_file():
        return out
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        out["parse_error"] = str(e)
        return out
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            key = "failed" if "failure" in kinds else "errors"
            out[key] += 1
            msg = (kinds.get("failure") if "failure" in kinds else kinds["error"]).get("message", "")
            out["failures"].append(f"{name}: {msg.splitlines()[0][:200] if msg else key}")
        elif "skipped" in kinds:
            out["skipped"] += 1
            reason = kinds["skipped"].get("message", "").strip()[:160] or "(no reason)"
            out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    return out


_RESULT = re.compile(r"^(?:\[gw\d+\] \[\s*\d+%\] )?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+::\S+)"
                     r"|^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_pytest_log(text: str) -> dict:
    """Counts and failing ids from ``pytest -v`` output (serial or xdist): the fallback when a
    run stopped at its time limit before writing its junit file."""
    status: dict[str, str] = {}
    for line in text.splitlines():
        m = _RESULT.match(line.strip())
        if m:
            word, nodeid = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            status.setdefault(nodeid, word)
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "skipped"}
    for nodeid, word in status.items():
        out[key[word]] += 1
        if word in ("FAILED", "ERROR"):
            out["failures"].append(nodeid)
    return out


def _mask_label(ratio) -> str:
    return "dense (keep=None)" if ratio is None else f"{float(ratio):.2f}"


def parse_benchmarks(path: Path) -> list[dict]:
    """Rows from a pytest-benchmark JSON file: params, extra_info and the medians in ms (CUDA
    events where recorded, else the wall-clock median)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        extra, stats, params = b.get("extra_info", {}), b.get("stats", {}), b.get("params") or {}
        wall = stats.get("median")
        event = extra.get("event_median_ms")
        rows.append(dict(
            name=b.get("name"), group=b.get("group"), params=params, extra=extra,
            rounds=stats.get("rounds"),
            wall_median_ms=None if wall is None else wall * 1e3,
            event_median_ms=event,
            median_ms=event if event is not None else (None if wall is None else wall * 1e3),
            timer="CUDA events" if event is not None else "wall clock",
        ))
    return rows


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}"


# display order; backends not named here (new ones) follow in the order they ran
_DISPLAY_ORDER = ("reference", "reference_compiled", "torch", "triton", "cuda")


def _order(names) -> list[str]:
    seen = list(dict.fromkeys(names))
    return [n for n in _DISPLAY_ORDER if n in seen] + [n for n in seen if n not in _DISPLAY_ORDER]


def _key(r: dict) -> tuple:
    return r["params"].get("direction"), _mask_label(r["params"].get("mask_ratio")), r["params"].get("backend")


def tokenizer_tables(rows: list[dict], cold: list[dict] | None = None) -> tuple[list[str], list[str]]:
    """Markdown tables of the tokenizer benchmark and plain lines naming every case where a
    fast backend is slower than the compiled dense reference. ``cold``: the compile pass's rows,
    whose first calls ran with empty compile caches."""
    if not rows:
        return ["(no results)"], []
    backends = _order(r["params"].get("backend") for r in rows)
    ratios = {r["params"].get("mask_ratio") for r in rows}
    masks = [_mask_label(m) for m in sorted(ratios, key=lambda m: -1.0 if m is None else float(m))]
    cell = {_key(r): r for r in rows}
    cold_cell = {_key(r): r for r in cold or []}
    lines, slower = [], []
    first = rows[0]
    timer = first["timer"]
    for direction, title in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        if not any(k[0] == direction for k in cell):
            continue
        lines += [f"**{title}**: median ms ({timer}); in brackets the speed-up over the compiled dense reference", "",
                  "| mask ratio | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
        for mask in masks:
            ref_c = cell.get((direction, mask, "reference_compiled"))
            out = []
            for be in backends:
                r = cell.get((direction, mask, be))
                if r is None or r["median_ms"] is None:
                    out.append("–")
                    continue
                text = _fmt(r["median_ms"])
                if ref_c is not None and ref_c["median_ms"] and be not in ("reference", "reference_compiled"):
                    ratio = ref_c["median_ms"] / r["median_ms"]
                    text += f" ({ratio:.2f}×)"
                    if ratio < 1.0:
                        slower.append(f"{be} {title} at mask {mask}: {r['median_ms']:.3f} ms vs the compiled "
                                      f"reference's {ref_c['median_ms']:.3f} ms")
                out.append(text)
            lines.append(f"| {mask} | " + " | ".join(out) + " |")
        lines.append("")
    lines += ["**first call** s, cold (empty compile caches: the compile pass, which shared the machine with "
              "the tests) / warm (the timed run, caches filled), compile and autotune included; **peak memory** "
              "MiB of one call", "",
              "| backend | direction | " + " | ".join(masks) + " |", "|---|---|" + "---|" * len(masks)]
    for be in backends:
        for direction in ("fwd", "fwd_bwd"):
            vals = []
            for mask in masks:
                r, c = cell.get((direction, mask, be)), cold_cell.get((direction, mask, be))
                if r is None:
                    vals.append("–")
                else:
                    first = _fmt(c["extra"].get("first_call_s") if c else None)
                    vals.append(f"{first} / {_fmt(r['extra'].get('first_call_s'))} · "
                                f"{_fmt(r['extra'].get('peak_mem_mib'), 0)}")
            if any(v != "–" for v in vals):
                lines.append(f"| {be} | {direction} | " + " | ".join(vals) + " |")
    lines.append("")
    return lines, slower


def train_step_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no results)"]
    backends = _order(r["params"].get("backend") for r in rows)
    modes = list(dict.fromkeys(r["params"].get("mode") for r in rows))
    cell = {(r["params"].get("backend"), r["params"].get("mode")): r for r in rows}
    lines = [f"median ms per step ({rows[0]['timer']}); in brackets the speed-up over the dense-reference tokenizer", "",
             "| tokenizer backend | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for be in backends:
        out = []
        for mode in modes:
            r, ref = cell.get((be, mode)), cell.get(("reference", mode))
            if r is None or r["median_ms"] is None:
                out.append("–")
                continue
            text = _fmt(r["median_ms"])
            if ref is not None and ref["median_ms"] and be != "reference":
                text += f" ({ref['median_ms'] / r['median_ms']:.2f}×)"
            out.append(text)
        lines.append(f"| {be} | " + " | ".join(out) + " |")
    lines.append("")
    return lines




def render_markdown(doc: dict, work: Path | None = None) -> str:
    env = doc.get("env", {})
    dry = doc["mode"] == "dry"
    stages = {s["name"]: s for s in doc["stages"]}
    device = env.get("device") or "no GPU"
    cap = env.get("capability")
    lines = [f"# Device check: {device}{' (dry walk on the CPU)' if dry else ''}", ""]
    if doc.get("partial"):
        lines += ["**Partial report**: written after a phase; the check was still running (stages "
                  "marked \"not run\" had not started).", ""]
    verdict = "INCOMPLETE" if doc.get("partial") else "PASS" if doc["ok"] else "FAIL"
    lines += [f"**{verdict}** · {doc['started_utc']} · `{doc['command']}` · "
              f"{doc['total_s']:.0f} s of a {doc['budget_s']:.0f} s budget", ""]
    if doc.get("interrupted"):
        lines += [f"**Interrupted** by {doc['interrupted']}: the stage running then is marked \"interrupted\", "
                  "later ones \"not run\".", ""]
    if dry:
        lines += ["A dry walk: tiny shapes on the CPU, CUDA hidden. It proves the stages run; "
                  "none of its figures is a GPU measurement.", ""]
    bi = doc.get("build_info") or {}
    lines += ["| | |", "|---|---|",
              f"| device | {device}" + (f" (sm_{cap[0]}{cap[1]}, {env.get('sm_count')} SMs, {env.get('gpu_memory_gib')} GiB)" if cap else "") + " |",
              f"| driver | {env.get('driver') or '–'} |",
              f"| torch | {env.get('torch')} (CUDA {env.get('torch_cuda')}) |",
              f"| triton | {env.get('triton')} |",
              f"| nvcc | {env.get('nvcc') or '–'} |",
              f"| compute-sanitizer | {env.get('compute_sanitizer_version') or 'not found'} |",
              f"| python | {env.get('python')} · {env.get('cpu_count')} CPUs · pytest-xdist {env.get('xdist') or 'absent'} |",
              f"| source | {env.get('commit') or 'not a git checkout'}{' (with uncommitted changes)' if env.get('dirty') else ''}"
              f" · sources sha256 {env.get('source_sha256')} |",
              f"| native module | " + (f"cuda={bi.get('cuda')}, archs {bi.get('cuda_archs')}, CUDA {bi.get('cuda_version')}, "
                                      f"{bi.get('compiler')}; backends: {', '.join(bi.get('backends', []))}" if bi else "–") + " |",
              "", "## Stages", "", "| stage | status | time s | limit s | result |", "|---|---|---|---|---|"]
    for name in STAGES:
        s = stages[name]
        note = s["note"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {_fmt(s['limit_s'], 0)} | {note} |")
    lines.append("")

    for name in ("tests", "bench_compile", "bench_tokenizer", "bench_train_step"):
        t = stages[name]["details"]
        if t.get("failures"):
            lines += [f"### {name}: failing", ""] + [f"- `{f}`" for f in t["failures"][:40]] + [""]
        if t.get("skip_reasons") and name != "bench_compile":
            lines += [f"### {name}: skipped (reason: count)", ""]
            lines += [f"- {reason}: {n}" for reason, n in sorted(t["skip_reasons"].items(), key=lambda kv: -kv[1])[:20]]
            lines.append("")

    tok = stages["bench_tokenizer"]["details"].get("rows", [])
    lines += ["## Tokenizer benchmark", ""]
    if tok:
        e = tok[0]["extra"]
        kinds = sorted({r["extra"].get("mask") for r in tok} - {None, "keep=None"})
        compiled = sorted({r["extra"].get("compile_backend") for r in tok} - {None})
        lines += [f"B={e.get('batch')}, {e.get('img_size')}², D={e.get('embed_dim')}, {e.get('dtype')}"
                  f"{' autocast' if not dry else ''}; masks: {', '.join(kinds) or '–'} (exact visible count per image); "
                  f"{tok[0]['rounds']} rounds after warm-up; reference_compiled: torch.compile "
                  f"({', '.join(compiled) or '–'})"
                  + ("" if dry else "; triton " + ("autotuned" if doc.get("triton_autotune")
                                                    else "with the first config of each kernel (not autotuned)"))
                  + ".", ""]
    tables, slower = tokenizer_tables(tok, stages["bench_compile"]["details"].get("rows", []))
    lines += tables
    if slower and not dry:
        lines += ["**Slower than the compiled dense reference:**", ""] + [f"- {s}" for s in slower] + [""]
    lines += ["## Training step (MIM-JEPA)", ""]
    train = stages["bench_train_step"]["details"].get("rows", [])
    if train:
        e = train[0]["extra"]
        lines += [f"B={e.get('batch')}, {e.get('img_size')}², D={e.get('embed_dim')}, {e.get('precision')}; "
                  f"{train[0]['rounds']} rounds after warm-up.", ""]
    lines += train_step_table(train)

    failed = [s for s in doc["stages"] if s["status"] in ("fail", "timeout", "interrupted")]
    if failed and work is not None:
        lines += ["## Failed stages: end of their logs", ""]
        for s in failed:
            logs = {"memcheck": "memcheck.log", "racecheck": "racecheck.log", "bench_compile": "bench_compile.log",
                    "bench_tokenizer": "bench_tokenizer.log", "bench_train_step": "bench_train_step.log",
                    }.get(s["name"], s["log"] or "")
            lines += [f"### {s['name']} ({s['log']})", "", "```", tail(work / logs, 30) if logs else "", "```", ""]
    return "\n".join(lines) + "\n"

def tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])
