"""The mask-update capability: compute masks at scheduled steps and keep pruned entries at zero.

One callback serves one-shot and gradual, unstructured (`target: params`) and structured
(`target: flops` or `latency`) methods; what differs is given as objects: an `Importance`, a distribution
name, a schedule. Masks live in the module's `MaskSet` (`pl_module.masks`), so every other
callback sees them and checkpoints carry them.

`shrink_at_start` (structured one-shot only): prune in `setup`, before the optimizer exists, and
replace the module's model by the physically shrunk copy, so fine-tuning (and any callback that
restructures the network, such as linear expansion) acts on the compact network. On resume
`setup` runs again before Lightning loads the checkpoint: the plan is recomputed from the same
dense weights, so the shrunk shapes match the checkpoint's.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import torch_pruning as tp

from prune_lab.callbacks.latency_plan import LatencyPlanning
from prune_lab.errors import PruneLabError
from prune_lab.export import remove_modules
from prune_lab.sparsity import (ChannelGroups, FlopsModel, MaskSet, OneShot, build_importance, masks_from_scores,
                                shrink, solve_flops_target)
from prune_lab.sparsity.allocation import DISTRIBUTIONS
from prune_lab.sparsity.latency import ALLOCATIONS
from prune_lab.sparsity.nm import NMPattern, nm_masks, unfit_layers


TARGETS = ("params", "flops", "latency")


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


class MaskUpdate(LatencyPlanning, L.Callback):
    """Prune to `budget` following `schedule`; enforce masks on weights and gradients every step.

    Args:
        budget: fraction of the target removed at the end of the schedule.
        target: "params" (unstructured weight sparsity), "flops" (structured channel pruning to a
            FLOPs reduction) or "latency" (structured, to a reduction of the latency results.json
            measures: solved on a per-layer latency table, then measured and corrected,
            `prune_lab.sparsity.latency`).
        importance: criterion name or `Importance` object.
        distribution: unstructured: uniform | erk | global; structured: uniform | global.
        schedule: `OneShot()` (default) or `Cubic(...)`.
        round_to: structured only: kept channels rounded to a multiple (hardware friendly).
        tolerance: structured only: allowed |achieved − budget| of the FLOPs reduction.
        shrink_at_start: structured one-shot only: prune at fit start and train the physically
            shrunk model instead of a masked full-size one.
        pattern: unstructured only: "N:M" keeps the N best of every M consecutive weights along
            each layer's input dimension (`prune_lab.sparsity.nm`) instead of an allocation; the
            budget must then be 1 - N/M. Layers whose input dimension M does not divide stay dense.
        allocation: target=latency only: "halp" (importance kept per ms, greedy on the latency
            table) or "flops" (the FLOPs-target allocation of `distribution`, its FLOPs budget set
            so that its latency meets the budget: the comparison plan).
        latency_importance: target=latency, allocation=halp: what a removed channel costs the
            knapsack: "taylor" (HALP's: BN Taylor saliency (γ·∂L/∂γ + β·∂L/∂β)² summed over
            `latency.taylor_batches` training batches, BN statistics untouched) or "criterion"
            (the log share of the method's own scores kept per group).
        latency_rank: target=latency, allocation=halp: which channels of a group go: "criterion"
            (the method's own scores, default) or "taylor" (the Taylor values, as HALP ranks the
            neurons it packs; needs latency_importance=taylor).
        min_keep: target=latency, allocation=halp: no channel group keeps fewer than this fraction
            of its channels (0: one channel). The one-shot greedy otherwise cut the residual
            streams of the benchmark's ResNet-14 to 1–4 channels (README).
        depth: target=latency, allocation=halp: the greedy may also remove whole residual blocks
            (identity-shortcut blocks of ResNet stages) when that costs the least value per ms.
        latency: target=latency only: the run's `latency` config section (how latency is measured,
            the table's grid, cache and tolerance, the correction rounds).
        dense_stem: unstructured only: keep the first conv/linear layer dense, as RigL's paper
            does; the other layers are pruned harder so the global sparsity is still the budget.
    """

    def __init__(self, budget: float, target: str = "params", importance="magnitude", distribution: str = "uniform",
                 schedule=None, round_to: int = 1, tolerance: float = 0.02, shrink_at_start: bool = False,
                 pattern: str | None = None, dense_stem: bool = False, allocation: str = "halp", latency=None,
                 latency_importance: str = "taylor", min_keep: float = 0.0, depth: bool = False,
                 latency_rank: str = "criterion"):
        if target not in TARGETS:
            raise PruneLabError(f"unknown target '{target}'; choose one of: {', '.join(TARGETS)}")
        allowed = DISTRIBUTIONS if target == "params" else ("uniform", "global")
        if distribution not in allowed:
            raise PruneLabError(f"distribution '{distribution}' is not available for target={target}; "
                                f"choose one of: {', '.join(allowed)}")
        self.budget, self.target, self.distribution = float(budget), target, distribution
        self.importance = build_importance(importance)
        self.schedule = schedule or OneShot()
        self.round_to, self.tolerance = round_to, tolerance
        self.last_update_step = -1
        if target == "latency" and allocation not in ALLOCATIONS:
            raise PruneLabError(f"method.allocation={allocation} is not one of: {', '.join(ALLOCATIONS)}")
        if latency_importance not in ("taylor", "criterion"):
            raise PruneLabError(f"method.latency_importance={latency_importance} is not one of: taylor, criterion")
        if not 0.0 <= float(min_keep) < 1.0:
            raise PruneLabError(f"method.min_keep={min_keep} is outside [0, 1): the smallest fraction of a "
                                "group's channels a latency plan keeps")
        self.allocation, self.latency_importance, self.min_keep = allocation, latency_importance, float(min_keep)
        if latency_rank not in ("criterion", "taylor"):
            raise PruneLabError(f"method.latency_rank={latency_rank} is not one of: criterion, taylor")
        if latency_rank == "taylor" and (allocation != "halp" or latency_importance != "taylor"):
            raise PruneLabError("method.latency_rank=taylor ranks channels by the Taylor values: it needs "
                                "method.allocation=halp and method.latency_importance=taylor")
        self.latency_rank = latency_rank
        self.depth = bool(depth)
        self.steps = int(getattr(self.schedule, "steps", 1))  # > 1: a progressive (HALP-style) schedule
        if self.steps > 1 and self.depth:
            raise PruneLabError("method.depth=true needs a one-shot plan (method.prune_steps=1): a block removed at "
                                "one prune step could not be kept out of the next step's plan")
        # BN Taylor saliency summed over the training batches since the last prune step (HALP's
        # estimate between steps; a progressive latency plan with Taylor values reads it)
        self.saliency: dict[str, torch.Tensor] = {}
        self.progress: list[dict] = []  # a progressive plan's earlier steps, for results.json
        self.latency = _plain(latency) if latency is not None and target == "latency" else {}
        self.latency_record: dict = {}
        if shrink_at_start and (target == "params" or not isinstance(self.schedule, OneShot) or self.schedule.at != 0):
            raise PruneLabError("shrink_at_start needs structured pruning (target: flops or latency) with a one-shot "
                                "schedule at the start (OneShot(at=0))")
        self.shrink_at_start = shrink_at_start
        self.pattern = NMPattern.parse(pattern)
        if self.pattern is not None:
            if target != "params":
                raise PruneLabError(f"method.pattern={pattern} needs target=params (N:M is a weight pattern), "
                                    f"not target={target}")
            if abs(self.budget - self.pattern.sparsity) > 1e-6:
                raise PruneLabError(f"method.pattern={pattern} fixes the sparsity at {self.pattern.sparsity:g}; "
                                    f"budget={budget} must be {self.pattern.sparsity:g}")
        if dense_stem and target != "params":
            raise PruneLabError("method.dense_stem=true needs target=params; channel pruning keeps the stem's "
                                "input anyway")
        self.dense_stem = bool(dense_stem)
        self.dense_layers: list[str] = []  # what the pattern or dense_stem left dense, for results.json

    @property
    def structured(self) -> bool:
        return self.target in ("flops", "latency")

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the pipeline before training with the run's length (optimizer steps)."""
        if hasattr(self.schedule, "check"):
            self.schedule.check(total_steps)

    # -- Lightning hooks ----------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self.shrink_at_start:
            self.prune_and_shrink(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step, total = trainer.global_step, max(int(trainer.estimated_stepping_batches), 1)
        if step != self.last_update_step and self.schedule.is_update(step, total):
            self.update(pl_module, batch, self.budget * self.schedule.fraction(step, total))
            self.last_update_step = step
            for opt in trainer.optimizers:
                pl_module.masks.mask_optimizer_state(opt)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.accumulates_saliency and trainer.global_step < self.schedule.last_step:
            self._add_saliency(pl_module.model)  # only while a later prune step will read it
        pl_module.masks.mask_grads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.masks.apply()

    def state_dict(self):
        return {"last_update_step": self.last_update_step, "dense_layers": list(self.dense_layers),
                "latency_record": self.latency_record, "saliency": dict(self.saliency),
                "progress": list(self.progress)}

    def load_state_dict(self, state):
        self.last_update_step = int(state["last_update_step"])
        self.dense_layers = list(state.get("dense_layers", []))
        self.latency_record = dict(state.get("latency_record", {}))
        self.saliency = dict(state.get("saliency", {}))
        self.progress = list(state.get("progress", []))

    # -- the update itself ----------------------------------------------------------------
    def update(self, pl_module, batch, sparsity: float) -> None:
        """Recompute masks for `sparsity` (a fraction of the target) and apply them now."""
        model, masks = pl_module.model, pl_module.masks
        if self.importance.needs_grad:
            self._fill_grads(pl_module, batch)
        if self.structured:
            self._update_channels(pl_module, sparsity)
            self.saliency = {}  # every rank: the next step's estimate starts now
        else:
            params = {n: p for n, p in model.named_parameters() if n in masks.prunable}
            scores = self.importance.weight_scores(params)
            # pruned weights stay pruned: their score is below every live weight
            scores = {n: torch.where(masks[n], s, torch.full_like(s, -1.0)) for n, s in scores.items()}
            for n, keep in self._unstructured_masks(scores, sparsity).items():
                masks.set(n, keep)
        if self.importance.needs_grad:
            model.zero_grad(set_to_none=True)
        masks.broadcast(src=0)
        masks.apply()

    def _unstructured_masks(self, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        if self.pattern is not None:  # the pattern at full strength (one-shot), or nothing yet
            if sparsity < self.pattern.sparsity:
                return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
            self.dense_layers = unfit_layers(scores, self.pattern)
            return nm_masks(scores, self.pattern)
        if not self.dense_stem:
            return masks_from_scores(scores, sparsity, self.distribution)
        stem = next(iter(scores))  # prunable weights are in module order: the first is the stem
        rest = {n: s for n, s in scores.items() if n != stem}
        total, remaining = sum(s.numel() for s in scores.values()), sum(s.numel() for s in rest.values())
        harder = sparsity * total / max(remaining, 1)  # the rest carries the stem's share of the budget
        if harder >= 1.0:
            raise PruneLabError(f"method.dense_stem=true: the stem {stem} holds too many weights to reach sparsity "
                                f"{sparsity:g} with it dense; use method.dense_stem=false")
        self.dense_layers = [stem]
        return {stem: torch.ones_like(scores[stem], dtype=torch.bool), **masks_from_scores(rest, harder,
                                                                                           self.distribution)}

    def report(self) -> dict:
        if self.latency_record:
            return {"latency_plan": self.latency_record}
        if self.pattern is not None:
            return {"pattern": {"n": self.pattern.n, "m": self.pattern.m, "dense_layers": list(self.dense_layers)}}
        return {"dense_layers": list(self.dense_layers)} if self.dense_stem else {}

    def prune_and_shrink(self, trainer, pl_module) -> None:
        """One-shot structured pruning to the budget, then swap in the physically shrunk model."""
        # on the training device: a gradient criterion's batch and an NCCL mask broadcast need it
        pl_module.to(trainer.strategy.root_device)
        batch = None
        if self.importance.needs_grad:
            x, y = next(iter(trainer.datamodule.train_dataloader()))
            batch = (x.to(pl_module.device), y.to(pl_module.device))
        self.update(pl_module, batch, self.budget)
        plan = {k: v.clone() for k, v in pl_module.masks.channel_plan.items()}
        removed = pl_module.masks.removed
        small = shrink(pl_module.model, plan, pl_module.example_input)
        remove_modules(small, removed)  # whole blocks a latency plan with method.depth drops
        pl_module.model = small
        pl_module.masks = MaskSet(small).to(pl_module.device)  # nothing left to mask: the channels are gone
        pl_module.masks.set_channel_plan(plan, applied=True)   # kept for export's model.json
        pl_module.masks.set_removed(removed)
        pl_module.rebind()
        self.last_update_step = 0  # the one-shot update is done; on_train_batch_start must not redo it

    def _update_channels(self, pl_module, sparsity: float) -> None:
        model, masks = pl_module.model, pl_module.masks
        example = pl_module.example_input.to(pl_module.device)
        groups = ChannelGroups(model, example, ignored=[pl_module.classifier])
        if len(groups) == 0:
            raise PruneLabError(f"model {type(model).__name__} has no prunable channel groups; "
                                "use an unstructured method (target: params)")
        scores = groups.scores(self.importance.channel_scorer())
        if self.target == "latency":
            plan = self._latency_plan(pl_module, groups, scores, sparsity)
        else:
            flops = FlopsModel(groups, example)
            plan = solve_flops_target(groups, flops, scores, sparsity, self.distribution, self.round_to,
                                      self.tolerance)
        masks.reset()
        for n, keep in groups.param_masks(plan).items():
            masks.set(n, keep)
        masks.set_channel_plan(plan)
        removed = list(getattr(plan, "removed", []))
        if removed:  # whole blocks (target=latency, method.depth): every parameter zero, dropped at export
            for n, p in model.named_parameters():
                if n.startswith(tuple(f"{b}." for b in removed)):
                    masks.set(n, torch.zeros_like(p, dtype=torch.bool))
            masks.set_removed(removed)

    @staticmethod
    def _fill_grads(pl_module, batch) -> None:
        x, y = batch
        pl_module.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            F.cross_entropy(pl_module.model(x), y).backward()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():  # score on the global batch's gradient
            for p in pl_module.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()


class KeepMasks(L.Callback):
    """Fine-tuning after a post-training prune (`method.train=true` on sparsegpt, wanda, pot,
    oneshot_bnrecal): the masks the prepare step chose stay fixed, their pruned entries' gradients,
    momentum and weights zeroed every step, as MaskUpdate does between its updates."""

    def on_train_start(self, trainer, pl_module):
        # the prepare step ran on every rank before the process group existed: rank 0's masks decide
        pl_module.masks.broadcast(0)
        pl_module.masks.apply()
        for opt in trainer.optimizers:
            pl_module.masks.mask_optimizer_state(opt)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pl_module.masks.mask_grads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.masks.apply()


class BNScalePenalty(L.Callback):
    """Network slimming's sparsity regulariser (Liu et al. 2017): λ·Σ|γ| over BN scales, added to
    the loss until `until` (fraction of training), when a structured MaskUpdate prunes by |γ|.
    This is the "suppressed sparsification" paradigm STP argues against: the channels to be
    dropped are pushed to zero before they are removed."""

    def __init__(self, weight: float = 1e-4, until: float = 0.5):
        self.weight, self.until = weight, until

    def on_fit_start(self, trainer, pl_module):
        pl_module.loss_terms.append(self._penalty)

    def _penalty(self, pl_module, batch, logits):
        trainer = pl_module.trainer
        if trainer.global_step >= self.until * trainer.estimated_stepping_batches:
            return logits.new_zeros(())
        bns = [m.weight for m in pl_module.model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        return self.weight * sum(w.abs().sum() for w in bns)


class GroupNormPenalty(L.Callback):
    """DepGraph's sparse training (Fang et al., CVPR 2023), torch-pruning's own `GroupNormPruner`: until
    `until` (fraction of training), after every backward the gradient of each coupled channel group gets
    reg · γ_g · w, where γ_g = alpha^((max − I_g) / (max − min)) grows for groups of small L2 group norm
    I_g, so the groups to be removed are pushed to zero together; then a structured MaskUpdate prunes by
    the same group norm (`Magnitude(p=2, group_reduction="mean")`). Nothing of the regulariser is
    re-written here: `regularize` is torch-pruning's."""

    def __init__(self, reg: float = 5e-4, alpha: float = 4.0, until: float = 0.5):
        if not float(reg) >= 0 or not float(alpha) >= 1 or not 0.0 < float(until) <= 1.0:
            raise PruneLabError(f"group-norm penalty reg={reg}, alpha={alpha}, until={until}: need reg >= 0, "
                                "alpha >= 1 and until in (0, 1]")
        self.reg, self.alpha, self.until = float(reg), float(alpha), float(until)
        self.pruner = None

    def on_fit_start(self, trainer, pl_module):
        model = pl_module.model
        was_training = model.training
        model.eval()  # the pruner traces the model with a forward: keep BN running statistics untouched
        try:
            with torch.enable_grad():
                self.pruner = tp.pruner.GroupNormPruner(
                    model, pl_module.example_input.to(pl_module.device),
                    importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None),
                    reg=self.reg, alpha=self.alpha, ignored_layers=[pl_module.classifier])
        finally:
            model.train(was_training)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step < self.until * trainer.estimated_stepping_batches:
            self.pruner.regularize(pl_module.model, alpha=self.alpha)
