"""The search capability: choose per-layer sparsities before training, by fitness on calibration data.

`LayerSparsitySearch` is generic: it owns the fitness of an allocation ({layer: pruned count})
— one-shot per-layer magnitude pruning of the dense weights, BN re-estimation on the
calibration set, then top-1 on it (METHODS.md §2) — and a searcher object decides which
allocations to try (UniPTS's GA: `prune_lab.methods.unipts.ReducingRegrowingGA`, given through
config). At fit start it sets the masks of the best allocation in the module's `MaskSet`,
where the training callback (`DynamicSparsity`) finds them, and writes `search.json` and
`search.png` into the run directory. It does not zero the weights: dynamic sparse training keeps
the dense weights underneath its masks, and fixed-mask training applies them itself.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import calibration_batches, exact_counts, masks_from_counts, recalibrate_bn, top1_accuracy

log = logging.getLogger("prune_lab")


class AllocationFitness:
    """Calibration top-1 of the dense model pruned to an allocation, after BN re-estimation.

    Works on one private copy of the model; each layer's |w| order is sorted once, so building a
    candidate is a copy and an index write. No autograd anywhere.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], batches, noise_std: float = 1e-6,
                 bn_momentum: float | None = None, seed: int = 0):
        self.work = copy.deepcopy(model)
        params = dict(self.work.named_parameters())
        self.weights = {n: params[n] for n in names}
        self.dense = {n: w.detach().clone() for n, w in self.weights.items()}
        self.order = {n: torch.sort(w.abs().flatten(), stable=True).indices for n, w in self.dense.items()}
        self.batches, self.noise_std, self.bn_momentum, self.seed = batches, noise_std, bn_momentum, seed

    @torch.no_grad()
    def __call__(self, pruned: dict[str, int]) -> float:
        for n, w in self.weights.items():
            w.copy_(self.dense[n])
            w.view(-1)[self.order[n][:int(pruned[n])]] = 0
        recalibrate_bn(self.work, self.batches, self.noise_std, self.bn_momentum, self.seed)
        return top1_accuracy(self.work, self.batches)

    def many(self, allocations: list[dict[str, int]]) -> list[float]:
        return [self(a) for a in allocations]


