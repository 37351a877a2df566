"""Seed study of the main job: ``mimjepa demo`` once per seed, then mean ± std over the seeds of
the frozen-probe top-1 test accuracy, pretrained against randomly initialised encoder.

    python benchmarks/mimjepa_seed_study.py                      # seeds 0 1 2 into runs/seed_study
    python benchmarks/mimjepa_seed_study.py --seeds 0 1 --out DIR
    python benchmarks/mimjepa_seed_study.py --collect-only       # tabulate runs already in --out

Each demo runs in its own process; its wall time and CPU time (user + sys of the process and its
children) are recorded next to its probe numbers. Prints a Markdown table (for RESULTS.md) and
writes it, with the raw numbers, to DIR/study.md and DIR/study.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBES = (("knn", "k-NN"), ("linear", "linear"), ("best_attentive", "best attentive"))


def run_demo(seed: int, out: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mimjepa.cli", "demo", "--seed", str(seed), "--out", str(out)],
                   check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = {"wall_s": wall, "cpu_s": cpu}
    (out / "timing.json").write_text(json.dumps(timing))
    return timing


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{statistics.fmean(values):.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


# The main job's bar, on the mean over seeds: k-NN and linear at least 5 points above random init,
# the best attentive probe not below it.
BAR = {"knn": 5.0, "linear": 5.0, "best_attentive": 0.0}


def bar_verdict(runs: dict[int, dict]) -> str:
    mean_gain = {p: statistics.fmean(runs[s]["top1"][p]["gain"] for s in runs) for p in BAR}
    missed = [label for p, label in PROBES if mean_gain[p] < BAR[p]]
    gains = ", ".join(f"{label} {mean_gain[p]:+.1f}" for p, label in PROBES)
    return (f"bar (mean gain over {len(runs)} seeds: k-NN and linear >= +5, best attentive >= +0): "
            f"{'met' if not missed else 'NOT met (' + ', '.join(missed) + ')'}; mean gains {gains}")


def tabulate(runs: dict[int, dict]) -> str:
    seeds = sorted(runs)
    lines = ["| seed | " + " | ".join(f"{label}: pretrained / random init (gain)" for _, label in PROBES)
             + " | wall min | CPU min |",
             "|---|" + "---|" * len(PROBES) + "---|---|"]
    for s in seeds:
        top1, timing = runs[s]["top1"], runs[s].get("timing", {})
        cells = [f"{top1[p]['pretrained']:.1f} / {top1[p]['random_init']:.1f} ({top1[p]['gain']:+.1f})" for p, _ in PROBES]
        wall = f"{timing['wall_s'] / 60:.1f}" if "wall_s" in timing else "-"
        cpu = f"{timing['cpu_s'] / 60:.1f}" if "cpu_s" in timing else "-"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {wall} | {cpu} |")
    cells = []
    for p, _ in PROBES:
        pre = [runs[s]["top1"][p]["pretrained"] for s in seeds]
        rnd = [runs[s]["top1"][p]["random_init"] for s in seeds]
        gain = [runs[s]["top1"][p]["gain"] for s in seeds]
        cells.append(f"{_mean_std(pre)} / {_mean_std(rnd)} ({_mean_std(gain)})")
    lines.append(f"| mean ± std ({len(seeds)} seeds) | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/seed_study"))
    parser.add_argument("--collect-only", action="store_true", help="tabulate the runs already in --out")
    args = parser.parse_args(argv)
    runs = {}
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        if not args.collect_only:
            run_demo(seed, out)
        if not (out / "summary.json").is_file():
            print(f"no finished demo in {out}; skipped", file=sys.stderr)
            continue
        runs[seed] = json.loads((out / "summary.json").read_text())
        if (out / "timing.json").is_file():
            runs[seed]["timing"] = json.loads((out / "timing.json").read_text())
    if not runs:
        print("no runs to tabulate", file=sys.stderr)
        return 1
    table = tabulate(runs) + "\n\n" + bar_verdict(runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.md").write_text(table + "\n")
    (args.out / "study.json").write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
