"""The regrowth capability: move units between the active and the pruned set during training.

What moves and when is a policy (`prune_lab.sparsity.regrowth.RegrowthPolicy`): `DropGrow` for
RigL and SET, IEE's phase machine (`prune_lab.methods.iee.IEE`) given through config
`_target_`. This callback only maps Lightning's hooks onto the policy's, keeps the policy's
state in checkpoints, and under DDP checks after every structural change that all ranks hold
the same masks (a diverged rank would silently train a different network).

It moves units; it does not create the initial masks or enforce them between updates: methods
pair it with a `MaskUpdate` (one-shot at step 0), which does both.

It also records what the training cost (`report()`, merged into results.json's `train`):
`flops_ratio`, the conv/linear MACs executed relative to dense training of the same number of
steps as RigL's paper counts them (`prune_lab.sparsity.cost`; the policy says which steps need
dense weight gradients or train only part of the network), and `active_updates`, the mean number
of optimizer updates that the weights active at the end received (a weight regrown late has
had fewer; frozen weights receive none), and `grown_per_active`, the weight entries the policy
moved into the active set over the run per weight active at the end (how many times the active
set was renewed; RigL, SET and IEE on weights).
"""
from __future__ import annotations

import logging
import zlib

import lightning as L
import torch
import torch.distributed as dist

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.cost import TrainingCost, mask_densities, weight_macs
from prune_lab.sparsity.regrowth import RegrowthPolicy

log = logging.getLogger("prune_lab")


def decisions_digest(masks, extra: list[torch.Tensor]) -> int:
    """CRC32 of every mask, the channel plan and the policy's own decision tensors."""
    crc = 0
    tensors = [b for _, b in sorted(masks.named_buffers())] + list(extra)
    for t in tensors:
        crc = zlib.crc32(t.detach().to("cpu", torch.uint8).numpy().tobytes(), crc)
    return crc


class Regrowth(L.Callback):
    """Drive `policy` once per optimizer step. Gradient accumulation is not supported: a
    structural step must coincide with an optimizer step."""

    def __init__(self, policy: RegrowthPolicy):
        if not isinstance(policy, RegrowthPolicy):
            raise PruneLabError(f"Regrowth.policy={type(policy).__name__} is not a RegrowthPolicy; use "
                                "prune_lab.sparsity.regrowth.DropGrow or prune_lab.methods.iee.IEE")
        self.policy = policy
        self.step = 0
        self.rank_checks = 0
        self.cost: TrainingCost | None = None
        self.updates: dict[str, torch.Tensor] | None = None  # optimizer updates per prunable weight entry
        self._resumed: dict | None = None

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the pipeline before training: the policy's own `check_schedule`, if any."""
        if hasattr(self.policy, "check_schedule"):
            self.policy.check_schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def on_fit_start(self, trainer, pl_module):
        if trainer.accumulate_grad_batches != 1:
            raise PruneLabError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported "
                                "by regrowth methods; use 1")
        self.policy.bind(pl_module.model, pl_module.masks, pl_module.example_input, pl_module.classifier)
        self.cost = TrainingCost(weight_macs(pl_module.model, pl_module.example_input))
        params = dict(pl_module.model.named_parameters())
        self.updates = {n: torch.zeros(params[n].shape, dtype=torch.int32, device=params[n].device)
                        for n in pl_module.masks.prunable}
        if self._resumed is not None:
            self.cost.load_state_dict(self._resumed["cost"])
            for n, v in self._resumed["updates"].items():
                self.updates[n].copy_(v)
            self._resumed = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step
        if self.policy.before_forward(self.step, self._total(trainer), trainer.optimizers):
            self._check_ranks(pl_module)

    def on_before_backward(self, trainer, pl_module, loss):
        # the forward pass ran with the masks as they are now (before any after_backward update)
        forward = mask_densities(pl_module.masks, self.cost.macs)
        self.cost.add_step(forward, self.policy.weight_grad_density(self.step, self._total(trainer), forward))

    def on_after_backward(self, trainer, pl_module):
        if self.policy.after_backward(self.step, self._total(trainer), trainer.optimizers):
            self._check_ranks(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.policy.before_optimizer_step(self.step, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for opt in trainer.optimizers:
            self.policy.after_optimizer_step(self.step, opt)
        trained = self.policy.updated_masks(self.step, self._total(trainer)) or {}
        masks = pl_module.masks
        for n, count in self.updates.items():
            count.add_(trained[n].to(count.device) if n in trained else masks[n])

    def on_validation_start(self, trainer, pl_module):
        self.policy.before_eval()

    def on_validation_end(self, trainer, pl_module):
        self.policy.after_eval()

    def report(self) -> dict:
        if self.cost is None or self.updates is None:
            return {}
        # the final active weights: the masks' True entries (IEE and RigL end with a fixed mask)
        masks = self.policy.masks
        received = sum(int((c * masks[n].to(c.device)).sum()) for n, c in self.updates.items())
        active = sum(int(masks[n].sum()) for n in self.updates)
        grown = self.policy.grown_entries()
        turnover = {} if grown is None else {"grown_per_active": grown / max(active, 1)}
        return {"train": {"flops_ratio": self.cost.ratio, "active_updates": received / max(active, 1),
                          **turnover, **self.policy.report()}}

    def on_train_end(self, trainer, pl_module):
        if self.rank_checks:
            log.info("regrowth: masks identical on all %d ranks after each of %d structural updates",
                     trainer.world_size, self.rank_checks)

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "rank_checks": self.rank_checks,
                "cost": None if self.cost is None else self.cost.state_dict(),
                "updates": None if self.updates is None else {n: v.cpu() for n, v in self.updates.items()}}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        self.rank_checks = int(state["rank_checks"])
        if state.get("cost") is not None:
            self._resumed = {"cost": state["cost"], "updates": state["updates"]}

    @staticmethod
    def _total(trainer) -> int:
        return max(int(trainer.estimated_stepping_batches), 1)

    def _check_ranks(self, pl_module) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        crc = decisions_digest(pl_module.masks, self.policy.decisions())
        both = torch.tensor([crc, -crc], dtype=torch.int64, device=pl_module.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # max == min on every rank iff all digests agree
        if int(both[0]) != -int(both[1]):
            raise RuntimeError(f"regrowth: mask decisions differ across ranks at step {self.step}")
        self.rank_checks += 1