class LayerSparsitySearch(L.Callback):
    """Search the layer-wise sparsity at fit start; `enabled=False` uses the uniform allocation.

    Args:
        budget: global fraction of prunable weights removed (exact in every allocation).
        searcher: object with `search(numel, budget, evaluate, on_generation)` (and optionally
            `hparams()`, `evaluations_planned()`); required when `enabled`.
        enabled: False skips the search (the ablation "uniform sparsity instead of the search").
        samples: calibration samples used for fitness (None: the whole calibration train set).
        batch_size: batch size of the fitness passes (None: the data's batch size).
        noise_std, bn_momentum: BN re-estimation (see `recalibrate_bn`).
    """

    def __init__(self, budget: float, searcher=None, enabled: bool = True, samples: int | None = None,
                 batch_size: int | None = None, noise_std: float = 1e-6, bn_momentum: float | None = None,
                 seed: int = 0):
        if not isinstance(enabled, bool):
            raise PruneLabError(f"method.search={enabled!r} is not a boolean; choose one of: true, false")
        if enabled and searcher is None:
            raise PruneLabError("method.search=true needs a searcher (e.g. prune_lab.methods.unipts.ReducingRegrowingGA)")
        for name, value in (("samples", samples), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise PruneLabError(f"search {name}={value} must be a positive integer or null")
        self.budget, self.searcher, self.enabled = float(budget), searcher, enabled
        self.samples, self.batch_size = samples, batch_size
        self.noise_std, self.bn_momentum, self.seed = float(noise_std), bn_momentum, int(seed)
        self.done = False
        self.record: dict = {}

    def state_dict(self):
        return {"done": self.done, "wall_s": self.record.get("wall_s")}

    def load_state_dict(self, state):
        self.done = bool(state["done"])

    def _batches(self, trainer, device):
        loader = trainer.datamodule.train_dataloader()
        batches = calibration_batches(loader, self.samples, device)
        if self.batch_size:  # re-batch for the fitness passes (larger batches: fewer Python round trips)
            xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
            batches = list(zip(xs.split(self.batch_size), ys.split(self.batch_size)))
        return batches

    def on_fit_start(self, trainer, pl_module):
        if self.done:  # resumed: the masks came with the checkpoint
            return
        t0 = time.time()
        masks, model = pl_module.masks, pl_module.model
        params = dict(model.named_parameters())
        numel = {n: params[n].numel() for n in masks.prunable}
        fitness = AllocationFitness(model, list(numel), self._batches(trainer, pl_module.device),
                                    self.noise_std, self.bn_momentum, self.seed)
        uniform = exact_counts({n: self.budget for n in numel}, numel, round(self.budget * sum(numel.values())))
        if self.enabled:
            best, record = self._run_searcher(numel, fitness)
        else:
            best, record = uniform, {"searcher": None}
        record.update({"budget": self.budget, "enabled": self.enabled, "wall_s": time.time() - t0,
                       "best_fitness": record.get("best_fitness", fitness(best)),
                       "uniform_fitness": fitness(uniform) if self.enabled else fitness(best),
                       "calibration_samples": sum(len(y) for _, y in fitness.batches),
                       "layers": [{"name": n, "numel": numel[n], "pruned": int(best[n]),
                                   "sparsity": best[n] / numel[n], "uniform_sparsity": uniform[n] / numel[n]}
                                  for n in numel]})
        record["wall_s"] = time.time() - t0
        scores = {n: params[n].detach().abs() for n in numel}
        for n, keep in masks_from_counts(scores, best).items():
            masks.set(n, keep)
        masks.broadcast(src=0)  # under DDP every rank searched its own shard; rank 0's result holds
        self.record, self.done = record, True
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "search.json").write_text(json.dumps(record, indent=2))
            plot_search(record, out / "search.png")
        log.info("layer-sparsity search: calibration top-1 %.4f (uniform %.4f), %d evaluations, %.1f s",
                 record["best_fitness"], record["uniform_fitness"], record.get("evaluations", 1), record["wall_s"])

    def _run_searcher(self, numel, fitness):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        planned = getattr(self.searcher, "evaluations_planned", lambda: None)()
        with Progress(TextColumn("search"), BarColumn(), TextColumn("{task.completed}/{task.total} candidates"),
                      TextColumn("best {task.fields[best]:.4f}"), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("search", total=planned, best=0.0)

            def evaluate(allocations):
                fits = []
                for a in allocations:
                    fits.append(fitness(a))
                    bar.update(task, advance=1, best=max(fits + [bar.tasks[0].fields["best"]]))
                return fits

            return self.searcher.search(numel, self.budget, evaluate)


def plot_search(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    history = record.get("history") or []
    if history:
        gens = [h["generation"] for h in history]
        ax1.plot(gens, [h["best_so_far"] for h in history], label="best so far")
        ax1.plot(gens, [h["mean"] for h in history], label="population mean")
    ax1.axhline(record["uniform_fitness"], color="grey", ls="--", label="uniform allocation")
    ax1.set(xlabel="generation", ylabel="calibration top-1", title="search fitness")
    ax1.legend(fontsize=8)
    layers = record["layers"]
    x = range(len(layers))
    ax2.bar([i - 0.2 for i in x], [l["sparsity"] for l in layers], width=0.4, label="searched")
    ax2.bar([i + 0.2 for i in x], [l["uniform_sparsity"] for l in layers], width=0.4, label="uniform")
    ax2.set(xlabel="layer (forward order)", ylabel="sparsity", ylim=(0, 1),
            title=f"layer-wise sparsity, global {record['budget']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
