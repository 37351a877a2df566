"""Learnability check for the main job's data: the demo's encoder (embedded.yaml) plus an
attentive-pool head trained WITH labels (cross-entropy, AdamW 5e-4, batches of 32 drawn from the
same 2,048 training images, flipped every other step); top-1 on the 2,000-image test split every
256 steps. Tells whether the encoder can learn the arrangements at all in a given number of steps.

    OMP_NUM_THREADS=1 python benchmarks/mimjepa_supervised_check.py [STEPS [key=value ...]]
    # STEPS default 384; overrides of embedded.yaml, e.g. data.embedded_kind=outlines
"""

import sys
import time

import torch
import torch.nn.functional as F

from mimjepa.cli import CONFIG_DIR
from mimjepa.config import PretrainConfig, load_config
from mimjepa.data import build_dataset
from mimjepa.models import Encoder
from mimjepa.probe import AttentivePoolProbe


def main(steps: int = 384, overrides=()) -> None:
    cfg = load_config(PretrainConfig, CONFIG_DIR / "embedded.yaml", ["data.embedded_test_size=2000", *overrides])
    size, dim = cfg.model.img_size, cfg.model.embed_dim
    torch.manual_seed(0)
    train, num_classes = build_dataset(cfg.data, "train", size, seed=0)
    test, _ = build_dataset(cfg.data, "test", size, seed=0)
    x, y = (torch.stack([torch.as_tensor(train[i][j]) for i in range(len(train))]) for j in (0, 1))
    xt, yt = (torch.stack([torch.as_tensor(test[i][j]) for i in range(len(test))]) for j in (0, 1))
    encoder, head = Encoder(cfg.model), AttentivePoolProbe(dim, num_classes)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=5e-4, weight_decay=0.05)
    g, start = torch.Generator().manual_seed(0), time.process_time()
    for step in range(steps):
        idx = torch.randint(len(x), (32,), generator=g)
        batch = x[idx].flip(-1) if step % 2 else x[idx]
        loss = F.cross_entropy(head(F.layer_norm(encoder(batch), (dim,))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 256 == 0 or step + 1 == steps:
            encoder.eval(), head.eval()
            with torch.no_grad():
                pred = torch.cat([head(F.layer_norm(encoder(xt[i:i + 500]), (dim,))).argmax(1)
                                  for i in range(0, len(xt), 500)])
            encoder.train(), head.train()
            print(f"step {step + 1}: loss {loss.item():.3f}, test top-1 {100 * (pred == yt).float().mean():.1f}% "
                  f"(chance {100 / num_classes:.1f}%), CPU {time.process_time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 384, sys.argv[2:])
