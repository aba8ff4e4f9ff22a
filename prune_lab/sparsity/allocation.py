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
    return masks_from_counts(scores, {n: round(per_layer[n] * s.numel()) for n, s in scores.items()})


def masks_from_counts(scores: dict[str, torch.Tensor], pruned: dict[str, int]) -> dict[str, torch.Tensor]:
    """Keep-masks that prune exactly `pruned[n]` lowest-scoring entries of each layer (stable sort)."""
    out = {}
    for n, s in scores.items():
        k = int(pruned[n])
        keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
        if k > 0:
            keep[torch.sort(s.flatten().float(), stable=True).indices[:k]] = False
        out[n] = keep.view_as(s)
    return out


def exact_counts(sparsity: dict[str, float], numel: dict[str, int], total_pruned: int) -> dict[str, int]:
    """Integer pruned counts per layer close to `sparsity[n] · numel[n]` that sum to `total_pruned`.

    Largest-remainder rounding: floors first, then the layers with the largest fractional parts
    (that still have room) get one more, or the smallest lose one, until the sum is exact.
    """
    if not 0 <= total_pruned <= sum(numel.values()):
        raise ValueError(f"cannot prune {total_pruned} of {sum(numel.values())} weights")
    want = {n: min(max(sparsity[n], 0.0), 1.0) * numel[n] for n in numel}
    counts = {n: int(math.floor(w)) for n, w in want.items()}
    by_remainder = sorted(numel, key=lambda n: (want[n] - counts[n], n), reverse=True)
    while sum(counts.values()) != total_pruned:
        short = total_pruned - sum(counts.values())
        order = by_remainder if short > 0 else by_remainder[::-1]
        changed = False
        for n in order:
            if short == 0:
                break
            step = 1 if short > 0 else -1
            if 0 <= counts[n] + step <= numel[n]:
                counts[n] += step
                short -= step
                changed = True
        if not changed:  # unreachable given the range check above
            raise RuntimeError("exact_counts did not converge")
    return counts
