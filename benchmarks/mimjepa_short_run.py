"""Short pretraining runs for choosing the main job's settings: pretrain with ``embedded.yaml`` plus
overrides and, every ``--every`` steps, read out the context encoder (mean of its layer-normed
tokens) against a randomly initialised encoder of the same architecture: k-NN (k=20, cosine) on
raw and on standardised features, and a closed-form ridge read-out (lambda=10) on standardised
features, on a 1,000-image test split. Cheaper than the demo's trained probes.

    OMP_NUM_THREADS=1 python benchmarks/mimjepa_short_run.py [--every N] [key=value ...]
    # e.g. data.embedded_kind=outlines model.context_mode=visible_only "data.colour_jitter=[0.4,0.4,0.4,0.5]"
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mimjepa.cli import CONFIG_DIR
from mimjepa.config import PretrainConfig, load_config
from mimjepa.data import build_dataset
from mimjepa.models import Encoder
from mimjepa.probe import extract_features
from mimjepa.train import Trainer


def read_outs(encoder, data_cfg, img_size: int, seed: int, cache: dict) -> str:
    encoder.eval()
    pooled = {}
    for split in ("train", "test"):
        if split not in cache:
            cache[split] = build_dataset(data_cfg, split, img_size, seed=seed)
        ds, num_classes = cache[split]
        feats, labels = extract_features(encoder, DataLoader(ds, batch_size=256), "cpu")
        pooled[split] = (feats.mean(1), labels)
    (a, y_train), (b, y_test) = pooled["train"], pooled["test"]
    scores = []
    for standardise in (False, True):
        if standardise:
            mean, std = a.mean(0), a.std(0) + 1e-6
            a, b = (a - mean) / std, (b - mean) / std
        sim, idx = (F.normalize(b, dim=1) @ F.normalize(a, dim=1).T).topk(20, dim=1)
        votes = torch.zeros(len(b), num_classes).scatter_add_(1, y_train[idx], (sim / 0.07).exp())
        scores.append((votes.argmax(1) == y_test).float().mean().item() * 100)
    A, B = (torch.cat([x, torch.ones(len(x), 1)], 1) for x in (a, b))
    W = torch.linalg.solve(A.T @ A + 10 * torch.eye(A.shape[1]), A.T @ F.one_hot(y_train, num_classes).float())
    scores.append(((B @ W).argmax(1) == y_test).float().mean().item() * 100)
    return "k-NN {:.1f}  k-NN standardised {:.1f}  ridge {:.1f}".format(*scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=192, help="read out every N steps")
    parser.add_argument("--out", default="runs/short_run")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(PretrainConfig, CONFIG_DIR / "embedded.yaml", [f"out_dir={args.out}", "log_every=64"] + args.overrides)
    data_cfg = copy.deepcopy(cfg.data)
    data_cfg.embedded_test_size = 1000
    cache: dict = {}
    start_cpu, start = time.process_time(), time.perf_counter()
    torch.manual_seed(cfg.seed)
    print("random init:", read_outs(Encoder(cfg.model), data_cfg, cfg.model.img_size, cfg.seed, cache), flush=True)
    trainer = Trainer(cfg, show_progress=False)
    for stop in range(args.every, trainer.total_steps + 1, args.every):
        trainer.cfg.max_steps = stop
        rows = trainer.fit()
        print(f"step {stop}: loss {rows[-1]['loss']:.4f}, CPU {(time.process_time() - start_cpu) / 60:.1f} min, "
              f"wall {(time.perf_counter() - start) / 60:.1f} min:",
              read_outs(copy.deepcopy(trainer.student.context_encoder), data_cfg, cfg.model.img_size, cfg.seed, cache),
              flush=True)


if __name__ == "__main__":
    main()
