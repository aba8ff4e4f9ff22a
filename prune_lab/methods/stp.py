"""STP — Enhanced Sparsification via Stimulative Training (Tang et al., ECCV 2024).

Structured pruning without fine-tuning (METHODS.md §1). The full network trains with
cross-entropy while sampled subnets (per-stage depth × width, nested slices of it) learn to match
its outputs (KL, "stimulative training"); dropped weights are never penalised or zeroed. Every
step's first subnet lies in the budget's band (the FLOPs-reduction interval the search picks
from), so the budget is trained from step 0; the others follow the subnet mutating expansion
(stp_sampling.py). At the end a KD-guided evolutionary search picks the subnet in the band whose
outputs are closest to the full network's on a stratified held-out slice of the training data
(`val_set`, never the test set); it is extracted (masked here, physically shrunk at export), its BN
statistics re-estimated, and evaluated as is.

`target=latency`: the budget is the fraction of the dense model's latency removed, and a subnet's
cost is the latency reduction a per-layer LatencyTable (prune_lab/sparsity/latency.py, timed on CPU
copies and cached on disk) predicts for it instead of its FLOPs reduction: in the band, the pool,
the expansion window and the search alike. The chosen subnet is then measured as results.json
measures it, and both numbers are recorded; the search does not re-solve on a measured miss.

Documented choices (not published in code, exposed as knobs): the evolutionary search
(`search_*`), subnet mutating expansion (`expansion*`, `elite*`), BN running statistics frozen
during subnet passes (the released ST code re-estimates them each epoch instead; freezing keeps
the full network's statistics clean at no cost), and starting from the dense reference
(`needs_dense`).
"""
from __future__ import annotations

import collections
import copy
import json
import logging
import random
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torch_pruning as tp
from omegaconf import DictConfig, OmegaConf

from prune_lab import quiet
from prune_lab.data.heldout import stratified_slice
from prune_lab.errors import PruneLabError
from prune_lab.methods.stp_budget import check_latency_reachable, latency_record, uniform_width_plan
from prune_lab.methods.stp_sampling import ArchPool, SubnetSampler
from prune_lab.sparsity.calibration import frozen_bn_stats, recalibrate_bn
from prune_lab.sparsity.latency import table_for_run
from prune_lab.sparsity.subnet import DEFAULT_WIDTHS, Arch, SubnetSpace

__all__ = ["ArchPool", "StimulativeTraining", "subnet_kl"]

log = logging.getLogger("prune_lab")


def subnet_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, batch mean, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t


