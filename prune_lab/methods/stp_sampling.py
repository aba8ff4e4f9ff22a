"""Which subnets STP's stimulative training distils into, step by step (METHODS.md §1).

Two rules, both measurable (tests/test_stp.py):
- **The budget is trained from the first step.** Every step's first subnet lies in the budget's
  band, the reduction interval [budget, budget + tolerance] that the final search picks from;
  so every architecture the search may return has been a student since step 0.
- **Subnet mutating expansion** (a documented choice, `expansion`): the other subnets come from a
  window of reduction [centre − window, centre + window] whose centre slides linearly from
  the full network (0) to the budget by `reach` of training, then stays there. Half of them are
  mutants of the current elites, accepted only inside the window (bounded on both sides); elites
  are re-ranked by KD fitness among candidates inside a narrow band (± `elite_band`) around the
  centre, since ranking by KL across a wide range always favours the largest subnets.
Without expansion (`expansion=false`, the ablation) the other subnets come from the whole binned
pool, as in the released stimulative-training code.
"Reduction" is the space's measure (`SubnetSpace.reduction`): the FLOPs reduction, or with
target=latency the latency reduction the table predicts.
"""
from __future__ import annotations

import random
from typing import Callable

from prune_lab.sparsity.subnet import Arch, SubnetSpace


