"""Post-training helpers on a small calibration set: collect it once, re-estimate batch-norm
statistics of a pruned model, measure top-1. Pure torch, no autograd."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn


def calibration_batches(loader: Iterable, max_samples: int | None = None,
                        device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, held on `device`: a search scores hundreds of candidates on the same
    images, so augmentation is drawn once and data loading is paid once."""
    out, seen = [], 0
    for x, y in loader:
        if max_samples is not None and seen + len(x) > max_samples:
            x, y = x[:max_samples - seen], y[:max_samples - seen]
        if len(x):
            out.append((x.to(device), y.to(device)))
        seen += len(x)
        if max_samples is not None and seen >= max_samples:
            break
    return out


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, noise_std: float = 1e-6, momentum: float | None = None,
                   seed: int = 0) -> None:
    """Reset every BN layer's running statistics and re-estimate them by forwarding `batches` in
    train mode with Gaussian input noise of `noise_std` (UniPTS, METHODS.md §2).

    `momentum=None` makes the estimate the plain average over the batches (independent of their
    order); a float uses BN's exponential average instead. The noise comes from a generator seeded
    with `seed`, so the same model and batches give the same statistics every time.
    """
    bns = _batch_norms(model)
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    generator = None
    for m in bns:
        m.reset_running_stats()
        m.momentum = momentum
    model.train()
    try:
        for x, _ in batches:
            if noise_std:
                if generator is None:
                    generator = torch.Generator(device=x.device).manual_seed(seed)
                x = x + noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            model(x)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)


@torch.no_grad()
def top1_accuracy(model: nn.Module, batches) -> float:
    """Fraction of `batches` classified correctly, in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Train-mode BN (batch statistics) whose running statistics do not move: extra forward passes
    of sub-networks or candidates must not pollute the full network's statistics."""
    bns = [(m, m.momentum) for m in _batch_norms(model)]
    for m, _ in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in bns:
            m.momentum = momentum
