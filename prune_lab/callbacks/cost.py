"""Training cost of every run: `train.flops_ratio` in results.json.

`TrainCost` (in conf/callbacks/default.yaml, so every run has it) counts each step's conv/linear
MACs from the masks the forward pass used (`prune_lab.sparsity.cost`: forward d·MACs, backward
2·d·MACs): 1.0 for dense training, the mean density for masked fine-tuning, less for gradual
pruning. Methods that execute more than their masks say report their own number, which the
pipeline prefers: the `Regrowth` callback (RigL's dense gradients, IEE's exploration) and
`DynamicSparsity` (SR-STE's dense weight gradient), and STP (its subnet passes, each at the subnet's
MACs). A distillation teacher's forward passes are
not counted: the number is the cost of training the pruned network itself.
"""
from __future__ import annotations

import lightning as L

from prune_lab.sparsity.cost import TrainingCost, mask_densities, weight_macs


class TrainCost(L.Callback):
    def __init__(self):
        self.cost: TrainingCost | None = None
        self._resumed: dict | None = None

    def on_fit_start(self, trainer, pl_module):
        self.cost = TrainingCost(weight_macs(pl_module.model, pl_module.example_input))
        if self._resumed is not None:
            self.cost.load_state_dict(self._resumed)

    def on_before_backward(self, trainer, pl_module, loss):
        self.cost.add_step(mask_densities(pl_module.masks, self.cost.macs))

    def state_dict(self):
        return {} if self.cost is None else self.cost.state_dict()

    def load_state_dict(self, state):
        self._resumed = state or None

    def report(self) -> dict:
        steps = 0 if self.cost is None else self.cost.steps
        return {"train": {"flops_ratio": self.cost.ratio if steps else None}}
