"""MIM-JEPA pretraining: context encoder + predictor trained to predict the layer-normed latents
of an EMA target encoder at the masked patches (Smooth-L1, per image over its masked patches).

Runs on one CPU, one GPU or many (``torchrun``: NCCL on GPUs, gloo on CPUs). Resuming continues
exactly: data order, augmentations and masks are functions of (seed, epoch, step, index), and the
generator states, optimiser and scaler are saved with the weights.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .checkpoint import load_state, load_strict, load_weights, save_state, save_weights
from .config import PretrainConfig, save_config, to_dict
from .data import build_dataset
from .masks import make_keep, num_visible
from .models import Encoder, Predictor
from .schedules import ema_momentum_at, lr_at, weight_decay_at

__all__ = ["mimjepa_loss", "Student", "ema_update", "Trainer", "resolve_device", "resolve_precision"]

WEIGHTS_FILE = "checkpoint.safetensors"
STATE_FILE = "train_state.pt"


def mimjepa_loss(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Smooth-L1 between predictions and targets at masked patches: mean over D, then mean over
    each image's masked patches, then mean over images. pred/target (B, N, D), keep (B, N)."""
    per_patch = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).mean(-1)
    masked = (~keep).to(per_patch.dtype)
    per_image = (per_patch * masked).sum(1) / masked.sum(1).clamp_min(1.0)
    return per_image.mean()


class Student(nn.Module):
    """The trained part: context encoder + predictor (one module so DDP can wrap it)."""

    def __init__(self, cfg):
        super().__init__()
        self.context_encoder = Encoder(cfg)
        self.predictor = Predictor(cfg)
        self.visible_only = cfg.context_mode == "visible_only"
        # The predictor's mask token fills masked positions in visible_only mode only; frozen
        # otherwise so that every trained parameter gets a gradient (DDP requires it).
        self.predictor.transformer.msk_embed.requires_grad_(self.visible_only)

    def forward(self, images: torch.Tensor, keep: torch.Tensor, num_visible: int | None = None) -> torch.Tensor:
        if self.visible_only:
            context = self.context_encoder(images, keep, visible_only=True, num_visible=num_visible)
            return self.predictor(context, keep)
        return self.predictor(self.context_encoder(images, keep, num_visible=num_visible))


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, over every parameter."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p_o.detach(), 1.0 - momentum)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """bf16 autocast on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on the CPU."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class EpochSampler(Sampler):
    """Shuffled indices for one epoch and one rank, as keys ``epoch * n + index`` so the dataset
    can seed each sample's augmentation; ``start_batch`` skips what a resumed run already did."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = (n // world) // batch_size * batch_size  # drop_last, equal on every rank
        if self.per_rank == 0:
            raise ValueError(f"dataset of {n} images is smaller than one batch of {batch_size} per rank ({world} ranks)")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank::self.world][: self.per_rank]
        for i in order[self.start_batch * self.batch_size:].tolist():
            yield self.epoch * self.n + i

    def __len__(self) -> int:
        return self.per_rank - self.start_batch * self.batch_size


class SeededViews(Dataset):
    """Gives each (epoch, index) its own augmentation seed, independent of the global RNG."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.base))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.base[index]


