"""UniPTS (Xie et al., CVPR 2024; METHODS.md §2): the reducing-regrowing search of layer-wise
sparsity. Paper-specific, so it lives here and plugs into the generic `LayerSparsitySearch`
callback as its `searcher` (config `_target_`).

Decoding [code]: every prunable layer is first reduced to P + δ (δ = `regrow`, 0.05), then δ·N
weights (N = all prunable weights) are regrown, spread over the layers in proportion to
softmax(genome), so the global sparsity is exactly P:

    p_l = max(0, (P + δ) − R · softmax(s)_l / n_l),   R = δ · N

Two details METHODS.md leaves open, our [choice]s: regrowth a layer cannot take (p_l would drop
below 0) is handed to the other layers in proportion to their softmax weights, and counts are
rounded by largest remainder, so the pruned count is exactly round(P·N) for every genome; when
P + δ > 1 the reduce level is capped at 1 (R = (1 − P)·N).

GA [code]: population 25, 25 generations, 10 parents, uniform crossover (rate 1.0), per-gene
mutation (rate 0.1) gene · (1 + N(0, 1)), the all-equal genome kept in every generation.
[choice]: the initial population is the all-equal genome (all ones: a multiplicative mutation
never moves a zero) plus mutants of it with every gene mutated; the parents (the best
`parents` genomes so far) survive into the next generation (`keep_parents`), whose fitness is
cached, so a generation costs at most population − parents − 1 new evaluations.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import exact_counts


def decode_genome(genome: torch.Tensor, numel: dict[str, int], budget: float, regrow: float = 0.05) -> dict[str, int]:
    """Pruned weight count per layer (in `numel`'s order) for `genome`; they sum to round(P·N)."""
    names = list(numel)
    sizes = torch.tensor([numel[n] for n in names], dtype=torch.float64)
    total = float(sizes.sum())
    level = min(budget + regrow, 1.0)
    to_regrow = (level - budget) * total
    share = torch.softmax(torch.as_tensor(genome, dtype=torch.float64).flatten(), 0)
    if share.numel() != len(names):
        raise ValueError(f"genome has {share.numel()} genes for {len(names)} layers")
    regrown = torch.zeros_like(sizes)
    room = level * sizes  # a layer cannot regrow more than it lost
    open_ = torch.ones(len(names), dtype=torch.bool)
    left = to_regrow
    while left > 1e-9 * max(total, 1.0) and bool(open_.any()):
        give = left * share * open_ / float((share * open_).sum())
        capped = open_ & (regrown + give >= room)
        if not bool(capped.any()):
            regrown += give
            break
        left -= float((room - regrown)[capped].sum())
        regrown[capped] = room[capped]
        open_ &= ~capped
    sparsity = {n: float(level - regrown[i] / sizes[i]) for i, n in enumerate(names)}
    return exact_counts(sparsity, numel, round(budget * total))


class ReducingRegrowingGA:
    """The genetic algorithm over genomes (one gene per prunable layer).

    `search(numel, budget, evaluate, on_generation)` calls `evaluate(list of allocations)` with
    allocations = {layer: pruned count}, one batch per generation, and returns the best
    allocation and a record (best genome, per-generation fitness history).
    """

    def __init__(self, population: int = 25, generations: int = 25, parents: int = 10, crossover: float = 1.0,
                 mutation: float = 0.1, regrow: float = 0.05, keep_parents: bool = True, seed: int = 0):
        checks = [("population", population, population >= 2), ("generations", generations, generations >= 0),
                  ("parents", parents, 1 <= parents <= population), ("crossover", crossover, 0 <= crossover <= 1),
                  ("mutation", mutation, 0 <= mutation <= 1), ("regrow", regrow, 0 <= regrow < 1)]
        for name, value, ok in checks:
            if isinstance(value, bool) or not ok:
                raise PruneLabError(f"method.{name}={value} is invalid; population >= 2, generations >= 0, "
                                    "1 <= parents <= population, crossover and mutation in [0, 1], regrow in [0, 1)")
        self.population, self.generations, self.parents = int(population), int(generations), int(parents)
        self.crossover, self.mutation, self.regrow = float(crossover), float(mutation), float(regrow)
        self.keep_parents, self.seed = bool(keep_parents), int(seed)

    def hparams(self) -> dict:
        return {"population": self.population, "generations": self.generations, "parents": self.parents,
                "crossover": self.crossover, "mutation": self.mutation, "regrow": self.regrow,
                "keep_parents": self.keep_parents, "seed": self.seed}

    def decode(self, genome: torch.Tensor, numel: dict[str, int], budget: float) -> dict[str, int]:
        return decode_genome(genome, numel, budget, self.regrow)

    def evaluations_planned(self) -> int:
        per_generation = self.population - (1 + self.parents if self.keep_parents else 1)
        return self.population + self.generations * max(per_generation, 0)

    # -- operators ---------------------------------------------------------------------------
    def _mutate(self, genome: torch.Tensor, rate: float, g: torch.Generator) -> torch.Tensor:
        hit = torch.rand(genome.shape, generator=g, dtype=torch.float64) < rate
        return torch.where(hit, genome * (1 + torch.randn(genome.shape, generator=g, dtype=torch.float64)), genome)

    def _child(self, parents: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
        i, j = torch.randperm(len(parents), generator=g)[:2].tolist() if len(parents) > 1 else (0, 0)
        a, b = parents[i], parents[j]
        child = a.clone()
        if float(torch.rand((), generator=g, dtype=torch.float64)) < self.crossover:
            take_b = torch.rand(a.shape, generator=g, dtype=torch.float64) < 0.5
            child = torch.where(take_b, b, a)
        return self._mutate(child, self.mutation, g)

    # -- the search --------------------------------------------------------------------------
    def search(self, numel: dict[str, int], budget: float,
               evaluate: Callable[[list[dict[str, int]]], list[float]],
               on_generation: Callable[[int, float], None] | None = None) -> tuple[dict[str, int], dict]:
        g = torch.Generator().manual_seed(self.seed)
        equal = torch.ones(len(numel), dtype=torch.float64)
        population = [equal] + [self._mutate(equal, 1.0, g) for _ in range(self.population - 1)]
        scored: dict[bytes, tuple[float, torch.Tensor]] = {}
        history = []

        def score(genomes: list[torch.Tensor]) -> None:
            new = {gn.numpy().tobytes(): gn for gn in genomes if gn.numpy().tobytes() not in scored}
            if new:
                fits = evaluate([self.decode(gn, numel, budget) for gn in new.values()])
                for (key, gn), fit in zip(new.items(), fits):
                    scored[key] = (float(fit), gn)

        for generation in range(self.generations + 1):
            if generation > 0:
                ranked = sorted(population, key=lambda gn: -scored[gn.numpy().tobytes()][0])
                parents = ranked[:self.parents]
                population = [equal] + ([p for p in parents if not torch.equal(p, equal)] if self.keep_parents else [])
                while len(population) < self.population:
                    population.append(self._child(parents, g))
            score(population)
            fits = [scored[gn.numpy().tobytes()][0] for gn in population]
            best_so_far = max(f for f, _ in scored.values())
            history.append({"generation": generation, "best": max(fits), "mean": sum(fits) / len(fits),
                            "best_so_far": best_so_far, "evaluations": len(scored)})
            if on_generation is not None:
                on_generation(generation, best_so_far)
        # the best genome ever evaluated; ties go to the one evaluated first (the all-equal genome)
        best_fit, best = max(scored.values(), key=lambda fg: fg[0])
        record = {"searcher": "reducing_regrowing_ga", **self.hparams(), "best_genome": best.tolist(),
                  "best_fitness": best_fit, "all_equal_fitness": scored[equal.numpy().tobytes()][0],
                  "history": history, "evaluations": len(scored)}
        if not all(math.isfinite(f) for f, _ in scored.values()):
            raise RuntimeError("a fitness evaluation returned a non-finite value")
        return self.decode(best, numel, budget), record
