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
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch

from prune_lab import quiet
from prune_lab.errors import PruneLabError
from prune_lab.sparsity import calibration_batches, exact_counts, masks_from_counts, recalibrate_bn
from prune_lab.cpu import cpu_kind  # a search's fitness numbers differ between CPU kinds
from prune_lab.sparsity.stacked import StackingUnsupported, stack_network

log = logging.getLogger("prune_lab")


class AllocationFitness:
    """Top-1 of the dense model pruned to an allocation, after BN re-estimation on the calibration set.

    `many(allocations)` scores `stack` candidates per pass: they are stacked along the channel
    axis of one wider network (`prune_lab.sparsity.stacked`: every candidate is one group of a
    grouped convolution), so a generation costs len/stack passes instead of len. `stack=1`
    is one candidate at a time through the same code. The BN re-estimation noise is seeded with
    `seed` for every pass, so every candidate sees the same noise (common random numbers) and a
    candidate's fitness does not depend on which others share its pass. A network the stacking
    cannot represent is scored one at a time on a plain copy.

    Args:
        stack: candidates per pass (1: one by one; on CPU, oneDNN's grouped convolutions and the
            larger activations made stacking slower per candidate in our measurements, on a GPU
            it removes the per-candidate kernel launches).
        channels_last: run the passes in NHWC (oneDNN's fast layout on CPU).
        eval_batch_size: batch of the eval-mode top-1 pass (BN frozen there, so the batching does
            not change the result); None: the calibration batches as given.
    No autograd anywhere; each layer's |w| ranks are computed once.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], batches, noise_std: float = 1e-6,
                 bn_momentum: float | None = None, seed: int = 0, stack: int = 1, channels_last: bool = True,
                 eval_batch_size: int | None = None):
        if isinstance(stack, bool) or int(stack) < 1:
            raise PruneLabError(f"search stack={stack} must be a positive integer (candidates per pass)")
        self.base = copy.deepcopy(model).eval()
        params = dict(self.base.named_parameters())
        self.names = list(names)
        self.dense = {n: params[n].detach().clone() for n in self.names}
        self.rank = {n: _magnitude_rank(w) for n, w in self.dense.items()}
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = [(self._layout(x), y) for x, y in batches]
        self.eval_batches = self.rebatch(self.batches, eval_batch_size)
        self.noise_std, self.bn_momentum, self.seed, self.stack = noise_std, bn_momentum, seed, int(stack)
        self._networks: dict[int, torch.nn.Module] = {}

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.layout) if x.dim() == 4 else x

    def rebatch(self, batches, batch_size: int | None):
        """`batches` in the fitness's layout, re-cut to `batch_size` (None: as given)."""
        batches = [(self._layout(x), y) for x, y in batches]
        if not batch_size:
            return batches
        xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        return [(self._layout(x), y) for x, y in zip(xs.split(int(batch_size)), ys.split(int(batch_size)))]

    def _network(self, count: int) -> torch.nn.Module:
        if count not in self._networks:
            try:
                net = stack_network(self.base, count)
                if count > 1 and not _stack_matches(self.base, net, count, self.batches[0][0][:4]):
                    raise StackingUnsupported("stacked outputs differ from the network's")
            except StackingUnsupported as e:
                if count > 1:
                    log.info("search: candidates scored one at a time (%s)", e)
                    self.stack = 1
                    return self._network(1)
                net = copy.deepcopy(self.base)
            self._networks[count] = net.to(memory_format=self.layout)
        return self._networks[count]

    @torch.no_grad()
    def _pass(self, allocations: list[dict[str, int]], eval_batches) -> list[float]:
        with quiet.working():  # a fitness pass is a batch of work: latency measurements elsewhere wait for it
            return self._score(allocations, eval_batches)

    def _score(self, allocations: list[dict[str, int]], eval_batches) -> list[float]:
        net = self._network(len(allocations))
        count = len(allocations)
        params = dict(net.named_parameters())
        for n in self.names:
            kept = self.rank[n].unsqueeze(0) >= torch.tensor([int(a[n]) for a in allocations], device=self.rank[n].device
                                                              ).view(-1, *[1] * self.rank[n].dim())
            params[n].copy_(torch.where(kept, self.dense[n].unsqueeze(0), 0.0).reshape(params[n].shape))
        recalibrate_bn(net, self.batches, self.noise_std, self.bn_momentum, self.seed)
        net.eval()
        correct, total = torch.zeros(count, dtype=torch.long), 0
        for x, y in eval_batches:
            logits = net(x).view(len(y), count, -1)
            correct += (logits.argmax(2) == y.unsqueeze(1)).sum(0).cpu()
            total += len(y)
        return [int(c) / max(total, 1) for c in correct]

    def many(self, allocations: list[dict[str, int]], eval_batches=None) -> list[float]:
        """Fitness of each allocation; `eval_batches` (default: the calibration set) are where top-1 is measured."""
        eval_batches = self.eval_batches if eval_batches is None else eval_batches
        if self.stack > 1 and len(allocations) > 1:
            self._network(min(self.stack, len(allocations)))  # falls back to stack=1 if stacking cannot work
        out: list[float] = []
        for i in range(0, len(allocations), self.stack):
            out += self._pass(allocations[i:i + self.stack], eval_batches)
        return out

    def __call__(self, pruned: dict[str, int]) -> float:
        return self.many([pruned])[0]


