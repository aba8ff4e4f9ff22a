"""The re-parameterization capability: train an over-parameterized form, fold it back exactly.

`LinearExpansion` replaces every Conv2d and Linear of the module's model by an equivalent linear
chain (`prune_lab.sparsity.reparam`) in `setup`, i.e. before Lightning builds the optimizer, so
the optimizer trains the chain's factors; at the end of training it merges every chain back into
one layer of the original shape, so testing, export and `model.safetensors` see exactly the
pruned architecture. Checkpoints written during training hold the expanded weights (the optimizer
state belongs to them); on resume `setup` expands again before Lightning loads them. The merge
runs in `on_fit_end`, after Lightning's last checkpoint save, so no checkpoint is ever merged.

It must act on a physically shrunk network (MaskUpdate with `shrink_at_start`, listed before this
callback): weight masks cannot survive a merge, so active masks are refused.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.reparam import expand_layers, merge_layers

log = logging.getLogger("prune_lab")


class LinearExpansion(L.Callback):
    """Expand conv/linear layers by `ratio` for training, merge them at the end.

    Args:
        ratio: channel expansion r of the chain 1×1 (C_in→r·C_in) → k×k → 1×1 (r·C_out→C_out).
        enabled: false turns the callback into a no-op (the method's `expand=false` ablation).
        seed: seed of the random outer factors; a private generator, so expanding does not shift
            the global random stream (data order stays that of the unexpanded run).
        skip: module names left unexpanded.
        compute: "collapsed" (compose B·K·A each step, run one conv: same function and gradients,
            far cheaper) or "chain" (run the three layers); see `prune_lab.sparsity.reparam`.
    """

    def __init__(self, ratio: int = 4, enabled: bool = True, seed: int = 0, skip: list[str] | tuple = (),
                 compute: str = "collapsed"):
        if compute not in ("collapsed", "chain"):
            raise PruneLabError(f"expansion compute='{compute}' is not one of: collapsed, chain")
        self.compute = compute
        if int(ratio) < 1:
            raise PruneLabError(f"expansion ratio={ratio} must be an integer >= 1")
        self.ratio, self.enabled, self.seed, self.skip = int(ratio), bool(enabled), int(seed), tuple(skip or ())
        self.expanded: list[str] = []
        self.merge_error: float | None = None

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or not self.enabled:
            return
        if pl_module.masks.active:
            raise PruneLabError("linear expansion needs a physically shrunk network, but weight masks are active "
                                "(a merge would not keep them); use structured pruning with shrink_at_start: true")
        generator = torch.Generator().manual_seed(self.seed)
        before = sum(p.numel() for p in pl_module.model.parameters())
        self.expanded = expand_layers(pl_module.model, self.ratio, generator, self.skip, self.compute)
        pl_module.rebind()
        after = sum(p.numel() for p in pl_module.model.parameters())
        log.info("linear expansion (r=%d): %d layers, %d → %d trainable parameters", self.ratio, len(self.expanded),
                 before, after)

    def on_fit_end(self, trainer, pl_module):  # after every checkpoint of the run is written
        if not self.enabled or not self.expanded:
            return
        model = pl_module.model
        x = pl_module.example_input.expand(2, *pl_module.example_input.shape[1:])
        was_training = model.training
        model.eval()
        with torch.no_grad():
            before = model(x)
            merge_layers(model)
            after = model(x)
        model.train(was_training)
        pl_module.rebind()
        self.merge_error = float((before - after).abs().max() / before.abs().max().clamp_min(1e-12))
        self.expanded = []
        log.info("linear expansion merged back; max relative logit change %.2e", self.merge_error)
