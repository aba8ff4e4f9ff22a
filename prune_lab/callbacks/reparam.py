"""Re-parameterization during training: sparse forward, dense weights underneath.

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
"""
from __future__ import annotations

import lightning as L
import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import exact_counts, masks_from_counts


class DynamicSparsity(L.Callback):
    """Args:
        dynamic: recompute masks from |w| every step (STE + SR-STE); False: fixed masks.
        decay: SR-STE λ on pruned weights (5e-5 in UniPTS).
        budget: used only when training starts without masks: uniform per-layer sparsity.
    """

    def __init__(self, dynamic: bool = True, decay: float = 5e-5, budget: float | None = None):
        if not isinstance(dynamic, bool):
            raise PruneLabError(f"method.dst={dynamic!r} is not a boolean; choose one of: true, false")
        if float(decay) < 0:
            raise PruneLabError(f"SR-STE decay={decay} must be >= 0")
        self.dynamic, self.decay, self.budget = dynamic, float(decay), budget
        self.pruned: dict[str, int] = {}
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
    @torch.no_grad()
    def _swap_in_sparse(self, pl_module) -> None:
        if self._dense is not None:  # already sparse (gradient accumulation)
            return
        weights = self._weights(pl_module)
        scores = {n: w.abs() for n, w in weights.items()}
        for n, keep in masks_from_counts(scores, self.pruned).items():
            pl_module.masks.set(n, keep)
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
        pl_module.masks.apply()
