"""Measurements of IEE's grow step: `Turnover`, kept by every IEE run (results.json
`train.turnover`), and `GrowLoss`, a callback for tests and scripts/probes/iee_grow_probe.py."""
from __future__ import annotations

import lightning as L
import torch


class GrowLoss(L.Callback):
    """At each grow of an IEE policy, the mean training loss over fixed training batches with the
    grown units at the values the policy gave them, and with the same units at zero (model in eval
    mode under no_grad, so nothing the run uses moves). `rows`: (step, loss with the values, loss
    at zero) per grow; results.json `train.grow_loss`.

    `policy` and `batches` are found at fit start when not given: the run's IEE policy (weight
    units) and the first `n_batches` batches of `batch_size` training images, drawn with their own
    generator (the run's random state is forked around the draw, so training is unchanged)."""

    def __init__(self, policy=None, batches=None, n_batches: int = 4, batch_size: int = 256, seed: int = 0):
        self.policy, self.batches, self.rows, self.prev = policy, batches, [], None
        self.n_batches, self.batch_size, self.seed = int(n_batches), int(batch_size), int(seed)

    def on_fit_start(self, trainer, pl_module):
        if self.policy is None:
            from prune_lab.callbacks import Regrowth

            self.policy = next(cb.policy for cb in trainer.callbacks if isinstance(cb, Regrowth))
        if self.batches is None and getattr(trainer, "datamodule", None) is None:
            self.batches = []  # fitted without a datamodule: nothing to draw from, no record
        if self.batches is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                loader = torch.utils.data.DataLoader(trainer.datamodule.train_set, batch_size=self.batch_size,
                                                     shuffle=True, generator=torch.Generator().manual_seed(self.seed))
                self.batches = [b for _, b in zip(range(self.n_batches), loader)]
        device = next(pl_module.model.parameters()).device
        self.batches = [(x.to(device), y.to(device)) for x, y in self.batches]
        if self.prev is not None:  # resumed
            self.prev = {k: v.to(device) for k, v in self.prev.items()}

    def _loss(self, model) -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = sum(torch.nn.functional.cross_entropy(model(x), y).item() for x, y in self.batches)
        model.train(was_training)
        return loss / len(self.batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.batches:
            return
        p, t = self.policy, trainer.global_step
        if self.prev is not None and t > 0 and t % p.cycle == 0 and t // p.cycle <= p.n:  # a grow just happened
            params = dict(pl_module.model.named_parameters())
            grown = {n: p.keep[n] & ~self.prev[n] for n in p.keep}
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
        if (t + 1) % p.cycle == 0 and p.keep is not None:  # the step before a grow: Θ_K as the grow finds it
            self.prev = {k: v.clone() for k, v in p.keep.items()}

    def report(self) -> dict:
        if not self.rows:
            return {}
        increase = [a - b for _, a, b in self.rows]
        return {"train": {"grow_loss": {"mean_increase_vs_zero": sum(increase) / len(increase),
                                        "per_grow": [{"step": t, "loss": a, "loss_at_zero": b} for t, a, b in self.rows]}}}

    def state_dict(self):
        return {"rows": [list(r) for r in self.rows],
                "prev": None if self.prev is None else {k: v.cpu() for k, v in self.prev.items()}}

    def load_state_dict(self, state):
        self.rows = [tuple(r) for r in state.get("rows", [])]
        self.prev = state.get("prev")


class Turnover:
    """Of the units each grow activates: how many were pruned in that very cycle (returning to
    the active part), pruned in an earlier cycle, or never active before. A grow that mostly
    returns what its cycle pruned leaves the structure as it was and only costs steps."""

    FIELDS = ("cycle", "grown", "returning", "earlier", "never_active")

    def __init__(self):
        self.ever: dict[str, torch.Tensor] | None = None  # units active at some point so far
        self.pruned: dict[str, torch.Tensor] = {}         # units pruned this cycle
        self.rows: list[list[int]] = []

    def start(self, keep: dict[str, torch.Tensor]) -> None:
        if self.ever is None:
            self.ever = {layer: k.clone() for layer, k in keep.items()}

    def grown(self, cycle: int, before: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]) -> None:
        self.start(before)  # a checkpoint from before this record existed
        counts = [0, 0, 0, 0]
        for layer, k in keep.items():
            grown = k & ~before[layer]
            returning = grown & self.pruned.get(layer, torch.zeros_like(grown))
            never = grown & ~self.ever[layer]
            counts = [a + int(b.sum()) for a, b in zip(counts, (grown, returning, grown & ~returning & ~never, never))]
            self.ever[layer] = self.ever[layer] | k
        self.rows.append([cycle, *counts])
        self.pruned = {}

    def report(self) -> dict:
        grown = sum(row[1] for row in self.rows)
        if not grown:
            return {}
        share = {key: sum(row[i] for row in self.rows) / grown for i, key in enumerate(self.FIELDS[2:], start=2)}
        return {"turnover": {**share, "grown": grown, "per_grow": [dict(zip(self.FIELDS, row)) for row in self.rows]}}

    def to(self, device) -> None:
        if self.ever is not None:
            self.ever = {n: v.to(device) for n, v in self.ever.items()}
        self.pruned = {n: v.to(device) for n, v in self.pruned.items()}

    def state_dict(self) -> dict:
        return {"ever": self.ever, "pruned": self.pruned, "rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.ever, self.pruned = state.get("ever"), state.get("pruned") or {}
        self.rows = [list(r) for r in state.get("rows", [])]