class ArchPool:
    """Random architectures binned by reduction, with a bin edge at the budget; the smallest
    and largest subnet always included, and the budget's band topped up to `band_min` members
    when the space has them."""

    def __init__(self, space: SubnetSpace, budget: float, size: int, bins: int, rng: random.Random,
                 band: tuple[float, float] | None = None, band_min: int = 10):
        archs = {space.smallest(), space.largest()} | {space.random(rng) for _ in range(size)}
        self.reduction = {a: space.reduction(a) for a in archs}
        self.band = band or (budget, budget)
        # reduction of every architecture seen (the pool's and, as a cache, later mutants')
        found = len(self.in_band()) if band else band_min
        for _ in range(20 * max(size, 100)):  # rare in a fine-grained space: draw until a few are found
            if found >= band_min:
                break
            a = space.random(rng)
            if a not in self.reduction:
                self.reduction[a] = space.reduction(a)
                found += self.band[0] <= self.reduction[a] <= self.band[1]
        lo, hi = min(self.reduction.values()), max(self.reduction.values())
        half = max(1, bins // 2)
        edges = sorted({lo + (budget - lo) * i / half for i in range(half + 1)} |
                       {budget + (hi - budget) * i / half for i in range(half + 1)})
        self.bins = [[a for a, r in self.reduction.items() if e0 <= r < e1 or (e1 == edges[-1] and r == e1)]
                     for e0, e1 in zip(edges[:-1], edges[1:])]
        self.bins = [sorted(b, key=lambda a: a.genes()) for b in self.bins if b]

    def in_band(self) -> list[Arch]:
        lo, hi = self.band
        return sorted((a for a, r in self.reduction.items() if lo <= r <= hi), key=lambda a: a.genes())

    def sample(self, rng: random.Random, lo: float = -1.0, hi: float = 2.0) -> Arch:
        """A bin uniformly, then an architecture in it; restricted to reductions in [lo, hi]."""
        bins = [[a for a in b if lo <= self.reduction[a] <= hi] for b in self.bins]
        bins = [b for b in bins if b] or self.bins
        return rng.choice(rng.choice(bins))


class SubnetSampler:
    def __init__(self, space: SubnetSpace, pool: ArchPool, budget: float, tolerance: float, num_subnets: int,
                 expansion: bool = True, reach: float = 0.3, window: float = 0.1, elite_band: float = 0.03,
                 mutation_prob: float = 0.2):
        self.space, self.pool, self.budget, self.num_subnets = space, pool, budget, num_subnets
        self.band = (budget, budget + tolerance)
        self.expansion, self.reach, self.window, self.elite_band = expansion, reach, window, elite_band
        self.mutation_prob = mutation_prob
        self.band_archs = pool.in_band()

    def reduction(self, arch: Arch) -> float:
        if arch not in self.pool.reduction:
            self.pool.reduction[arch] = self.space.reduction(arch)  # a cache: the pool's bins stay as drawn
        return self.pool.reduction[arch]

    def in_band(self, arch: Arch) -> bool:
        return self.band[0] <= self.reduction(arch) <= self.band[1]

    # -- the expansion window ----------------------------------------------------------
    def centre(self, progress: float) -> float:
        """Reduction the window is centred on at `progress` (fraction of training)."""
        return self.budget * min(1.0, max(0.0, progress) / self.reach) if self.reach > 0 else self.budget

    def region(self, progress: float) -> tuple[float, float]:
        c = self.centre(progress)
        return c - self.window, c + self.window

    def mutant_within(self, arch: Arch, lo: float, hi: float, rng: random.Random, tries: int = 20) -> Arch | None:
        """A mutation of `arch` whose reduction lies in [lo, hi], or None after `tries`."""
        for _ in range(tries):
            child = self.space.mutate(arch, rng, self.mutation_prob)
            if lo <= self.reduction(child) <= hi:
                return child
        return None

    # -- one step's students -------------------------------------------------------------
    def sample(self, progress: float, rng: random.Random, elites: list[Arch]) -> list[Arch]:
        """The step's `num_subnets` subnets: the first in the budget's band, the rest in the
        expansion window (or anywhere in the pool without expansion)."""
        archs = [self._band_subnet(rng, elites)]
        for _ in range(self.num_subnets - 1):
            archs.append(self._window_subnet(progress, rng, elites) if self.expansion else self.pool.sample(rng))
        return archs

    def _band_subnet(self, rng: random.Random, elites: list[Arch]) -> Arch:
        at_budget = [a for a in elites if self.in_band(a)]
        if self.expansion and at_budget and rng.random() < 0.5:
            child = self.mutant_within(rng.choice(at_budget), *self.band, rng)
            if child is not None:
                return child
        return rng.choice(self.band_archs)

    def _window_subnet(self, progress: float, rng: random.Random, elites: list[Arch]) -> Arch:
        lo, hi = self.region(progress)
        if elites and rng.random() < 0.5:
            child = self.mutant_within(rng.choice(elites), lo, hi, rng)
            if child is not None:
                return child
        return self.pool.sample(rng, lo, hi)

    # -- elites --------------------------------------------------------------------------
    def elite_interval(self, progress: float, total_steps: int, updates: int) -> int:
        """Steps between two elite re-rankings: `updates` of them while the window slides (the
        centre then moves budget / updates between two, 0.085 at the defaults: within the
        window's half-width, so the new elites' mutants fit the window), 4x rarer once it stays
        at the budget. A reach of 0 counts as 0.1 here."""
        every = max(1, int(max(self.reach, 0.1) * total_steps / max(1, updates)))
        return every if progress < self.reach else 4 * every

    def select_elites(self, elites: list[Arch], progress: float, fitness: Callable[[Arch], float],
                      rng: random.Random, k: int, candidates: int = 10) -> list[Arch]:
        """The `k` candidates with the lowest KD fitness among those within ± elite_band of the
        window's centre at `progress`: current elites, their mutants and pool members there."""
        c = self.centre(progress)
        lo, hi = c - self.elite_band, c + self.elite_band
        pool = set(a for a in elites if lo <= self.reduction(a) <= hi)
        for _ in range(candidates):
            if elites:
                child = self.mutant_within(rng.choice(elites), lo, hi, rng)
                if child is not None:
                    pool.add(child)
            near = self.pool.sample(rng, lo, hi)
            if lo <= self.reduction(near) <= hi:
                pool.add(near)
        if not pool:  # nothing that close: the nearest pool members
            pool = set(sorted(self.pool.reduction, key=lambda a: abs(self.pool.reduction[a] - c))[:candidates])
        return sorted(pool, key=lambda a: (fitness(a), a.genes()))[:k]
