"""The re-parameterization capability: train one parameterization, deploy another, exactly.

`LinearExpansion` (linear over-parameterization, METHODS.md §4) replaces every Conv2d and Linear
of the module's model by an equivalent linear chain (`prune_lab.sparsity.reparam`) in `setup`,
i.e. before Lightning builds the optimizer, so the optimizer trains the chain's factors (initialised
so one SGD step moves the merged weight about as far as a step on it would, and with weight decay
on the middle factor only, which decays the merged weight exactly as plain SGD would); at the
end of training it merges every chain back into one layer of the original shape, so testing,
export and `model.safetensors` see exactly the pruned architecture. Checkpoints written during
training hold the expanded weights (the optimizer state belongs to them); on resume `setup`
expands again before Lightning loads them. The merge runs in `on_fit_end`, after Lightning's last
checkpoint save, so no checkpoint is ever merged. It must act on a physically shrunk network
(MaskUpdate with `shrink_at_start`, listed before this callback): weight masks cannot survive a
merge, so active masks are refused.

`DynamicSparsity` is dynamic sparse training with a straight-through estimator (STE) and SR-STE
(Zhou et al. 2021), as UniPTS trains (METHODS.md §2): each layer keeps a fixed number of
weights — the per-layer sparsities found in the `MaskSet` when training starts (set by a search
or a one-shot pruning step) — and before every step its mask is recomputed as the top |w| of the
*dense* weights. The forward pass sees W⊙M; the gradient of W⊙M is applied to all of W
(straight-through), plus the decay λ·(1−M)⊙W on the pruned entries, so pruned weights can grow
back while being pulled towards zero. When training ends, the last masks are applied for good.
How: the dense weights are swapped out around the forward/backward pass (stash → W⊙M → forward,
backward → restore W → add decay → optimizer step on W). Validation sees the sparse model.
`dynamic=False` keeps the starting masks fixed instead (pruned weights held at zero, their
gradients masked): the "fixed masks" ablation.

With `pattern` "N:M" (SR-STE's own setting, `conf/method/sr_ste.yaml`), the mask recomputed every
step keeps the N largest |w| of every M consecutive weights along each layer's input dimension
instead of a per-layer count (layers the pattern does not fit stay dense; results.json lists
them). Training cost (`report`): forward and input gradient at the masks' density, the weight
gradient dense every step (straight-through), as RigL's accounting counts it.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import exact_counts, masks_from_counts
from prune_lab.sparsity.cost import TrainingCost, mask_densities, weight_macs
from prune_lab.sparsity.nm import NMPattern, nm_masks, unfit_layers
from prune_lab.sparsity.reparam import DEFAULT_STEP_SHARE, expand_layers, merge_layers

log = logging.getLogger("prune_lab")


class LinearExpansion(L.Callback):
    """Expand conv/linear layers by `ratio` for training, merge them at the end.

    Args:
        ratio: channel expansion r of the chain 1×1 (C_in→r·C_in) → k×k → 1×1 (r·C_out→C_out);
            an integer >= 1 (the step-matched initialisation moves W as far at r = 1 as at r = 8).
        enabled: false turns the callback into a no-op (the method's `expand=false` ablation).
        seed: seed of the random outer factors; a private generator, so expanding does not shift
            the global random stream (data order stays that of the unexpanded run).
        skip: module names left unexpanded.
        compute: "collapsed" (compose B·K·A each step, run one conv: same function and gradients,
            far cheaper) or "chain" (run the three layers); see `prune_lab.sparsity.reparam`.
        step_share: κ in (0, 1], the bound on each factor's share of an SGD step of the merged
            weight relative to vanilla's (0.7: the whole step ≈ vanilla's; `prune_lab.sparsity.reparam`).
    """

    def __init__(self, ratio: int = 4, enabled: bool = True, seed: int = 0, skip: list[str] | tuple = (),
                 compute: str = "collapsed", step_share: float = DEFAULT_STEP_SHARE):
        if compute not in ("collapsed", "chain"):
            raise PruneLabError(f"expansion compute='{compute}' is not one of: collapsed, chain")
        self.compute = compute
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise PruneLabError(f"method.ratio={ratio} must be an integer >= 1 (the channel expansion r)")
        if isinstance(step_share, bool) or not isinstance(step_share, (int, float)) or not 0 < step_share <= 1:
            raise PruneLabError(f"method.step_share={step_share} must be in (0, 1]: each factor's share of "
                                "vanilla's step (0.7 matches it)")
        self.ratio, self.enabled, self.seed, self.skip = ratio, bool(enabled), int(seed), tuple(skip or ())
        self.step_share = float(step_share)
        self.expanded: list[str] = []
        self.merge_error: float | None = None
        self.params: tuple[int, int] | None = None

    def report(self) -> dict:
        """results.json["expansion"]: what was trained and how exactly it merged back."""
        if not self.enabled:
            return {}
        return {"expansion": {"ratio": self.ratio, "step_share": self.step_share, "compute": self.compute,
                              "trained_params": self.params[1] if self.params else None,
                              "merge_max_rel_logit_change": self.merge_error}}

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or not self.enabled:
            return
        if pl_module.masks.active:
            raise PruneLabError("linear expansion needs a physically shrunk network, but weight masks are active "
                                "(a merge would not keep them); use structured pruning with shrink_at_start: true")
        generator = torch.Generator().manual_seed(self.seed)
        before = sum(p.numel() for p in pl_module.model.parameters())
        self.expanded = expand_layers(pl_module.model, self.ratio, generator, self.skip, self.compute,
                                      self.step_share)
        pl_module.rebind()
        after = sum(p.numel() for p in pl_module.model.parameters())
        self.params = (before, after)
        log.info("linear expansion (r=%d, step_share=%.2f): %d layers, %d → %d trainable parameters", self.ratio,
                 self.step_share, len(self.expanded), before, after)

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


class DynamicSparsity(L.Callback):
    """Args:
        dynamic: recompute masks from |w| every step (STE + SR-STE); False: fixed masks.
        decay: SR-STE λ on pruned weights (5e-5 in UniPTS).
        budget: used only when training starts without masks: uniform per-layer sparsity.
        pattern: "N:M": masks hold N of every M weights along the input dimension (budget 1 - N/M).
    """

    def __init__(self, dynamic: bool = True, decay: float = 5e-5, budget: float | None = None,
                 pattern: str | None = None):
        if not isinstance(dynamic, bool):
            raise PruneLabError(f"method.dst={dynamic!r} is not a boolean; choose one of: true, false")
        if float(decay) < 0:
            raise PruneLabError(f"SR-STE decay={decay} must be >= 0")
        self.pattern = NMPattern.parse(pattern)
        if self.pattern is not None and budget is not None and abs(float(budget) - self.pattern.sparsity) > 1e-6:
            raise PruneLabError(f"method.pattern={pattern} fixes the sparsity at {self.pattern.sparsity:g}; "
                                f"budget={budget} must be {self.pattern.sparsity:g}")
        self.dynamic, self.decay, self.budget = dynamic, float(decay), budget
        self.pruned: dict[str, int] = {}
        self.flops_ratio: float | None = None
        self._dense: dict[str, torch.Tensor] | None = None  # the dense weights while W⊙M is swapped in

    def state_dict(self):
        return {"pruned": dict(self.pruned)}

    def load_state_dict(self, state):
        self.pruned = {k: int(v) for k, v in state["pruned"].items()}

    def _weights(self, pl_module) -> dict[str, torch.nn.Parameter]:
        params = dict(pl_module.model.named_parameters())
        return {n: params[n] for n in pl_module.masks.prunable}

    def on_train_start(self, trainer, pl_module):
        masks = pl_module.masks
        masks.broadcast(src=0)
        if self.pattern is not None:
            if not self.dynamic and not masks.active:
                for n, keep in self._masks(pl_module).items():
                    masks.set(n, keep)
                masks.apply()
            return
        if self.pruned:  # resumed
            return
        weights = self._weights(pl_module)
        if masks.active:
            self.pruned = {n: int((~masks[n]).sum()) for n in weights}
        elif self.budget:
            numel = {n: w.numel() for n, w in weights.items()}
            self.pruned = exact_counts({n: float(self.budget) for n in numel}, numel,
                                       round(float(self.budget) * sum(numel.values())))
        else:
            raise RuntimeError("DynamicSparsity found no masks to train; put a search or pruning step before it "
                               "or give it a budget")
        if not self.dynamic:
            if not masks.active:
                for n, keep in masks_from_counts({n: w.detach().abs() for n, w in weights.items()},
                                                 self.pruned).items():
                    masks.set(n, keep)
            masks.apply()

    # -- STE: sparse forward/backward, dense update ------------------------------------------
    def _masks(self, pl_module) -> dict[str, torch.Tensor]:
        """Top |w|: N of every M (pattern) or each layer's count."""
        scores = {n: w.detach().abs() for n, w in self._weights(pl_module).items()}
        if self.pattern is not None:
            return nm_masks(scores, self.pattern)
        return masks_from_counts(scores, self.pruned)

    @torch.no_grad()
    def _swap_in_sparse(self, pl_module) -> None:
        if self._dense is not None:  # already sparse (gradient accumulation)
            return
        weights = self._weights(pl_module)
        for n, keep in self._masks(pl_module).items():  # every step: whether a layer is sparse is known on the host
            sparse = self.pattern.fits(weights[n]) if self.pattern is not None else self.pruned.get(n, 0) > 0
            pl_module.masks.set(n, keep, sparse=sparse)
        self._dense = {n: w.detach().clone() for n, w in weights.items()}
        pl_module.masks.apply()

    @torch.no_grad()
    def _restore_dense(self, pl_module) -> None:
        if self._dense is None:
            return
        for n, w in self._weights(pl_module).items():
            w.copy_(self._dense[n])
        self._dense = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.dynamic:
            self._swap_in_sparse(pl_module)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.dynamic:
            pl_module.masks.mask_grads()
            return
        self._restore_dense(pl_module)
        masks = pl_module.masks
        for n, w in self._weights(pl_module).items():
            if w.grad is not None and self.decay:
                w.grad.add_(w * ~masks[n], alpha=self.decay)  # SR-STE: pull pruned weights towards 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.dynamic:
            pl_module.masks.apply()

    # -- evaluation and the end: the sparse model ----------------------------------------------
    def on_validation_start(self, trainer, pl_module):
        if self.dynamic and trainer.state.fn == "fit":
            self._swap_in_sparse(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self.dynamic and trainer.state.fn == "fit":
            self._restore_dense(pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.dynamic:
            self._restore_dense(pl_module)
            self._swap_in_sparse(pl_module)
            self._dense = None  # the sparse weights are final
            cost = TrainingCost(weight_macs(pl_module.model, pl_module.example_input))
            forward = mask_densities(pl_module.masks, cost.macs)  # fixed per layer: the count or the pattern
            cost.add_step(forward, {n: 1.0 for n in forward})
            self.flops_ratio = cost.ratio
        if self.pattern is not None:
            self.dense_layers = unfit_layers(self._weights(pl_module), self.pattern)
        pl_module.masks.apply()

    def report(self) -> dict:
        out = {}
        if self.flops_ratio is not None:
            out["train"] = {"flops_ratio": self.flops_ratio}
        if self.pattern is not None:
            out["pattern"] = {"n": self.pattern.n, "m": self.pattern.m,
                              "dense_layers": list(getattr(self, "dense_layers", []))}
        return out
