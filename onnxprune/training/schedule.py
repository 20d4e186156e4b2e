"""Learning-rate schedules: a linear warm-up over the first part of training, then cosine decay
to zero, step decay (x0.1 at half and at three quarters of the steps), or a constant rate."""
from __future__ import annotations

import math

LR_SCHEDULES = ("cosine", "step", "constant")


def learning_rate(step: int, total: int | None, base: float, schedule: str = "cosine", warmup: float = 0.0) -> float:
    """The rate for optimizer step `step` (0-based) of `total` (None: unknown, constant after warm-up)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"learning-rate schedule {schedule!r}: choose from {', '.join(LR_SCHEDULES)}")
    if not total:
        return base
    warm = round(warmup * total)
    if step < warm:
        return base * (step + 1) / warm
    if schedule == "constant":
        return base
    progress = (step - warm) / max(1, total - warm)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base * (0.1 ** sum(progress >= mark for mark in (0.5, 0.75)))
