"""IEE's units: what the phase machine (`prune_lab.methods.iee`) prunes, explores and grows.

`WeightUnits`: single weights of the sparse conv/linear layers, a layer is its weight's name;
with an N:M pattern, also the groups of M a unit belongs to. `ChannelUnits`: output channels of
dependency groups, a layer is the group's root module.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import ChannelGroups, MaskSet
from prune_lab.sparsity.importance import Magnitude, TaylorBN, bn_channel_scores


class WeightUnits:
    """Units are single weights of the sparse conv/linear layers; a layer is its weight's name."""

    CRITERIA = ("magnitude", "taylor")

    def __init__(self, model: nn.Module, masks: MaskSet):
        self.params, self.masks = dict(model.named_parameters()), masks

    def maskable(self) -> list[str]:
        return list(self.masks.prunable)

    def keep_from_masks(self) -> dict[str, torch.Tensor]:
        return {n: self.masks[n].clone() for n in self.masks.prunable if n in self.masks.active}

    def param_masks(self, keep) -> dict[str, torch.Tensor]:
        return {n: keep[n] if n in keep else torch.ones_like(self.masks[n]) for n in self.masks.prunable}

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.masks.prunable:
            p = self.params[n]
            if criterion == "magnitude":
                out[n] = p.detach().abs()
            else:  # first-order Taylor |w·∂L/∂w|
                out[n] = torch.zeros_like(p.detach()) if p.grad is None else (p.detach() * p.grad).abs()
        return out

    def grad_scores(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(self.params[n].detach()) if self.params[n].grad is None
                else self.params[n].grad.abs() for n in self.masks.prunable}

    def set_plan(self, keep) -> None:
        pass


class ChannelUnits:
    """Units are output channels of dependency groups; a layer is the group's root module."""

    CRITERIA = ("taylor", "magnitude")

    def __init__(self, model: nn.Module, masks: MaskSet, example_input: torch.Tensor, classifier: nn.Module):
        self.model, self.masks = model, masks
        self.groups = ChannelGroups(model, example_input, ignored=[classifier] if classifier is not None else [])
        if len(self.groups) == 0:
            raise PruneLabError(f"model {type(model).__name__} has no prunable channel groups; use method=iee")
        sliced = [r for r, s in zip(self.groups.roots, self.groups.slices) if s > 1]
        if sliced:  # IEE moves single channels; a grouped conv needs the same positions moved in all its groups
            raise PruneLabError(f"iee_channels moves single channels, but group {sliced[0]} feeds a grouped "
                                "convolution that must lose the same positions in every group; use l1_filter, "
                                "slimming, depgraph or halp for this model")

    def maskable(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    def keep_from_masks(self) -> dict[str, torch.Tensor]:
        plan = self.masks.channel_plan
        if not plan:
            raise PruneLabError("structured IEE needs an initial channel plan: pair it with "
                                "MaskUpdate(target=flops) at step 0 (see conf/method/iee_channels.yaml)")
        return {r: plan[r].cpu().clone() for r in self.groups.roots if r in plan}

    def param_masks(self, keep) -> dict[str, torch.Tensor]:
        touched = self.groups.param_masks(keep)
        return {n: touched.get(n, torch.ones_like(p, dtype=torch.bool)) for n, p in self.model.named_parameters()}

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        # Taylor: (γ·∂L/∂γ + β·∂L/∂β)² over the group's batch norms; magnitude: L1 of the root filter
        scorer = TaylorBN().channel_scorer() if criterion == "taylor" else Magnitude(p=1).channel_scorer()
        return dict(zip(self.groups.roots, self.groups.scores(scorer)))

    def grad_scores(self) -> dict[str, torch.Tensor]:
        scorer = partial(bn_channel_scores, gate=lambda bn, idx: bn.weight.grad[idx] ** 2 + bn.bias.grad[idx] ** 2)
        return dict(zip(self.groups.roots, self.groups.scores(scorer)))

    def set_plan(self, keep) -> None:
        self.masks.set_channel_plan(keep)