def _magnitude_rank(w: torch.Tensor) -> torch.Tensor:
    """Each weight's position in the stable ascending |w| order (pruning k weights keeps rank >= k)."""
    order = torch.sort(w.abs().flatten(), stable=True).indices
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=w.device)).view_as(w)


@torch.no_grad()
def _stack_matches(model: torch.nn.Module, stacked: torch.nn.Module, count: int, x: torch.Tensor) -> bool:
    """Every candidate slice of the stacked network (dense weights, eval mode) reproduces the model."""
    want = model.eval()(x)
    got = stacked.eval()(x).view(len(x), count, -1)
    return all(torch.allclose(got[:, p], want, rtol=1e-4, atol=1e-5) for p in range(count))


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
        stack, channels_last, eval_batch_size: how candidates are scored (see `AllocationFitness`).
        val_samples: validation samples on which the searched and the uniform allocation are also
            scored (BN re-estimated on the calibration set as in the search), to show whether the
            search generalises beyond the images it fitted (None: the whole validation split; 0: skip).
        cache_dir: where searched allocations are kept, keyed by a hash of everything the search's
            result depends on (`search_key`): the model's weights and buffers, the calibration
            batches, the searcher's and the fitness's settings, torch version, device, CPU ISA and
            thread count. Ablations that change only what happens after the search (UniPTS's
            kd=..., dst=false) then reuse one search instead of repeating it; the search draws
            from its own generators only, so a run that reads the cache equals one that searched.
            None: no cache. Not used under DDP (every rank searches its own shard).
    """

    def __init__(self, budget: float, searcher=None, enabled: bool = True, samples: int | None = None,
                 batch_size: int | None = None, noise_std: float = 1e-6, bn_momentum: float | None = None,
                 seed: int = 0, stack: int = 1, channels_last: bool = True, eval_batch_size: int | None = 1024,
                 val_samples: int | None = None, cache_dir: str | None = None):
        if not isinstance(enabled, bool):
            raise PruneLabError(f"method.search={enabled!r} is not a boolean; choose one of: true, false")
        if enabled and searcher is None:
            raise PruneLabError("method.search=true needs a searcher (e.g. prune_lab.methods.unipts.ReducingRegrowingGA)")
        for name, value in (("samples", samples), ("batch_size", batch_size), ("stack", stack),
                            ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise PruneLabError(f"search {name}={value} must be a positive integer or null")
        if val_samples is not None and (isinstance(val_samples, bool) or int(val_samples) < 0):
            raise PruneLabError(f"search val_samples={val_samples} must be an integer >= 0 or null (all)")
        self.budget, self.searcher, self.enabled = float(budget), searcher, enabled
        self.samples, self.batch_size = samples, batch_size
        self.noise_std, self.bn_momentum, self.seed = float(noise_std), bn_momentum, int(seed)
        self.stack, self.channels_last, self.eval_batch_size = int(stack or 1), bool(channels_last), eval_batch_size
        self.val_samples = val_samples
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.done = False
        self.record: dict = {}

    def state_dict(self):
        # the record travels with the checkpoint, so a resumed run's results.json has its search too
        return {"done": self.done, "wall_s": self.record.get("wall_s"), "record": self.record}

    def load_state_dict(self, state):
        self.done = bool(state["done"])
        self.record = dict(state.get("record") or {})

    def _batches(self, trainer, device):
        loader = trainer.datamodule.train_dataloader()
        batches = calibration_batches(loader, self.samples, device)
        if self.batch_size:  # re-batch for the fitness passes (larger batches: fewer Python round trips)
            xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
            batches = list(zip(xs.split(self.batch_size), ys.split(self.batch_size)))
        return batches

    def on_fit_start(self, trainer, pl_module):
        if self.done:  # resumed: the masks came with the checkpoint
            saved = Path(trainer.default_root_dir) / "search.json"
            if not self.record and saved.is_file():  # a checkpoint written before the record travelled with it
                self.record = json.loads(saved.read_text())
            return
        t0 = time.time()
        masks, model = pl_module.masks, pl_module.model
        params = dict(model.named_parameters())
        numel = {n: params[n].numel() for n in masks.prunable}
        fitness = AllocationFitness(model, list(numel), self._batches(trainer, pl_module.device),
                                    self.noise_std, self.bn_momentum, self.seed, self.stack, self.channels_last,
                                    self.eval_batch_size)
        uniform = exact_counts({n: self.budget for n in numel}, numel, round(self.budget * sum(numel.values())))
        if self.enabled:
            best, record = self._cached_search(trainer, pl_module.model, numel, fitness, t0)
            t_search = record["search_wall_s"]
        else:
            best, record = uniform, {"searcher": None}
            t_search = time.time() - t0
        calib = fitness.many([best, uniform])
        record.update({"budget": self.budget, "enabled": self.enabled, "search_wall_s": t_search,
                       "best_fitness": record.get("best_fitness", calib[0]), "uniform_fitness": calib[1],
                       "calibration_samples": sum(len(y) for _, y in fitness.batches),
                       "calibration": {"searched": calib[0], "uniform": calib[1]}})
        val = self._val_batches(trainer, pl_module.device, fitness)
        if val:
            held_out = fitness.many([best, uniform], val)
            record["validation"] = {"searched": held_out[0], "uniform": held_out[1],
                                    "samples": sum(len(y) for _, y in val)}
        record["layers"] = [{"name": n, "numel": numel[n], "pruned": int(best[n]), "sparsity": best[n] / numel[n],
                             "uniform_sparsity": uniform[n] / numel[n]} for n in numel]
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
        held_out = record.get("validation", {})
        log.info("layer-sparsity search: calibration top-1 %.4f (uniform %.4f), validation %s (uniform %s), "
                 "%d evaluations, %.1f s", record["best_fitness"], record["uniform_fitness"],
                 held_out.get("searched"), held_out.get("uniform"), record.get("evaluations", 1), record["wall_s"])

    def _val_batches(self, trainer, device, fitness):
        if self.val_samples == 0 or getattr(trainer.datamodule, "val_set", None) is None:
            return []
        batches = calibration_batches(trainer.datamodule.val_dataloader(), self.val_samples, device)
        return fitness.rebatch(batches, self.eval_batch_size)

    def report(self) -> dict:
        """results.json["search"]: the allocation's accuracies without the per-generation history."""
        keep = ("enabled", "budget", "evaluations", "search_wall_s", "wall_s", "calibration_samples", "calibration",
                "validation", "population", "generations", "cache")
        return {"search": {k: self.record[k] for k in keep if k in self.record}} if self.record else {}

    def _cached_search(self, trainer, model, numel, fitness, t0):
        """The searcher's (best allocation, record), from the cache when an identical search ran before.
        `record["search_wall_s"]` is the search's own time (the original run's on a hit)."""
        if self.cache_dir is None or trainer.world_size > 1:
            best, record = self._run_searcher(numel, fitness)
            return best, {**record, "search_wall_s": time.time() - t0}
        key = search_key(model, fitness.batches, self._settings(numel, fitness))
        path = self.cache_dir / f"{key}.json"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # a run that needs the search another process is running waits for it instead of repeating it
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                hit = json.loads(path.read_text())
                record = {**hit["record"], "cache": {"hit": True, "key": key, "from": hit["run"]}}
                log.info("layer-sparsity search: reusing the search of %s (cache %s)", hit["run"], path)
                return {n: int(v) for n, v in hit["best"].items()}, record
            best, record = self._run_searcher(numel, fitness)
            record.update(search_wall_s=time.time() - t0, cache={"hit": False, "key": key})
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"best": best, "record": record, "run": str(trainer.default_root_dir)}))
            tmp.replace(path)
        return best, record

    def _settings(self, numel, fitness) -> dict:
        searcher = self.searcher
        return {"searcher": f"{type(searcher).__module__}.{type(searcher).__qualname__}",
                "hparams": getattr(searcher, "hparams", dict)(), "numel": numel, "budget": self.budget,
                "noise_std": self.noise_std, "bn_momentum": self.bn_momentum, "seed": self.seed,
                "stack": self.stack, "channels_last": self.channels_last, "eval_batch_size": self.eval_batch_size,
                "torch": torch.__version__, "device": str(fitness.dense[next(iter(numel))].device.type),
                "cpu_kind": cpu_kind(), "threads": torch.get_num_threads()}

    def _run_searcher(self, numel, fitness):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        planned = getattr(self.searcher, "evaluations_planned", lambda: None)()
        with Progress(TextColumn("search"), BarColumn(), TextColumn("{task.completed}/{task.total} candidates"),
                      TextColumn("best {task.fields[best]:.4f}"), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("search", total=planned, best=0.0)

            def evaluate(allocations):
                fits = []
                for i in range(0, len(allocations), fitness.stack):
                    chunk = fitness.many(allocations[i:i + fitness.stack])
                    fits += chunk
                    bar.update(task, advance=len(chunk), best=max(fits + [bar.tasks[0].fields["best"]]))
                return fits

            return self.searcher.search(numel, self.budget, evaluate)


def search_key(model: torch.nn.Module, batches, settings: dict) -> str:
    """A hash of the model's state (every parameter and buffer: names, dtypes, shapes, bytes), the
    batches and `settings` (JSON). Written by hand: hashing tensors is a few lines of hashlib."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = [(f"state.{n}", t) for n, t in model.state_dict().items()]
    tensors += [(f"batch{i}.{j}", t) for i, pair in enumerate(batches) for j, t in enumerate(pair)]
    for name, t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


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
