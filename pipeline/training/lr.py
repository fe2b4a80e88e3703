"""Learning-rate schedule: linear warmup, then cosine decay to zero."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(total: int, warmup_fraction: float) -> int:
    """Number of warmup optimizer steps: round(warmup_fraction * total), within [0, total]."""
    return max(0, min(total, round(warmup_fraction * total)))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier for the update with 0-based index `step` out of `total` updates.

    Warmup: (step + 1) / warmup for step < warmup (the first update is not at lr 0).
    Then 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))): 1 right after warmup, reaching
    0 at step == total (one past the last update). Steps past `total` stay at 0.
    """
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return 0.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosine:
    """Picklable-free callable for LambdaLR (a plain object keeps scheduler state JSON-friendly)."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total = total
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.warmup)


def build_scheduler(optimizer: Optimizer, total: int, warmup: int) -> LambdaLR:
    """LambdaLR applying `warmup_cosine`; call `.step()` once after every optimizer step."""
    return LambdaLR(optimizer, _WarmupCosine(total, warmup))
