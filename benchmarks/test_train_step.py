"""One whole MIM-JEPA training step (forward, backward, AdamW, EMA) per tokenizer backend and
context mode. On a GPU: ViT-S/16-sized SCOTT (D=384, depth 12, predictor depth 3), B=64, 224²,
bf16 autocast. On a CPU: a small model (64², D=96, depth 4), B=16 (tiny under SCOTT_BENCH_CHECK=1,
the device check's CPU walk). Data loading is excluded: the views are fixed tensors on the device.

    pytest benchmarks/test_train_step.py --benchmark-only
"""

import pytest
import torch

mimjepa = pytest.importorskip("mimjepa", reason="the training loop is installed with the package")

from mimjepa.config import PretrainConfig, load_config  # noqa: E402
from mimjepa.train import Trainer  # noqa: E402

from scott_kernels import available_backends  # noqa: E402
from scott_kernels.functional import BACKENDS  # noqa: E402

from conftest import CHECK, timed  # noqa: E402


def _overrides(cuda: bool, backend: str, mode: str, out_dir) -> list[str]:
    common = [f"model.tokenizer_backend={backend}", f"model.context_mode={mode}", f"out_dir={out_dir}",
              "data.embedded_val_size=16"]
    if cuda:
        return common + ["optim.batch_size=64", "data.embedded_train_size=64", "precision=bf16"]
    if CHECK:   # the device check's CPU walk: the smallest model that exercises every part
        return common + ["model.img_size=64", "model.embed_dim=32", "model.depth=2", "model.tokenizer_hidden=8",
                         "model.predictor_depth=1", "optim.batch_size=4", "data.embedded_train_size=4"]
    return common + ["model.img_size=64", "model.embed_dim=96", "model.depth=4", "model.tokenizer_hidden=32",
                     "model.predictor_depth=2", "optim.batch_size=16", "data.embedded_train_size=16"]


@pytest.mark.parametrize("mode", ["mask_tokens", "visible_only"])
@pytest.mark.parametrize("backend", list(BACKENDS))   # every registered one: reference first
def test_train_step(benchmark, setting, backend, mode, tmp_path):
    cuda = setting.device.type == "cuda"
    if backend not in available_backends(setting.device):
        pytest.skip(f"backend {backend!r} does not run on {setting.device} in this build")
    cfg = load_config(PretrainConfig, None, _overrides(cuda, backend, mode, tmp_path))
    trainer = Trainer(cfg, show_progress=False)
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.optim.batch_size, 3, cfg.model.img_size, cfg.model.img_size)
    v1 = torch.randn(shape, generator=gen).to(setting.device)
    v2 = torch.randn(shape, generator=gen).to(setting.device)
    benchmark.group = f"train step {mode}"
    benchmark.extra_info.update(batch=cfg.optim.batch_size, img_size=cfg.model.img_size,
                                embed_dim=cfg.model.embed_dim, precision=trainer.precision)
    runner = timed(setting, lambda: trainer.train_step(v1, v2))
    benchmark.pedantic(runner, rounds=setting.rounds, warmup_rounds=setting.warmup, iterations=1)
    if cuda:
        benchmark.extra_info["event_median_ms"] = runner.event_median_ms(skip=setting.warmup)
