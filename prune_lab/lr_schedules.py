"""Learning-rate schedules that torch does not ship as one object."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.0,
                  warmup_epochs: float | None = None, epochs: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0, per step.

    `warmup` is a fraction so that "one epoch of warm-up" is 1/epochs at any data size;
    `warmup_epochs` (if given) says it in epochs instead: warmup = warmup_epochs / epochs.
    `total_steps` and `epochs` are filled in by `prune_lab.module.make_scheduler`.
    """
    if warmup_epochs is not None:
        warmup = float(warmup_epochs) / max(int(epochs or 1), 1)
    warm = int(round(min(warmup, 1.0) * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(total_steps - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
