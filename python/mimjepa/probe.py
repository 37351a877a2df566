"""Frozen-encoder evaluation: attentive probes (the SCOTT protocol), a linear probe on
average-pooled tokens and k-NN; top-1, top-5 and mean-per-class accuracy.

Features are the encoder's patch tokens, layer-normed without affine parameters, computed once
from the frozen encoder with the evaluation transform. The trained probes see the tokens
standardised with training-split statistics: each position's mean token is subtracted (the part
of a token that is the same in every image carries nothing about the image; the fixed position
embedding leaves a large one) and each feature is scaled to unit variance. The linear probe and
k-NN see the average of the tokens, standardised per feature. Each probe trains with its own
AdamW and warm-up + cosine schedule; after every epoch it is scored on the validation split and
its best state is kept, then evaluated on the test split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

__all__ = ["extract_features", "standardise_tokens", "AttentivePoolProbe", "CrossAttentionProbe", "LinearProbe", "train_probe",
           "knn_classify", "accuracy_metrics"]


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device, show_progress: bool = False):
    """(features (M, N, D) float32 on CPU, labels (M,))."""
    encoder.eval()
    feats, labels = [], []
    for images, y in tqdm(loader, disable=not show_progress, desc="features", leave=False):
        tokens = encoder(images.to(device))
        feats.append(F.layer_norm(tokens.float(), (tokens.shape[-1],)).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def standardise_tokens(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(M, N, D) tokens of the training split and of other splits -> the same, each position's
    training-split mean subtracted and each feature divided by its training-split standard
    deviation (over all images and positions). Whatever every image shares at a position (the
    position embedding's trace, a constant offset) is gone, so attention and the classifier
    work on what differs between images, at every scale a probe's layer norms would otherwise
    let the shared part set."""
    mean = train.mean(0, keepdim=True)
    std = (train - mean).flatten(0, 1).std(0).clamp_min(1e-6)
    return tuple((x - mean) / std for x in (train, *others))


class AttentivePoolProbe(nn.Module):
    """Attention pooling over patches with a learned score per head, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        self.heads = heads
        self.scores = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, heads))
        self.values = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.classifier = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), nn.LayerNorm(dim), nn.SiLU(),
                                        nn.Linear(dim, num_classes))

    def forward(self, x):
        B, N, D = x.shape
        weights = self.scores(x).softmax(dim=1)                                 # (B, N, H)
        values = self.values(x).view(B, N, self.heads, D // self.heads)
        pooled = torch.einsum("bnh,bnhd->bhd", weights, values).reshape(B, D)
        return self.classifier(pooled)


class CrossAttentionProbe(nn.Module):
    """One learned query cross-attending to the patch tokens, a feed-forward, a linear head."""

    def __init__(self, dim: int, num_classes: int, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, bias=False, batch_first=True)
        self.norm_mid = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        kv = self.norm_in(x)
        q = self.query.expand(x.shape[0], -1, -1)
        q = q + self.attn(q, kv, kv, need_weights=False)[0]
        q = self.norm_mid(q)
        q = q + self.ffn(q)
        return self.linear(self.norm_out(q.squeeze(1)))


class LinearProbe(nn.Module):
    """Linear classifier on the average of the patch tokens, standardised per feature by a batch
    norm without affine parameters (as in MAE's linear probing): a few high-variance features
    would otherwise set the pace of a short AdamW run."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(self.norm(x.mean(dim=1)))


@dataclass
class ProbeResult:
    name: str
    best_epoch: int
    val: dict
    test: dict


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (top[:, 0] == labels).float()
    top5 = (top == labels[:, None]).any(dim=1).float()
    per_class = torch.zeros(num_classes).index_add_(0, labels, top1)
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    return {"top1": top1.mean().item() * 100, "top5": top5.mean().item() * 100,
            "mean_per_class": (per_class[present] / counts[present]).mean().item() * 100}


@torch.no_grad()
def _predict(model: nn.Module, feats: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(feats[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(feats), batch_size)])


def train_probe(name: str, model: nn.Module, train: tuple, val: tuple, test: tuple, num_classes: int, *,
                epochs: int, lr: float, weight_decay: float, batch_size: int, device, seed: int = 0,
                show_progress: bool = False) -> ProbeResult:
    g = torch.Generator().manual_seed(seed)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    x_train, y_train = train
    steps_per_epoch = max(1, math.ceil(len(x_train) / batch_size))
    total, warmup = epochs * steps_per_epoch, max(1, epochs * steps_per_epoch // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    best, best_state, best_epoch = -1.0, None, -1
    for epoch in tqdm(range(epochs), disable=not show_progress, desc=f"probe {name}", leave=False):
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # a batch norm cannot train on one sample
                continue
            loss = F.cross_entropy(model(x_train[idx].to(device)), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        score = accuracy_metrics(_predict(model, val[0], device), val[1], num_classes)["top1"]
        if score >= best:
            best, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    return ProbeResult(name, best_epoch,
                       accuracy_metrics(_predict(model, val[0], device), val[1], num_classes),
                       accuracy_metrics(_predict(model, test[0], device), test[1], num_classes))


@torch.no_grad()
def knn_classify(train: tuple, query: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 1024, standardise: bool = True) -> torch.Tensor:
    """Weighted k-NN on cosine similarity of average-pooled features; returns class scores.
    ``standardise``: each pooled feature is first shifted and scaled to zero mean and unit
    variance over the training bank, so that the offset every image shares and a few
    high-variance features do not decide the neighbours."""
    pooled = train[0].mean(dim=1)
    mean, std = (pooled.mean(0), pooled.std(0).clamp_min(1e-6)) if standardise else (0.0, 1.0)
    bank = F.normalize((pooled - mean) / std, dim=1)
    labels = train[1]
    k = min(k, len(bank))
    out = []
    for i in range(0, len(query), batch_size):
        q = F.normalize((query[i:i + batch_size].mean(dim=1) - mean) / std, dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(len(q), num_classes).scatter_add_(1, labels[idx], weights)
        out.append(scores)
    return torch.cat(out)