class Trainer:
    def __init__(self, cfg: PretrainConfig, resume: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = resolve_device(cfg.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.precision = resolve_precision(cfg.precision, self.device)
        self.out_dir = Path(cfg.out_dir)
        self.show_progress = show_progress and self.rank == 0

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.student = Student(cfg.model).to(self.device)
        self.target = copy.deepcopy(self.student.context_encoder).eval().requires_grad_(False)
        self.model = self.student
        if self.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)

        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim == 1 or name.endswith("bias") else decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.optim.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        dataset, _ = build_dataset(cfg.data, "train", cfg.model.img_size, seed=cfg.seed, two_views=True)
        self.dataset = SeededViews(dataset, cfg.seed)
        self.sampler = EpochSampler(len(dataset), cfg.optim.batch_size, cfg.seed, self.rank, self.world)
        self.steps_per_epoch = self.sampler.per_rank // cfg.optim.batch_size
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
        self.num_visible = num_visible(self.grid[0] * self.grid[1], cfg.mask.ratio)
        self.step = 0
        if resume:
            self.load(self.out_dir)

    # --- state -----------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"context_encoder.{k}": v for k, v in self.student.context_encoder.state_dict().items()}
        out.update({f"target_encoder.{k}": v for k, v in self.target.state_dict().items()})
        out.update({f"predictor.{k}": v for k, v in self.student.predictor.state_dict().items()})
        return out

    def save(self) -> None:
        if self.rank != 0:
            return
        save_config(self.cfg, self.out_dir / "config.yaml")
        import yaml

        save_weights(self.weights(), self.out_dir / WEIGHTS_FILE,
                     metadata={"config": yaml.safe_dump(to_dict(self.cfg)), "step": str(self.step)})
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "cpu_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        save_state(state, self.out_dir / STATE_FILE)

    def load(self, out_dir: Path) -> None:
        weights = load_weights(out_dir / WEIGHTS_FILE)
        for prefix, module in (("context_encoder.", self.student.context_encoder), ("target_encoder.", self.target),
                               ("predictor.", self.student.predictor)):
            load_strict(module, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                        f"{out_dir / WEIGHTS_FILE} [{prefix.rstrip('.')}]")
        state = load_state(out_dir / STATE_FILE)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # --- one step ----------------------------------------------------------------------------------
    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def keep_for(self, step: int, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.cfg.seed * 7_919 + step) * 1_009 + self.rank)
        return make_keep(self.cfg.mask.kind, batch, self.grid, self.cfg.mask.ratio, g, self.device)

    def train_step(self, view_context: torch.Tensor, view_target: torch.Tensor) -> dict:
        o, step = self.cfg.optim, self.step
        lr = lr_at(step, self.total_steps, int(o.warmup_epochs * self.steps_per_epoch), o.lr_start, o.lr,
                   o.lr_final, o.flat_fraction)
        wd = weight_decay_at(step, self.total_steps, o.weight_decay, o.final_weight_decay, o.wd_schedule)
        self.optimizer.param_groups[0].update(lr=lr, weight_decay=wd)
        self.optimizer.param_groups[1].update(lr=lr)
        keep = self.keep_for(step, view_context.shape[0])
        self.student.train()
        with torch.no_grad(), self.autocast():
            target = self.target(view_target)
            target = F.layer_norm(target.float(), (target.shape[-1],))
        with self.autocast():
            pred = self.model(view_context, keep, self.num_visible)
        loss = mimjepa_loss(pred, target, keep, o.smooth_l1_beta)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if o.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), o.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        momentum = ema_momentum_at(step, self.total_steps, o.ema_start, o.ema_end)
        ema_update(self.target, self.student.context_encoder, momentum)
        self.step += 1
        return {"loss": loss.detach(), "lr": lr, "wd": wd, "ema": momentum, "grad_norm": grad_norm}

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        last_step = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        log_rows: list[dict] = []
        csv_path = self.out_dir / "log.csv"
        writer = _TensorBoard(self.out_dir) if self.rank == 0 else None
        bar = tqdm(total=last_step, initial=self.step, disable=not self.show_progress, desc="pretrain",
                   unit="step", dynamic_ncols=True)
        t_last, n_last = time.perf_counter(), 0
        while self.step < last_step:
            epoch, start_batch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start_batch)
            loader = DataLoader(self.dataset, batch_size=cfg.optim.batch_size, sampler=self.sampler,
                                num_workers=cfg.data.num_workers, drop_last=True,
                                pin_memory=self.device.type == "cuda", persistent_workers=False,
                                # its own generator: creating an iterator must not draw from the
                                # global RNG, or a resumed run's dropout draws would shift
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for view_context, view_target, _ in loader:
                stats = self.train_step(view_context.to(self.device, non_blocking=True),
                                        view_target.to(self.device, non_blocking=True))
                n_last += view_context.shape[0] * self.world
                if self.step % cfg.log_every == 0 or self.step == last_step:
                    loss = stats["loss"]
                    if self.distributed:
                        dist.all_reduce(loss)
                        loss = loss / self.world
                    now = time.perf_counter()
                    row = {"step": self.step, "epoch": epoch, "loss": float(loss), "lr": stats["lr"],
                           "wd": stats["wd"], "ema": stats["ema"], "img_per_s": n_last / max(now - t_last, 1e-9)}
                    t_last, n_last = now, 0
                    log_rows.append(row)
                    if self.rank == 0:
                        _append_csv(csv_path, row)
                        writer.add(row)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                bar.update(1)
                if self.step >= last_step:
                    break
            if self.step % self.steps_per_epoch == 0 and (self.step // self.steps_per_epoch) % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        self.save()
        if writer:
            writer.close()
        return log_rows


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


class _TensorBoard:
    """TensorBoard scalars when the package is installed; nothing otherwise."""

    def __init__(self, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard not installed
            self.writer = None

    def add(self, row: dict) -> None:
        if self.writer:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"pretrain/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()
