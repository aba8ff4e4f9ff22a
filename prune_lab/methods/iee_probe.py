"""A measuring callback for IEE's grow step (tests and scripts/iee_grow_probe.py share it)."""
from __future__ import annotations

import lightning as L
import torch


class GrowLoss(L.Callback):
    """At each grow of an IEE policy, the mean training loss over fixed batches with the grown units
    at the values the policy gave them, and with the same units at zero (model in eval mode, so
    nothing moves). `rows`: (step, loss with the values, loss at zero) per grow."""

    def __init__(self, policy, batches):
        self.policy, self.batches, self.rows, self.prev = policy, batches, [], None

    def _loss(self, model) -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(torch.nn.functional.cross_entropy(model(x), y).item() for x, y in self.batches)
        model.train()
        return loss / len(self.batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        p, t = self.policy, trainer.global_step
        keep = None if p.keep is None else {k: v.clone() for k, v in p.keep.items()}
        if self.prev is not None and t > 0 and t % p.cycle == 0 and t // p.cycle <= p.n:  # a grow just happened
            params = dict(pl_module.model.named_parameters())
            grown = {n: keep[n] & ~self.prev[n] for n in keep}
            values = {n: params[n].detach().clone() for n in grown}
            with_values = self._loss(pl_module.model)
            with torch.no_grad():
                for n, g in grown.items():
                    params[n].masked_fill_(g, 0.0)
            at_zero = self._loss(pl_module.model)
            with torch.no_grad():
                for n, v in values.items():
                    params[n].copy_(v)
            self.rows.append((t, with_values, at_zero))
        self.prev = keep
