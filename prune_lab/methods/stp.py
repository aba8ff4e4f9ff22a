"""STP — Enhanced Sparsification via Stimulative Training (Tang et al., ECCV 2024).

Structured pruning without fine-tuning (METHODS.md §1). The full network trains with
cross-entropy while sampled subnets (per-stage depth × width, nested slices of it) learn to match
its outputs (KL, "stimulative training"); dropped weights are never penalised or zeroed. At the
end a KD-guided evolutionary search picks the subnet under the FLOPs budget whose outputs are
closest to the full network's; it is extracted (masked here, physically shrunk at export), its BN
statistics re-estimated, and evaluated as is.

Documented choices (not published in code, exposed as knobs): the evolutionary search
(`search_*`), subnet mutating expansion (`expansion`: sampled region slides from large subnets to
the budget, elites re-selected by KD fitness every epoch), BN running statistics frozen during
subnet passes (the released ST code re-estimates them each epoch instead; freezing keeps the full
network's statistics clean at no cost), and starting from the dense reference (`needs_dense`).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torch_pruning as tp

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.calibration import frozen_bn_stats, recalibrate_bn
from prune_lab.sparsity.structure import solve_flops_target
from prune_lab.sparsity.subnet import DEFAULT_WIDTHS, Arch, SubnetSpace, find_stages

log = logging.getLogger("prune_lab")


def subnet_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, batch mean, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t


class ArchPool:
    """Random architectures binned by FLOPs reduction, with a bin edge at the budget; the smallest
    and largest subnet always included."""

    def __init__(self, space: SubnetSpace, budget: float, size: int, bins: int, rng: random.Random):
        archs = {space.smallest(), space.largest()} | {space.random(rng) for _ in range(size)}
        self.reduction = {a: space.reduction(a) for a in archs}
        lo, hi = min(self.reduction.values()), max(self.reduction.values())
        half = max(1, bins // 2)
        edges = sorted({lo + (budget - lo) * i / half for i in range(half + 1)} |
                       {budget + (hi - budget) * i / half for i in range(half + 1)})
        self.bins = [[a for a, r in self.reduction.items() if e0 <= r < e1 or (e1 == edges[-1] and r == e1)]
                     for e0, e1 in zip(edges[:-1], edges[1:])]
        self.bins = [sorted(b, key=lambda a: a.genes()) for b in self.bins if b]

    def sample(self, rng: random.Random, lo: float = -1.0, hi: float = 2.0) -> Arch:
        """A bin uniformly, then an architecture in it; restricted to reductions in [lo, hi]."""
        bins = [[a for a in b if lo <= self.reduction[a] <= hi] for b in self.bins]
        bins = [b for b in bins if b] or self.bins
        return rng.choice(rng.choice(bins))


class StimulativeTraining(L.Callback):
    def __init__(self, budget: float, num_subnets: int = 2, temperature: float = 1.0, kd_weight: float = 1.0,
                 distill: bool = True, warmup_epochs: int = 0, widths=DEFAULT_WIDTHS, pool_size: int = 2000,
                 bins: int = 8, expansion: bool = True, expansion_end: float = 0.75, expansion_window: float = 0.15,
                 elites: int = 5, search: bool = True, search_population: int = 50, search_generations: int = 20,
                 search_parents: int = 10, mutation_prob: float = 0.1, search_images: int = 256,
                 bn_images: int = 2000, tolerance: float = 0.02, seed: int = 0):
        if not 0.0 < budget < 1.0:
            raise PruneLabError(f"budget={budget} is outside (0, 1) for stp")
        self.budget, self.num_subnets, self.temperature, self.kd_weight = float(budget), num_subnets, temperature, kd_weight
        self.distill, self.warmup_epochs, self.widths = distill, warmup_epochs, tuple(widths)
        self.pool_size, self.bins = pool_size, bins
        self.expansion, self.expansion_end, self.expansion_window, self.num_elites = \
            expansion, expansion_end, expansion_window, elites
        self.search, self.search_population, self.search_generations = search, search_population, search_generations
        self.search_parents, self.mutation_prob, self.search_images = search_parents, mutation_prob, search_images
        self.bn_images, self.tolerance, self.seed = bn_images, tolerance, seed
        self.ordered = False
        self.channel_scores: list[torch.Tensor] = []
        self.elites: list[Arch] = []
        self.summary: dict = {}

    # -- set-up -----------------------------------------------------------------------
    def check(self, model, example_input) -> None:
        """Called by the pipeline before training: a clear error for models without stages."""
        find_stages(model)

    def on_fit_start(self, trainer, pl_module):
        example = pl_module.example_input
        self.space = SubnetSpace(pl_module.model, example, ignored=[pl_module.classifier], widths=self.widths)
        self.pool = ArchPool(self.space, self.budget, self.pool_size, self.bins, random.Random(self.seed))
        if self.ordered:  # resumed: the nesting order comes from the checkpoint
            self.space.order(self.channel_scores)
        if not self.elites:
            self.elites = [self.space.largest()]
        if self.distill:
            pl_module.loss_terms.append(self._subnet_loss)

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.ordered and trainer.current_epoch >= self.warmup_epochs:
            self._order(pl_module)

    def _order(self, pl_module):
        scorer = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        self.channel_scores = self.space.groups.scores(scorer)
        self.space.order(self.channel_scores)
        self.ordered = True

    # -- stimulative training -----------------------------------------------------------
    def _region(self, trainer) -> tuple[float, float]:
        """Reductions the sampler draws from now: everything, or with mutating expansion a window
        sliding from the full network (0) to the budget by `expansion_end` of training."""
        if not self.expansion:
            return -1.0, 2.0
        progress = trainer.global_step / max(1, trainer.estimated_stepping_batches)
        centre = self.budget * min(1.0, progress / self.expansion_end)
        return centre - self.expansion_window, centre + self.expansion_window

    def _sample(self, trainer, rng: random.Random) -> Arch:
        lo, hi = self._region(trainer)
        if self.expansion and self.elites and rng.random() < 0.5:
            for _ in range(20):
                arch = self.space.mutate(rng.choice(self.elites), rng, prob=max(self.mutation_prob, 0.2))
                if self.pool.reduction.get(arch, self.space.reduction(arch)) <= hi:
                    return arch
        return self.pool.sample(rng, lo, hi)

    def _subnet_loss(self, pl_module, batch, logits):
        if not self.ordered or not pl_module.training:
            return logits.new_zeros(())
        trainer = pl_module.trainer
        rng = random.Random(f"{self.seed}-{trainer.global_step}")  # identical on every DDP rank
        x, _ = batch
        teacher = logits.detach()
        loss = logits.new_zeros(())
        with frozen_bn_stats(pl_module.model):
            for _ in range(self.num_subnets):
                with self.space.activate(self._sample(trainer, rng)):
                    loss = loss + subnet_kl(pl_module.model(x), teacher, self.temperature)
        pl_module.log("train/subnet_kl", loss, on_step=False, on_epoch=True, sync_dist=True)
        return self.kd_weight * loss

    def on_train_epoch_end(self, trainer, pl_module):
        if self.expansion and self.ordered:
            rng = random.Random(f"{self.seed}-elites-{trainer.current_epoch}")
            lo, hi = self._region(trainer)
            candidates = set(self.elites) | {self.space.mutate(rng.choice(self.elites), rng, 0.3) for _ in range(10)}
            candidates |= {self.pool.sample(rng, lo, hi) for _ in range(10)}
            inside = [a for a in candidates if lo <= self.space.reduction(a) <= hi] or list(candidates)
            fitness = self._fitness(pl_module, trainer)
            self.elites = sorted(inside, key=fitness)[:self.num_elites]

    # -- KD-guided search ---------------------------------------------------------------
    def _held_out(self, trainer) -> torch.Tensor:
        val = trainer.datamodule.val_set
        n = min(self.search_images, len(val))
        return torch.stack([val[i][0] for i in range(n)])

    def _fitness(self, pl_module, trainer):
        """KL of a subnet's outputs to the full network's on held-out training images (lower is
        better), BN on batch statistics so every candidate is judged with its own."""
        model = pl_module.model
        x = self._held_out(trainer).to(pl_module.device)
        cache: dict[Arch, float] = {}
        was_training = model.training
        model.train()
        with torch.no_grad(), frozen_bn_stats(model):
            full = model(x)

        def fitness(arch: Arch) -> float:
            if arch not in cache:
                model.train()
                with torch.no_grad(), frozen_bn_stats(model), self.space.activate(arch):
                    cache[arch] = float(subnet_kl(model(x), full))
                model.train(was_training)
            return cache[arch]
        return fitness

    def _feasible(self, arch: Arch) -> bool:
        r = self.space.reduction(arch)
        return self.budget <= r <= self.budget + self.tolerance

    def evolve(self, fitness, rng: random.Random) -> tuple[Arch, list[float]]:
        """Evolutionary search under the FLOPs budget: never returns an architecture whose FLOPs
        reduction is below the budget (or more than `tolerance` above it)."""
        population = {a for a in self.elites if self._feasible(a)}
        population |= {a for a in self.pool.reduction if self._feasible(a)}
        for _ in range(20000):
            if len(population) >= self.search_population:
                break
            arch = self.space.random(rng)
            if self._feasible(arch):
                population.add(arch)
        if not population:
            raise PruneLabError(f"stp found no subnet with a FLOPs reduction in [{self.budget}, "
                                f"{self.budget + self.tolerance}]; give finer method.widths")
        population = sorted(population, key=fitness)[:self.search_population]
        history = [fitness(population[0])]
        for _ in range(self.search_generations):
            parents = population[:self.search_parents]
            children, tries = set(), 0
            while len(children) < self.search_population - len(parents) and tries < 50 * self.search_population:
                tries += 1
                a, b = rng.choice(parents), rng.choice(parents)
                child = self.space.mutate(self.space.crossover(a, b, rng), rng, self.mutation_prob)
                if child not in parents and self._feasible(child):
                    children.add(child)
            population = sorted(set(parents) | children, key=fitness)[:self.search_population]
            history.append(fitness(population[0]))
        return population[0], history

    def _uniform_width(self) -> dict[str, torch.Tensor]:
        """The ablation without search: full depth and the same fraction of every channel group,
        solved for the budget (not limited to the width grid), cut in the same importance order."""
        return solve_flops_target(self.space.groups, self.space.flops, self.channel_scores, self.budget,
                                  "uniform", tolerance=self.tolerance)

    # -- extraction -----------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module):
        if not self.ordered:
            self._order(pl_module)
        t0 = time.time()
        fitness = self._fitness(pl_module, trainer)
        history: list[float] = []
        if self.search:
            arch, history = self.evolve(fitness, random.Random(f"{self.seed}-search"))
            plan, skipped, described = self.space.channel_plan(arch), self.space.skipped_blocks(arch), arch.as_dict()
            kd = fitness(arch)
        else:
            plan, skipped, described, kd = self._uniform_width(), [], "uniform width, full depth", float("nan")
        search_s = time.time() - t0
        self.summary = {"arch": described, "estimated_flops_reduction":
                        1 - self.space.flops.macs(plan, skip=skipped) / self.space.dense_macs,
                        "kd_fitness": kd, "search_s": search_s, "fitness_history": history,
                        "kept_dropped_magnitude": self.magnitude_ratio(pl_module, plan),
                        "distill": self.distill, "search": self.search, "expansion": self.expansion}
        self._extract(trainer, pl_module, plan, skipped)
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "search.json").write_text(json.dumps(self.summary, indent=2))
        log.info("stp: subnet %s, FLOPs reduction %.3f, KD fitness %.4f, search %.1f s", described,
                 self.summary["estimated_flops_reduction"], kd, search_s)

    @torch.no_grad()
    def magnitude_ratio(self, pl_module, plan: dict[str, torch.Tensor]) -> dict:
        """Mean |w| of the filters the subnet keeps vs those it drops (width only): the 'relative
        sparsity effect' — large when training made dropped weights relatively small."""
        modules = dict(pl_module.model.named_modules())
        kept, dropped = [], []
        for root, members in zip(self.space.groups.roots, self.space.groups.members):
            keep = plan[root]
            for name, kind, root_idxs in members:
                m = modules[name]
                if kind != "out" or not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    continue
                w = m.weight.detach().abs().flatten(1).mean(1)
                kept.append(w[keep[root_idxs]])
                dropped.append(w[~keep[root_idxs]])
        k, d = torch.cat(kept), torch.cat(dropped)
        km, dm = float(k.mean()), (float(d.mean()) if d.numel() else float("nan"))
        return {"kept_mean_abs": km, "dropped_mean_abs": dm, "ratio": km / dm if d.numel() else float("nan")}

    def _extract(self, trainer, pl_module, plan: dict[str, torch.Tensor], skipped: list[str]) -> None:
        """Masks that make the full model compute the subnet; the exporter removes them for real."""
        masks, model = pl_module.masks, pl_module.model
        masks.reset()
        for name, keep in self.space.groups.param_masks(plan).items():
            masks.set(name, keep)
        for block in skipped:  # a zeroed residual branch adds nothing: the block is an identity
            for pname, p in model.get_submodule(block).named_parameters():
                masks.set(f"{block}.{pname}", torch.zeros_like(p, dtype=torch.bool))
        masks.set_channel_plan(plan)
        masks.set_removed(skipped)
        masks.apply()
        with torch.no_grad():
            recalibrate_bn(model, self._train_batches(trainer, pl_module.device), noise_std=0.0)
        model.eval()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():  # one set of statistics for every rank
            for buf in model.buffers():
                dist.broadcast(buf, 0)

    def _train_batches(self, trainer, device):
        """The first `bn_images` training images, batch by batch."""
        seen = 0
        for x, y in trainer.datamodule.train_dataloader():
            if seen >= self.bn_images:
                return
            seen += len(x)
            yield x.to(device), y

    def report(self) -> dict:
        return {"stp": self.summary}

    def state_dict(self):
        return {"ordered": self.ordered, "channel_scores": self.channel_scores,
                "elites": [a.as_dict() for a in self.elites]}

    def load_state_dict(self, state):
        self.ordered = bool(state["ordered"])
        self.channel_scores = list(state["channel_scores"])
        self.elites = [Arch(tuple(a["depths"]), tuple(a["widths"])) for a in state["elites"]]
