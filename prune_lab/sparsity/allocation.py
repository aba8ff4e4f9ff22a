"""Layer-wise allocation: how a global budget is spread over layers, and masks from scores.

Unstructured: `uniform` (same sparsity everywhere), `erk` (Erdős–Rényi-Kernel, Evci et al. 2020:
density ∝ (Σ dims)/(Π dims), dense-capped layers redistribute), `global` (one threshold over all
scores). Structured allocation under a FLOPs target lives in `structure.solve_flops_target`.
"""
from __future__ import annotations

import math

import torch

from prune_lab.errors import PruneLabError

DISTRIBUTIONS = ("uniform", "erk", "global")


def uniform_allocation(shapes: dict[str, tuple], sparsity: float) -> dict[str, float]:
    return {n: sparsity for n in shapes}


def erk_allocation(shapes: dict[str, tuple], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """Per-layer sparsity with ERK densities whose weighted mean density is exactly 1 - sparsity."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    budget = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        # eps such that Σ_{sparse} eps·raw·numel + Σ_{dense} numel = budget
        rest = budget - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if denom == 0:
            break
        eps = rest / denom
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 0.0 if n in dense else 1.0 - eps * raw[n] for n in shapes}


def layer_sparsities(distribution: str, shapes: dict[str, tuple], sparsity: float) -> dict[str, float]:
    if distribution == "uniform":
        return uniform_allocation(shapes, sparsity)
    if distribution == "erk":
        return erk_allocation(shapes, sparsity)
    raise PruneLabError(f"unknown distribution '{distribution}'; choose one of: {', '.join(DISTRIBUTIONS)}")


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, distribution: str) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) that prune the lowest-scoring weights to the given sparsity.

    Counts are exact: each layer prunes round(s_l · n_l) weights (`global`: round(s · N) over all),
    chosen by a stable sort so ties break the same way on every run.
    """
    if distribution == "global":
        flat = torch.cat([s.flatten().float() for s in scores.values()])
        k = round(sparsity * flat.numel())
        keep = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            keep[torch.sort(flat, stable=True).indices[:k]] = False
        out, i = {}, 0
        for n, s in scores.items():
            out[n] = keep[i:i + s.numel()].view_as(s)
            i += s.numel()
        return out
    per_layer = layer_sparsities(distribution, {n: tuple(s.shape) for n, s in scores.items()}, sparsity)
    out = {}
    for n, s in scores.items():
        k = round(per_layer[n] * s.numel())
        keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        if k > 0:
            keep[torch.sort(s.flatten().float(), stable=True).indices[:k]] = False
        out[n] = keep.view_as(s)
    return out
