"""Batch-norm statistics: re-estimate them for a pruned or sub-network, or keep them frozen."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], max_images: int | None = None) -> int:
    """Reset BN running statistics and re-estimate them as exact averages over `batches` (images
    only) in train mode. Returns the number of images used. The model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    seen = 0
    try:
        for x in batches:
            if max_images is not None and seen >= max_images:
                break
            model(x)
            seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return seen


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Train-mode BN (batch statistics) whose running statistics do not move: extra forward passes
    of sub-networks or candidates must not pollute the full network's statistics."""
    bns = [(m, m.momentum) for m in model.modules() if isinstance(m, BN_TYPES)]
    for m, _ in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in bns:
            m.momentum = momentum
