"""``mimjepa``: pretrain, probe, visualise, or all three on the embedded data (demo).

    mimjepa pretrain [--config FILE|NAME] [--resume] [key=value ...]
    mimjepa probe    [--config FILE|NAME] [key=value ...]
    mimjepa visualise [--config FILE|NAME] [key=value ...]
    mimjepa demo     [--out DIR] [--seed N]   # embedded data: pretrain -> probe -> PCA picture

A config NAME is one of the files shipped in mimjepa/configs (e.g. ``embedded``, ``scott_vits16``).
Multi-GPU / multi-process: ``torchrun --nproc_per_node=N -m mimjepa.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# What the `train` extra installs (module name -> distribution); `pip install scott-kernels`
# alone gives the command, so it must say which extra is missing rather than fail on import.
TRAIN_MODULES = {"yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "torchvision": "torchvision"}


def _config_path(value: str | None, kind: str) -> Path | None:
    from .config import ConfigError

    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{value}{'' if kind == 'pretrain' else '_' + kind}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config {value!r} is neither a file nor a shipped config ({', '.join(names)})")


def _print_probe(results: dict, title: str = "pretrained encoder") -> None:
    print(f"{title} (test split; chance top-1 {results['chance_top1']:.1f}%):")
    for name, r in results.items():
        if not isinstance(r, dict) or "test" not in r:
            continue
        t = r["test"]
        label = f"{name} ({r['probe']})" if name == "best_attentive" else name
        print(f"  {label:<30} top-1 {t['top1']:6.2f}%  top-5 {t['top5']:6.2f}%  mean/class {t['mean_per_class']:6.2f}%")
    if "random_init" in results:
        _print_probe(results["random_init"], "randomly initialised encoder, same probes (baseline)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mimjepa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pretrain", "probe", "visualise"):
        p = sub.add_parser(name)
        p.add_argument("--config", help="YAML file or shipped config name")
        p.add_argument("overrides", nargs="*", help="key=value, dotted for nested keys (optim.lr=1e-3)")
        if name == "pretrain":
            p.add_argument("--resume", action="store_true", help="continue from out_dir's checkpoint")
    demo = sub.add_parser("demo", help="embedded data: pretrain, probe and PCA picture in a few CPU minutes")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0, help="seeds the data, the weights, the masks and the probes")
    args = parser.parse_args(argv)
    try:
        # imported after parsing, so that --help works without the training dependencies
        from .checkpoint import CheckpointError
        from .config import ConfigError, PretrainConfig, ProbeConfig, VisualiseConfig, load_config
        from .data import DatasetError
        from .evaluate import run_probe
        from .train import Trainer
    except ModuleNotFoundError as exc:
        if exc.name not in TRAIN_MODULES:
            raise
        print(f"mimjepa: error: {TRAIN_MODULES[exc.name]} is not installed; the mimjepa command needs the "
              "training extra: pip install 'scott-kernels[train]'", file=sys.stderr)
        return 2

    try:
        if args.command == "demo":
            return _demo(Path(args.out), args.seed)
        if args.command == "pretrain":
            cfg = load_config(PretrainConfig, _config_path(args.config, "pretrain"), args.overrides)
            if args.resume and not (Path(cfg.out_dir) / "train_state.pt").is_file():
                raise CheckpointError(f"--resume: no checkpoint in {cfg.out_dir}")
            Trainer(cfg, resume=args.resume).fit()
            print(f"checkpoint: {Path(cfg.out_dir) / 'checkpoint.safetensors'}")
        elif args.command == "probe":
            cfg = load_config(ProbeConfig, _config_path(args.config, "probe"), args.overrides)
            _print_probe(run_probe(cfg))
            print(f"results: {Path(cfg.out_dir) / 'results.json'}")
        else:
            from .evaluate import run_visualise

            cfg = load_config(VisualiseConfig, _config_path(args.config, "visualise"), args.overrides)
            print(f"PCA picture: {run_visualise(cfg)}")
    except (ConfigError, DatasetError, CheckpointError, ValueError) as exc:
        print(f"mimjepa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimjepa: interrupted", file=sys.stderr)
        return 130
    return 0


SUMMARY_PROBES = (("knn", "k-NN (k=20)"), ("linear", "linear"), ("best_attentive", "best attentive"))


def summarise(results: dict) -> dict:
    """Top-1 test accuracy of the pretrained and the random-init encoder per probe, and the gap."""
    base = results["random_init"]
    return {name: {"pretrained": results[name]["test"]["top1"], "random_init": base[name]["test"]["top1"],
                   "gain": results[name]["test"]["top1"] - base[name]["test"]["top1"]}
            for name, _ in SUMMARY_PROBES if name in results and name in base}


def _print_summary(summary: dict, results: dict, test_size: int) -> None:
    print(f"\nfrozen-encoder probes, top-1 % on the test split ({test_size} images, chance "
          f"{results['chance_top1']:.1f}%):")
    print(f"  {'probe':<16} {'pretrained':>10} {'random init':>12} {'gain':>7}")
    for name, label in SUMMARY_PROBES:
        if name in summary:
            r = summary[name]
            print(f"  {label:<16} {r['pretrained']:>10.1f} {r['random_init']:>12.1f} {r['gain']:>+7.1f}")
    # A 2,000-image test split has a standard error of ~0.75 points near chance: gaps under 2
    # points are called noise.
    verdicts = {}
    for name, label in SUMMARY_PROBES:
        if name in summary:
            gain = summary[name]["gain"]
            verdicts[label] = "better" if gain >= 2 else "worse" if gain <= -2 else "same"
    near_chance = [label for name, label in SUMMARY_PROBES
                   if name in summary and summary[name]["pretrained"] < results["chance_top1"] + 2]
    if all(v == "better" for v in verdicts.values()):
        print("what this shows: pretraining beats the randomly initialised encoder on every probe; the "
              "features learned from unlabelled images separate the classes better than random features.")
    else:
        groups = {v: [label for label, w in verdicts.items() if w == v] for v in ("better", "same", "worse")}
        parts = [f"{'better than' if v == 'better' else 'no better than' if v == 'same' else 'worse than'} "
                 f"random init on {', '.join(labels)}" for v, labels in groups.items() if labels]
        print(f"what this shows: the pretrained encoder is {'; '.join(parts)} (gaps under 2 points are noise).")
    # The bar the main job is held to: k-NN and linear at least 5 points above random init, the
    # best attentive probe not below it (judged on the mean over seeds; one run is indicative).
    bar = {label: summary[name]["gain"] >= need for name, label, need in
           (("knn", "k-NN", 5.0), ("linear", "linear", 5.0), ("best_attentive", "best attentive", 0.0)) if name in summary}
    missed = [label for label, ok in bar.items() if not ok]
    print(f"bar (k-NN and linear >= +5 points, best attentive >= +0): "
          f"{'met in this run' if not missed else 'NOT met in this run (' + ', '.join(missed) + ')'}")
    if near_chance:
        print(f"the pretrained encoder's {', '.join(near_chance)} accuracy is within 2 points of chance: "
              "this run did not learn features that separate the classes.")


def _demo(out: Path, seed: int = 0) -> int:
    import time

    from .config import ProbeConfig, PretrainConfig, VisualiseConfig, load_config
    from .evaluate import run_probe, run_visualise
    from .train import Trainer

    start = time.perf_counter()
    pre = load_config(PretrainConfig, CONFIG_DIR / "embedded.yaml", [f"out_dir={out / 'pretrain'}", f"seed={seed}"])
    rows = Trainer(pre).fit()
    if rows:
        by_epoch: dict[int, list[float]] = {}
        for row in rows:
            by_epoch.setdefault(row["epoch"], []).append(row["loss"])
        first, last = min(by_epoch), max(by_epoch)
        mean = lambda xs: sum(xs) / len(xs)
        print(f"pretraining loss (mean of logged steps): epoch {first + 1} {mean(by_epoch[first]):.4f} -> "
              f"epoch {last + 1} {mean(by_epoch[last]):.4f}")
    ckpt = str(out / "pretrain" / "checkpoint.safetensors")
    probe = load_config(ProbeConfig, CONFIG_DIR / "embedded_probe.yaml",
                        [f"checkpoint={ckpt}", f"out_dir={out / 'probe'}", f"seed={seed}"])
    results = run_probe(probe)
    _print_probe(results)
    summary = summarise(results)
    _print_summary(summary, results, probe.data.embedded_test_size or probe.data.embedded_val_size)
    vis = load_config(VisualiseConfig, CONFIG_DIR / "embedded_visualise.yaml",
                      [f"checkpoint={ckpt}", f"out_file={out / 'pca.png'}", f"seed={seed}"])
    print(f"PCA picture (rows: images, pretrained encoder, random-init encoder): {run_visualise(vis)}")
    print(f"probe results: {out / 'probe' / 'results.json'}")
    seconds = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps({"seed": seed, "seconds": seconds, "top1": summary}, indent=2))
    print(f"demo took {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
