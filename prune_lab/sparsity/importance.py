"""Importance criteria: which weights or channels matter least.

Each criterion scores single weights (unstructured methods) and channel groups (structured
methods). Channel scores come from torch-pruning's importance classes, so a channel's score
covers every layer coupled to it (DepGraph-style); element scores are one line each.
"""
from __future__ import annotations

import zlib
from functools import partial

import torch
import torch_pruning as tp
from torch import nn

from prune_lab.errors import PruneLabError


class Importance:
    """Base criterion. `needs_grad`: the caller must fill `.grad` (one loss backward) first."""

    needs_grad = False
    name = "base"

    def weight_scores(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        return {n: self.score(p) for n, p in params.items()}

    def score(self, p: nn.Parameter) -> torch.Tensor:
        raise PruneLabError(f"importance '{self.name}' scores channels only; use it with a structured method")

    def channel_scorer(self) -> tp.importance.Importance:
        raise PruneLabError(f"importance '{self.name}' scores weights only; use it with an unstructured method")

    def grad_of(self, p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            raise RuntimeError(f"{self.name} importance needs gradients; run a backward pass first")
        return p.grad


class Magnitude(Importance):
    """|w| for weights; the Lp norm of each channel's filter for channels.

    `group_reduction="first"` scores a channel by its root filter alone (Li et al.'s L1-filter);
    "mean" averages over every coupled layer (DepGraph's group norm).
    """

    name = "magnitude"

    def __init__(self, p: int = 1, group_reduction: str = "first"):
        self.p, self.group_reduction = p, group_reduction

    def score(self, p):
        return p.detach().abs()

    def channel_scorer(self):
        return tp.importance.GroupMagnitudeImportance(p=self.p, group_reduction=self.group_reduction, normalizer=None)


class Taylor(Importance):
    """First-order Taylor: |w·∂L/∂w| per weight; (Σ w·g)² per channel group (Molchanov et al.)."""

    name = "taylor"
    needs_grad = True

    def score(self, p):
        return (p.detach() * self.grad_of(p)).abs()

    def channel_scorer(self):
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)


class Gradient(Importance):
    """|∂L/∂w|: a weight the loss is sensitive to is kept (the grow criterion of RigL)."""

    name = "gradient"
    needs_grad = True

    def score(self, p):
        return self.grad_of(p).detach().abs()


class TaylorBN(Importance):
    """Channel saliency from the batch-norm gates (Molchanov et al. 2019; HALP; IEE):
    (γ·∂L/∂γ + β·∂L/∂β)² per channel, summed over every batch norm coupled to the channel.
    Accumulate it over several batches for a stable estimate (callers add the per-batch scores)."""

    name = "taylor_bn"
    needs_grad = True

    def channel_scorer(self):
        return partial(bn_channel_scores, gate=lambda bn, idx: (bn.weight[idx] * bn.weight.grad[idx]
                                                                + bn.bias[idx] * bn.bias.grad[idx]) ** 2)


@torch.no_grad()
def bn_channel_scores(group, gate, needs_grad: bool = True) -> torch.Tensor:
    """Σ over the group's affine batch norms of `gate(bn, local_indices)`, per root channel
    (with `needs_grad`, batch norms without gradients are skipped)."""
    score = torch.zeros(len(group[0].idxs))
    seen = set()
    for item in group:
        bn = item.dep.target.module
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine or bn in seen:
            continue
        if needs_grad and (bn.weight.grad is None or bn.bias.grad is None):
            continue
        seen.add(bn)  # a batch norm appears once per direction; count it once
        idx = torch.tensor(item.idxs, dtype=torch.long, device=bn.weight.device)
        score.index_add_(0, torch.tensor(item.root_idxs, dtype=torch.long), gate(bn, idx).float().cpu())
    return score


class BNScale(Importance):
    """|γ| of the batch-norm layers coupled to a channel (network slimming)."""

    name = "bn_scale"

    def channel_scorer(self):
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)


class Random(Importance):
    """Uniform random scores: the sanity-check baseline. Draws from torch's global RNG, which the
    run seeds, so the same seed prunes the same weights. With `seed`, each weight's scores come
    from a generator seeded by (seed, weight name) instead: identical on every DDP rank whatever
    else drew from the global RNG (the random initial masks of dynamic sparse training)."""

    name = "random"

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def weight_scores(self, params):
        if self.seed is None:
            return super().weight_scores(params)
        out = {}
        for n, p in params.items():
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + zlib.crc32(n.encode()))
            out[n] = torch.rand(p.shape, generator=g).to(p.device)
        return out

    def score(self, p):
        return torch.rand(p.shape, device=p.device)

    def channel_scorer(self):
        return tp.importance.RandomImportance()


IMPORTANCES = {"magnitude": Magnitude, "taylor": Taylor, "taylor_bn": TaylorBN, "gradient": Gradient, "bn_scale": BNScale,
               "random": Random}


def build_importance(spec) -> Importance:
    """An `Importance` from a name ("magnitude") or an already built object (Hydra `_target_`)."""
    if isinstance(spec, Importance):
        return spec
    if spec not in IMPORTANCES:
        raise PruneLabError(f"unknown importance '{spec}'; choose one of: {', '.join(IMPORTANCES)}")
    return IMPORTANCES[spec]()
