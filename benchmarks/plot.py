"""Turns pytest-benchmark JSON from benchmarks/test_tokenizer.py into a PNG: median time against
mask ratio, one line per backend, one panel per (direction, batch, embed dim).

    python benchmarks/plot.py tokenizer.json tokenizer.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path: str) -> tuple[dict, dict]:
    """{(direction, batch, dim): {backend: [(mask ratio, median ms)]}} and the run's machine info."""
    with open(path) as f:
        data = json.load(f)
    panels: dict = defaultdict(lambda: defaultdict(list))
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if "backend" not in info or info.get("mask_ratio") is None:
            continue   # the dense keep=None path is a horizontal reference, drawn below
        key = (info["direction"], info["batch"], info["embed_dim"])
        panels[key][info["backend"]].append((info["mask_ratio"], bench["stats"]["median"] * 1e3))
    dense: dict = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("backend") == "reference" and "mask_ratio" in info and info["mask_ratio"] is None:
            dense[(info["direction"], info["batch"], info["embed_dim"])] = bench["stats"]["median"] * 1e3
    return panels, {"machine": data.get("machine_info", {}), "dense": dense}


def plot(panels: dict, meta: dict, out: str) -> None:
    keys = sorted(panels)
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for backend, points in sorted(panels[key].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
        if key in meta["dense"]:
            ax.axhline(meta["dense"][key], color="grey", linestyle=":", label="reference, keep=None")
        direction, batch, dim = key
        ax.set_title(f"{direction.replace('_', '+')}  B={batch} D={dim}")
        ax.set_xlabel("mask ratio")
        ax.set_ylabel("median ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    cpu = meta["machine"].get("cpu", {}).get("brand_raw", "")
    fig.suptitle(f"SCOTT tokenizer, 224x224 ({cpu})" if cpu else "SCOTT tokenizer, 224x224", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("png", help="output picture")
    args = parser.parse_args()
    panels, meta = load(args.json)
    if not panels:
        raise SystemExit(f"{args.json}: no tokenizer benchmarks with a mask ratio in it")
    plot(panels, meta, args.png)
    print(f"wrote {args.png} ({len(panels)} panels)")


if __name__ == "__main__":
    main()
