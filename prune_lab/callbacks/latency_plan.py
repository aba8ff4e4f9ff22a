"""The latency-target half of `MaskUpdate` (`target: latency`): the table check before training,
HALP's Taylor saliency, the plan solved on the latency table, measured and corrected
(`prune_lab.sparsity.latency_allocation.meet_latency`), and a progressive schedule's steps.

A mixin: `MaskUpdate` holds the state (budget, allocation, min_keep, depth, latency settings,
steps, saliency, progress, latency_record) and calls `_latency_plan` from its channel update.
"""
from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import ChannelGroups
from prune_lab.sparsity.importance import bn_channel_scores


def _name_of(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


class LatencyPlanning:
    def check(self, model, example_input) -> None:
        """target=latency: the table is measured now (and cached), and a budget it predicts out of
        reach is refused before anything trains."""
        if self.target != "latency":
            return
        from prune_lab.models import classifier_of
        from prune_lab.sparsity.latency import table_for_run
        from prune_lab.sparsity.latency_allocation import max_reduction

        cpu = copy.deepcopy(model).cpu().eval()
        groups = ChannelGroups(cpu, example_input.cpu(), ignored=[classifier_of(cpu)[1]])
        if len(groups) == 0:
            return  # check_structured refuses this with its own line
        table = table_for_run(groups, example_input, self.latency)
        top = max_reduction(groups, table, self.latency_round_to, self.min_keep if self.allocation == "halp" else 0.0)
        if self.budget > top:
            raise PruneLabError(f"budget={self.budget:g} (latency) is out of reach on this model: the latency table "
                                f"predicts at most {top:.3f} with every channel group at its minimum")

    @property
    def latency_round_to(self) -> int:
        """Kept counts of a latency plan: multiples of method.round_to and of latency.channel_block (8).
        CPU kernels work on blocks of 8 fp32 channels (AVX2's vector). A whole network with
        off-block counts runs slower than one with block counts at the same table prediction, which
        the table's standalone layer timings do not show: Fashion-MNIST's ResNet-14 at a predicted
        0.53 / 0.48 measured 0.52 / 0.43 (latency / FLOPs plan, any count) against 0.57 / 0.58 in
        blocks of 8 (scripts/probes/latency_block_probe.py, README latency section)."""
        return math.lcm(max(1, int(self.round_to)), max(1, int(self.latency.get("channel_block", 8))))

    @property
    def accumulates_saliency(self) -> bool:
        return (self.target == "latency" and self.steps > 1 and self.allocation == "halp"
                and self.latency_importance == "taylor")

    @torch.no_grad()
    def _add_saliency(self, model) -> None:
        """(γ·∂L/∂γ + β·∂L/∂β)² of this step's training gradients, per BN channel (pruned
        channels have γ = β = 0 and add nothing); kept on the model's device (no copy per step)."""
        for name, bn in model.named_modules():
            if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.affine and bn.weight.grad is not None:
                s = ((bn.weight * bn.weight.grad + bn.bias * bn.bias.grad) ** 2).float()
                self.saliency[name] = self.saliency[name] + s if name in self.saliency else s

    def _latency_plan(self, pl_module, groups, scores, sparsity: float) -> dict[str, torch.Tensor]:
        """Solve on the latency table, measure the shrunk model, correct (latency_allocation.meet_latency).
        The plan is kept in the run directory: a resumed run (whose `setup` may re-prune) reuses it
        instead of re-measuring, so its shapes match the checkpoint's. Under DDP rank 0 measures and
        the plan is broadcast, so every rank prunes the same channels."""
        from prune_lab.sparsity.latency import measured_reduction, table_for_run
        from prune_lab.sparsity.latency_allocation import (ChannelPlan, meet_latency, removable_blocks,
                                                           solve_latency_target)

        trainer = pl_module._trainer
        # a progressive schedule's earlier steps are solved on the table alone; the last one is
        # measured and corrected like a one-shot plan, and saved for a resume
        final = sparsity >= self.budget - 1e-9
        earlier = {r: k.cpu() for r, k in pl_module.masks.channel_plan.items()}  # the previous step's plan
        saved = Path(trainer.default_root_dir) / "latency_plan.json" if trainer is not None and final else None
        key = {"budget": sparsity, "allocation": self.allocation, "importance": self.latency_importance,
               **({"rank": self.latency_rank} if self.latency_rank != "criterion" else {}),
               **({"lookahead": int(self.latency["lookahead"])} if int(self.latency.get("lookahead", 1)) > 1 else {}),
               "min_keep": self.min_keep, "depth": self.depth, "round_to": self.latency_round_to,
               "sizes": dict(zip(groups.roots, groups.sizes))}
        plan = None
        if saved is not None and saved.exists():
            stored = json.loads(saved.read_text())
            if stored["key"] == key:
                plan = ChannelPlan({r: torch.tensor(k, dtype=torch.bool) for r, k in stored["plan"].items()},
                                   stored.get("removed", []))
                self.latency_record = stored["record"]
        dist = torch.distributed
        distributed = dist.is_available() and dist.is_initialized()
        if plan is None and (not distributed or dist.get_rank() == 0):
            example = pl_module.example_input.cpu()
            cpu = copy.deepcopy(pl_module.model).cpu().eval()
            cpu_groups = ChannelGroups(cpu, example, ignored=[cpu.get_submodule(_name_of(pl_module.model,
                                                                                         pl_module.classifier))])
            blocks = removable_blocks(cpu, example) if self.depth and self.allocation == "halp" else []
            values = None
            if self.allocation == "halp" and self.latency_importance == "taylor":
                by_root = dict(zip(groups.roots, self._taylor_values(pl_module, groups)))
                values = [by_root[r] for r in cpu_groups.roots]
            # which channels of a group go: the method's criterion, or (latency_rank=taylor) the values
            by_root = dict(zip(groups.roots, scores))
            rank = values if self.latency_rank == "taylor" else [by_root[r] for r in cpu_groups.roots]
            # channels an earlier step removed score lowest: they go first again
            cpu_scores = [torch.where(earlier[r], s, torch.full_like(s, -1.0)) if r in earlier else s
                          for r, s in zip(cpu_groups.roots, rank)]
            start = [int((~earlier[r]).sum()) if r in earlier else 0 for r in cpu_groups.roots]
            table = table_for_run(cpu_groups, example, self.latency)
            tol = float(self.latency.get("tolerance", 0.04))

            def solve(asked):
                return solve_latency_target(cpu_groups, table, cpu_scores, asked, self.allocation, self.distribution,
                                            self.latency_round_to, values, self.min_keep, blocks,
                                            start if self.allocation == "halp" else None,
                                            int(self.latency.get("lookahead", 1)))

            if not final:
                plan, predicted = solve(sparsity)
                self.progress.append({"budget": sparsity, "predicted": predicted,
                                      "kept": {r: int(k.sum()) for r, k in plan.items()}})
                return self._broadcast_plan(pl_module, plan, distributed)

            def measure(p):
                return measured_reduction(cpu, p, example, self.latency, getattr(p, "removed", []))["reduction"]

            plan, history = meet_latency(solve, measure, sparsity, tol, int(self.latency.get("rounds", 3)),
                                         confirm=bool(self.latency.get("confirm", True)))
            self.latency_record = {"allocation": self.allocation, "importance": self.latency_importance,
                                   "lookahead": int(self.latency.get("lookahead", 1)),
                                   "rank": self.latency_rank,
                                   "min_keep": self.min_keep, "depth": self.depth, "round_to": self.latency_round_to,
                                   "removed_blocks": list(getattr(plan, "removed", [])),
                                   "budget": sparsity, "tolerance": tol,
                                   "table": table.describe(), "rounds": history,
                                   "predicted_reduction": table.reduction(plan, getattr(plan, "removed", [])),
                                   "measured_reduction": next(h["measured"] for h in history if h["chosen"]),
                                   "steps": self.steps, "earlier_steps": list(self.progress),
                                   # True when every channel an earlier step removed stayed removed
                                   "monotone": all(not bool((plan[r] & ~earlier[r]).any()) for r in earlier)}
            if saved is not None and trainer.is_global_zero:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps({"key": key, "record": self.latency_record,
                                             "plan": {r: k.tolist() for r, k in plan.items()},
                                             "removed": list(getattr(plan, "removed", []))}))
        return self._broadcast_plan(pl_module, plan, distributed)

    def _broadcast_plan(self, pl_module, plan, distributed: bool):
        """Rank 0's plan (and record) on every rank, on the module's device."""
        from prune_lab.sparsity.latency_allocation import ChannelPlan

        if distributed:
            box = [None if plan is None else dict(plan), list(getattr(plan, "removed", [])), self.latency_record,
                   self.progress]
            torch.distributed.broadcast_object_list(box, src=0)
            plan, self.latency_record, self.progress = ChannelPlan(box[0], box[1]), box[2], box[3]
        return ChannelPlan({r: k.to(pl_module.device) for r, k in plan.items()}, getattr(plan, "removed", []))

    def _taylor_values(self, pl_module, groups) -> list[torch.Tensor]:
        """HALP's channel saliency, (γ·∂L/∂γ + β·∂L/∂β)² per channel summed over the group's batch
        norms. A progressive schedule's later steps read it from the training steps since the
        previous prune step (HALP's estimate, no extra pass); otherwise it is accumulated over the
        first `latency.taylor_batches` training batches (training data only) in eval mode, so BN
        running statistics are not touched."""
        from prune_lab.sparsity.importance import TaylorBN

        model, trainer = pl_module.model, pl_module._trainer
        if self.saliency:  # a progressive schedule: the training batches since the last step, then start afresh
            names = {m: n for n, m in model.named_modules()}
            acc, self.saliency = self.saliency, {}
            scorer = partial(bn_channel_scores, needs_grad=False,
                             gate=lambda bn, idx: acc[names[bn]].to(idx.device)[idx] if names[bn] in acc
                             else torch.zeros(len(idx)))
            return groups.scores(scorer)
        if trainer is None or getattr(trainer, "datamodule", None) is None:
            raise PruneLabError("method.latency_importance=taylor needs the run's training data; "
                                "use method.latency_importance=criterion")
        scorer, total = TaylorBN().channel_scorer(), [torch.zeros(s) for s in groups.sizes]
        was_training = model.training
        model.eval()
        try:
            for i, (x, y) in enumerate(trainer.datamodule.train_dataloader()):
                if i >= int(self.latency.get("taylor_batches", 8)):
                    break
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    F.cross_entropy(model(x.to(pl_module.device)), y.to(pl_module.device)).backward()
                total = [t + s for t, s in zip(total, groups.scores(scorer))]
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return total