class StimulativeTraining(L.Callback):
    def __init__(self, budget: float, num_subnets: int = 2, temperature: float = 1.0, kd_weight: float = 1.0,
                 distill: bool = True, warmup_epochs: int = 0, widths=DEFAULT_WIDTHS, pool_size: int = 2000,
                 bins: int = 8, expansion: bool = True, expansion_reach: float = 0.3, expansion_window: float = 0.1,
                 elite_band: float = 0.03, elites: int = 5, elite_updates: int = 10, search: bool = True,
                 search_population: int = 50, search_generations: int = 20, search_parents: int = 10,
                 mutation_prob: float = 0.1, search_images: int = 512, bn_images: int = 2000,
                 tolerance: float = 0.02, weight_decay: float | None = None, seed: int = 0,
                 target: str = "flops", latency: dict | None = None, subnet_target: str = "teacher"):
        if not 0.0 < budget < 1.0:
            raise PruneLabError(f"budget={budget} is outside (0, 1) for stp")
        if target not in ("flops", "latency"):
            raise PruneLabError(f"method.target={target} is not one of: flops, latency (for stp)")
        if subnet_target not in ("teacher", "labels"):
            raise PruneLabError(f"method.subnet_target={subnet_target} is not one of: teacher, labels")
        if int(num_subnets) < 1:
            raise PruneLabError(f"method.num_subnets={num_subnets} must be >= 1 (the first is always at the budget)")
        if not 0.0 <= float(expansion_reach) <= 1.0:
            raise PruneLabError(f"method.expansion_reach={expansion_reach} must be a fraction of training in [0, 1]")
        if int(search_images) < 1:
            raise PruneLabError(f"method.search_images={search_images} must be a positive number of held-out images")
        self.budget, self.num_subnets, self.temperature, self.kd_weight = float(budget), int(num_subnets), temperature, kd_weight
        self.distill, self.warmup_epochs, self.widths = distill, warmup_epochs, tuple(widths)
        # what the sampled subnets learn from: the full network's outputs (STP, stimulative training)
        # or the labels (the sandwich rule without KD): the ablation that isolates the distillation
        self.subnet_target = subnet_target
        self.pool_size, self.bins = pool_size, bins
        self.expansion, self.expansion_reach, self.expansion_window = expansion, float(expansion_reach), expansion_window
        self.elite_band, self.num_elites, self.elite_updates = elite_band, elites, elite_updates
        self.search, self.search_population, self.search_generations = search, search_population, search_generations
        self.search_parents, self.mutation_prob, self.search_images = search_parents, mutation_prob, int(search_images)
        self.bn_images, self.tolerance, self.seed = bn_images, tolerance, seed
        # target=latency: the run's `latency` section (what results.json measures with) and the
        # table built from it in check(); the budget and the band are then latency reductions
        self.target = target
        self.latency = OmegaConf.to_container(latency, resolve=True) if isinstance(latency, DictConfig) \
            else dict(latency or {})
        self.table = None
        # STP's own weight decay (the released ST code: 1e-4) without changing module.optimizer's,
        # which also trains the dense reference every variant of a study shares
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.ordered = False
        self.channel_scores: list[torch.Tensor] = []
        self.elites: list[Arch] = []
        self.start_magnitudes: dict[str, torch.Tensor] = {}
        # sampled subnets: all, in the budget's band, steps that had none in the band
        self.counts = {"sampled": 0, "in_band": 0, "steps": 0, "steps_without_band": 0}
        # training cost of the subnet passes (results.json train.flops_ratio): the sampled subnets are
        # counted during training and their MACs computed when reported (`subnet_macs`), since
        # counting them reads plan tensors back, which a training step must not do (test_sync_audit);
        # `train_steps` set at fit end; `_macs_offset`: a count resumed from a checkpoint of before
        self.sampled_archs: collections.Counter = collections.Counter()
        self.train_steps, self._macs_fraction, self._macs_offset = 0, {}, 0.0
        self.summary: dict = {}
        self.pool: ArchPool | None = None
        self._heldout: torch.Tensor | None = None

    @property
    def band(self) -> tuple[float, float]:
        """The reductions (FLOPs, or predicted latency) the search may return; subnets here are
        trained every step."""
        return self.budget, self.budget + self.tolerance

    @property
    def measure(self) -> str:
        return "FLOPs" if self.target == "flops" else "predicted latency"

    # -- set-up -----------------------------------------------------------------------
    def check(self, model, example_input) -> None:
        """Called by the pipeline before training: models without stages, a latency budget no
        subnet reaches, or a budget whose band holds no architecture of the width grid, stop here
        with one line. target=latency builds the latency table here, once (on CPU copies)."""
        from prune_lab.models import classifier_of

        if self.target == "latency":
            model, example_input = copy.deepcopy(model).cpu(), example_input.cpu()
        space = SubnetSpace(model, example_input, ignored=[classifier_of(model)[1]], widths=self.widths)
        if self.target == "latency":
            if self.table is None:  # a resumed run re-reads the per-device grids from the on-disk cache
                self.table = table_for_run(space.groups, example_input, self.latency)
            space.use_table(self.table)
        self.pool = ArchPool(space, self.budget, self.pool_size, self.bins, random.Random(self.seed), self.band)
        if self.target == "latency":
            check_latency_reachable(max(self.pool.reduction.values()), self.budget, self.widths, self.table)
            if not self.search:  # the ablation's latency budget is solved (by shapes) before training too
                uniform_width_plan(space, [torch.ones(n) for n in space.groups.sizes], self.budget, self.tolerance,
                                   self.table)
        if not self.pool.in_band():
            raise PruneLabError(f"stp found no subnet with a {self.measure} reduction in "
                                f"[{self.band[0]}, {self.band[1]:.3f}] "
                                f"(budget={self.budget}, method.widths={list(self.widths)}); give finer method.widths "
                                "or a larger method.callbacks.stp.tolerance")

    def bind(self, model, example_input) -> None:
        """The subnet space of `model` (the one being trained), its pool and sampler."""
        from prune_lab.models import classifier_of

        if self.pool is None:  # reductions depend on shapes only: the pool (and table) from check() are reused
            self.check(model, example_input)
        self.space = SubnetSpace(model, example_input, ignored=[classifier_of(model)[1]], widths=self.widths,
                                 table=self.table)
        self.sampler = SubnetSampler(self.space, self.pool, self.budget, self.tolerance, self.num_subnets,
                                     self.expansion, self.expansion_reach, self.expansion_window, self.elite_band)

    def on_fit_start(self, trainer, pl_module):
        self.bind(pl_module.model, pl_module.example_input)
        if self.ordered:  # resumed: the nesting order comes from the checkpoint
            self.space.order(self.channel_scores)
        if not self.elites:
            self.elites = [self.space.largest()]
        if not self.start_magnitudes:  # resumed: the snapshot comes from the checkpoint
            self.start_magnitudes = self.filter_magnitudes(pl_module.model)
        if self.distill:
            pl_module.loss_terms.append(self._subnet_loss)

    def on_train_start(self, trainer, pl_module):
        if self.weight_decay is not None:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["weight_decay"] = self.weight_decay

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.ordered and trainer.current_epoch >= self.warmup_epochs:
            self._order(pl_module)

    def _order(self, pl_module):
        scorer = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        self.channel_scores = self.space.groups.scores(scorer)
        self.space.order(self.channel_scores)
        self.ordered = True

    # -- stimulative training -----------------------------------------------------------
    @staticmethod
    def _progress(trainer) -> float:
        return trainer.global_step / max(1, trainer.estimated_stepping_batches)

    def _subnet_loss(self, pl_module, batch, logits):
        if not self.ordered or not pl_module.training:
            return logits.new_zeros(())
        trainer = pl_module.trainer
        rng = random.Random(f"{self.seed}-{trainer.global_step}")  # identical on every DDP rank
        archs = self.sampler.sample(self._progress(trainer), rng, self.elites)
        in_band = sum(self.sampler.in_band(a) for a in archs)
        self.sampled_archs.update(archs)
        self.counts["sampled"] += len(archs)
        self.counts["in_band"] += in_band
        self.counts["steps"] += 1
        self.counts["steps_without_band"] += int(in_band == 0)
        x, _ = batch
        teacher = logits.detach()
        loss = logits.new_zeros(())
        with frozen_bn_stats(pl_module.model):
            for arch in archs:
                with self.space.activate(arch):
                    out = pl_module.model(x)
                    loss = loss + (subnet_kl(out, teacher, self.temperature) if self.subnet_target == "teacher"
                                   else F.cross_entropy(out, batch[1]))
        pl_module.log("train/subnet_kl", loss, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("train/budget_band_share", in_band / len(archs), on_step=False, on_epoch=True, sync_dist=True)
        return self.kd_weight * loss

    @property
    def subnet_macs(self) -> float:
        """The subnet passes' MACs so far, each as a fraction of the full network's, summed."""
        for arch in self.sampled_archs:
            if arch not in self._macs_fraction:
                self._macs_fraction[arch] = self.space.macs(arch) / self.space.dense_macs
        return self._macs_offset + sum(n * self._macs_fraction[a] for a, n in self.sampled_archs.items())

    def band_share(self) -> float | None:
        return self.counts["in_band"] / self.counts["sampled"] if self.counts["sampled"] else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Re-rank the elites `elite_updates` times while the window slides (rarer after), near the
        centre the window has halfway to the next re-ranking."""
        if not (self.expansion and self.ordered and self.distill):
            return
        total, step = max(1, int(trainer.estimated_stepping_batches)), trainer.global_step
        every = self.sampler.elite_interval(step / total, total, self.elite_updates)
        if step % every:
            return
        upcoming = (step + every / 2) / total
        rng = random.Random(f"{self.seed}-elites-{step}")
        self.elites = self.sampler.select_elites(self.elites, upcoming, self._fitness(pl_module, trainer), rng,
                                                 self.num_elites)

    # -- KD-guided search ---------------------------------------------------------------
    def _held_out(self, trainer) -> torch.Tensor:
        """A fixed stratified slice of `search_images` held-out training images (the data
        module's `val_set`, carved from the training data); the test set is never read."""
        if self._heldout is None:
            dm = trainer.datamodule
            part = stratified_slice(dm.val_set, self.search_images, seed=self.seed,
                                    num_classes=getattr(dm, "num_classes", None))
            self._heldout = torch.stack([part[i][0] for i in range(len(part))])
        return self._heldout

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
                with torch.no_grad(), frozen_bn_stats(model), self.space.activate(arch), quiet.working():
                    cache[arch] = float(subnet_kl(model(x), full))
                model.train(was_training)
            return cache[arch]
        return fitness

    def _feasible(self, arch: Arch) -> bool:
        if arch not in self.pool.reduction:
            self.pool.reduction[arch] = self.space.reduction(arch)  # a cache: the pool's bins stay as drawn
        return self.band[0] <= self.pool.reduction[arch] <= self.band[1]

    def evolve(self, fitness, rng: random.Random) -> tuple[Arch, list[float]]:
        """Evolutionary search under the budget: never returns an architecture whose reduction
        (FLOPs, or predicted latency) is below the budget (or more than `tolerance` above it)."""
        population = {a for a in self.elites if self._feasible(a)}
        population |= set(self.pool.in_band())
        for _ in range(20000):
            if len(population) >= self.search_population:
                break
            arch = self.space.random(rng)
            if self._feasible(arch):
                population.add(arch)
        if not population:
            raise PruneLabError(f"stp found no subnet with a {self.measure} reduction in [{self.budget}, "
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

    # -- extraction -----------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module):
        self.train_steps = int(trainer.global_step)
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
            plan = uniform_width_plan(self.space, self.channel_scores, self.budget, self.tolerance, self.table)
            skipped, described, kd = [], "uniform width, full depth", float("nan")
        search_s = time.time() - t0
        end = self.filter_magnitudes(pl_module.model)
        relative = {"start": self.kept_dropped(self.start_magnitudes, plan, skipped),
                    "end": self.kept_dropped(end, plan, skipped)}
        self.summary = {"arch": described, "estimated_flops_reduction":
                        1 - self.space.flops.macs(plan, skip=skipped) / self.space.dense_macs,
                        "kd_fitness": kd, "search_s": search_s, "fitness_history": history,
                        "budget_band": list(self.band), "budget_band_share": self.band_share(),
                        "subnet_counts": dict(self.counts), "search_images": int(len(self._heldout))
                        if self._heldout is not None else 0,
                        "kept_dropped_magnitude": relative,
                        "distill": self.distill, "subnet_target": self.subnet_target, "search": self.search, "expansion": self.expansion,
                        "expansion_reach": self.expansion_reach}
        if self.target == "latency" and trainer.is_global_zero:  # before the masks: a plain copy to shrink
            self.summary.update(latency_record(self.table, pl_module.model, pl_module.example_input, self.latency,
                                               plan, skipped))
        self._extract(trainer, pl_module, plan, skipped)
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "search.json").write_text(json.dumps(self.summary, indent=2))
        share = self.band_share()
        log.info("stp: subnet %s, FLOPs reduction %.3f, KD fitness %.4f, search %.1f s, subnets in the budget's "
                 "band %s, kept/dropped mean |w| %.3f at the start, %.3f at the end", described,
                 self.summary["estimated_flops_reduction"], kd, search_s, "-" if share is None else f"{share:.1%}",
                 relative["start"]["ratio"], relative["end"]["ratio"])
        if "measured_latency_reduction" in self.summary:
            log.info("stp: latency reduction %.3f predicted by the table, %.3f measured (budget %.3f)",
                     self.summary["estimated_latency_reduction"], self.summary["measured_latency_reduction"],
                     self.budget)

    @torch.no_grad()
    def filter_magnitudes(self, model) -> dict[str, torch.Tensor]:
        """Mean |w| of every output filter of the convs and linears that produce grouped channels."""
        modules = dict(model.named_modules())
        out = {}
        for members in self.space.groups.members:
            for name, kind, _ in members:
                m = modules[name]
                if kind == "out" and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and name not in out:
                    out[name] = m.weight.detach().abs().flatten(1).mean(1).float().cpu()
        return out

    def kept_dropped(self, magnitudes: dict[str, torch.Tensor], plan: dict[str, torch.Tensor],
                     skipped: list[str]) -> dict:
        """Mean |w| of the filters one fixed plan keeps vs those it drops (channels cut by the
        width, and every filter of a removed block): the paper's "relative sparsity effect"."""
        kept, dropped = [], []
        for root, members in zip(self.space.groups.roots, self.space.groups.members):
            keep = plan[root].cpu()
            for name, kind, root_idxs in members:
                if name not in magnitudes or kind != "out":
                    continue
                w = magnitudes[name]
                k = keep[root_idxs].clone()
                if any(name.startswith(b + ".") for b in skipped):
                    k[:] = False
                kept.append(w[k])
                dropped.append(w[~k])
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
        """The search's record, and the training cost with the subnet passes counted (TrainCost sees
        one full-network pass a step): each subnet pass at its own MACs, as an implementation that
        slices channels would execute it (here a subnet runs at full cost with channels zeroed,
        which the wall time shows). The elite re-rankings and the search (forward passes on the
        held-out slice) are not training steps and are not counted."""
        out = {"stp": self.summary}
        if self.train_steps:
            out["train"] = {"flops_ratio": 1.0 + self.subnet_macs / self.train_steps}
        return out

    def state_dict(self):
        return {"ordered": self.ordered, "channel_scores": self.channel_scores,
                "elites": [a.as_dict() for a in self.elites], "start_magnitudes": self.start_magnitudes,
                "counts": dict(self.counts),
                "sampled_archs": [[a.as_dict(), n] for a, n in self.sampled_archs.items()],
                "subnet_macs_offset": self._macs_offset}

    def load_state_dict(self, state):
        self.ordered = bool(state["ordered"])
        self.channel_scores = list(state["channel_scores"])
        self.elites = [Arch(tuple(a["depths"]), tuple(a["widths"])) for a in state["elites"]]
        self.start_magnitudes = dict(state.get("start_magnitudes", {}))
        self.counts.update(state.get("counts", {}))
        self.sampled_archs = collections.Counter({Arch(tuple(a["depths"]), tuple(a["widths"])): int(n)
                                                  for a, n in state.get("sampled_archs", [])})
        # a checkpoint written before the archs were kept holds their MACs as one number
        self._macs_offset = float(state.get("subnet_macs_offset", state.get("subnet_macs", 0.0)))
