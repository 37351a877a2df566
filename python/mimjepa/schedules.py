"""Per-step schedules: learning rate (warm-up -> flat -> cosine), weight decay, EMA momentum."""

from __future__ import annotations

import math

__all__ = ["lr_at", "weight_decay_at", "ema_momentum_at"]


def lr_at(step: int, total: int, warmup: int, start: float, peak: float, final: float, flat_fraction: float) -> float:
    """Linear warm-up start -> peak over ``warmup`` steps, then ``flat_fraction`` of the remaining
    steps at the peak, then a cosine down to ``final``."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    rest = max(total - warmup, 1)
    s = step - warmup
    flat = int(rest * flat_fraction)
    if s < flat:
        return peak
    span = max(rest - flat, 1)
    return max(final, final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(s - flat, span) / span)))


def weight_decay_at(step: int, total: int, start: float, final: float, kind: str = "cosine") -> float:
    t = min(step / max(total, 1), 1.0)
    if kind == "linear":
        return start + (final - start) * t
    return final + (start - final) * 0.5 * (1 + math.cos(math.pi * t))


def ema_momentum_at(step: int, total: int, start: float, end: float) -> float:
    """Momentum used for the EMA update after optimiser step ``step`` (0-based): linear, reaching
    ``end`` at the last step."""
    return start + (end - start) * min((step + 1) / max(total, 1), 1.0)
