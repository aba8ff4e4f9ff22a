"""Training cost as RigL's paper counts it (Evci et al. 2020, appendix on FLOPs).

Only conv and linear multiply-accumulates (MACs) count, for one input (DESIGN.md §3: what
`torch.utils.flop_counter` counts, halved); the batch size cancels in the ratio. A layer with
weight density d executes, per step:

    forward                       d · MACs
    backward, input gradient      d · MACs     (through the sparse weights)
    backward, weight gradient     d_g · MACs   (d_g = d, or 1 where the step needs the dense
                                                gradient: RigL's update steps, SR-STE's straight-through
                                                gradient, IEE's no-exploration ablation)

so a dense step is 3 · MACs and a sparse one 3 · d · MACs (RigL's "backward ≈ 2 × forward").
`flops_ratio` = executed MACs / (steps · dense step MACs): 1.0 for dense training, ≈ density for
static sparse training. The first layer's input gradient, which no one computes, is counted
anyway, like RigL does.
"""
from __future__ import annotations

import torch
from torch import nn

from prune_lab.sparsity.measure import layer_macs


def weight_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of every conv/linear layer for one input, keyed by its weight's parameter name."""
    return {f"{m}.weight" if m else "weight": v for m, v in layer_macs(model, example_input).items()}


def mask_densities(masks, names) -> dict:
    """Fraction of True entries of each mask (1.0 for parameters without an active mask), as
    0-dim tensors on the masks' device: accumulated there, read back only when a record is written
    (a float() per layer and step would be a device sync every step on a GPU)."""
    # count_nonzero reads the bool mask as is (no float copy of it each step); float64: summed over many steps
    return {n: masks[n].count_nonzero().double() / masks[n].numel() if n in masks.active else 1.0 for n in names}


class TrainingCost:
    """Accumulates executed MACs step by step; `ratio` is relative to dense training."""

    def __init__(self, macs: dict[str, int]):
        self.macs = dict(macs)
        self.dense_step = 3 * sum(self.macs.values())
        self.total = 0.0
        self.steps = 0

    def add_step(self, forward: dict[str, float], weight_grad: dict[str, float] | None = None) -> None:
        """`forward`: density of each layer's weights in this step's forward pass; `weight_grad`:
        density of the weight gradient computed (defaults to `forward`)."""
        weight_grad = forward if weight_grad is None else weight_grad
        for name, macs in self.macs.items():
            d = forward.get(name, 1.0)
            self.total += macs * (2 * d + weight_grad.get(name, d))
        self.steps += 1

    @property
    def ratio(self) -> float:
        return float(self.total) / max(self.steps * self.dense_step, 1)

    def state_dict(self) -> dict:
        return {"total": float(self.total), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.steps = float(state["total"]), int(state["steps"])
