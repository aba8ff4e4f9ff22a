"""The regrowth capability: move units between the active and the pruned set during training.

What moves and when is a policy (`prune_lab.sparsity.regrowth.RegrowthPolicy`): `DropGrow` for
RigL and SET, IEE's phase machine (`prune_lab.methods.iee.IEE`) given through config
`_target_`. This callback only maps Lightning's hooks onto the policy's, keeps the policy's
state in checkpoints, and under DDP checks after every structural change that all ranks hold
the same masks (a diverged rank would silently train a different network).

It moves units; it does not create the initial masks or enforce them between updates: methods
pair it with a `MaskUpdate` (one-shot at step 0), which does both.
"""
from __future__ import annotations

import logging
import zlib

import lightning as L
import torch
import torch.distributed as dist

from prune_lab.errors import PruneLabError
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

    def check_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Called by the pipeline before training: the policy's own `check_schedule`, if any."""
        if hasattr(self.policy, "check_schedule"):
            self.policy.check_schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    def on_fit_start(self, trainer, pl_module):
        if trainer.accumulate_grad_batches != 1:
            raise PruneLabError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported "
                                "by regrowth methods; use 1")
        self.policy.bind(pl_module.model, pl_module.masks, pl_module.example_input, pl_module.classifier)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step
        if self.policy.before_forward(self.step, self._total(trainer), trainer.optimizers):
            self._check_ranks(pl_module)

    def on_after_backward(self, trainer, pl_module):
        if self.policy.after_backward(self.step, self._total(trainer), trainer.optimizers):
            self._check_ranks(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.policy.before_optimizer_step(self.step, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for opt in trainer.optimizers:
            self.policy.after_optimizer_step(self.step, opt)

    def on_train_end(self, trainer, pl_module):
        if self.rank_checks:
            log.info("regrowth: masks identical on all %d ranks after each of %d structural updates",
                     trainer.world_size, self.rank_checks)

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "rank_checks": self.rank_checks}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        self.rank_checks = int(state["rank_checks"])

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
