"""Channel plans that meet a latency budget (see `latency.py` for the table they are solved on).

`solve_latency_target` returns, for a predicted latency reduction, either the HALP-style plan
(importance kept per millisecond, greedy) or the FLOPs-target plan whose predicted latency meets
the same reduction. `meet_latency` closes the loop on the measured model.
Hand-written: no library solves a channel allocation against a latency table.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.latency import ALLOCATIONS, LatencyTable
from prune_lab.sparsity.measure import observe_forward
from prune_lab.sparsity.structure import ChannelGroups, drop_order, kept_counts, solve_flops_target

log = logging.getLogger(__name__)


class ChannelPlan(dict):
    """A channel plan (root module → keep mask) and the residual blocks it removes entirely."""

    def __init__(self, keep: dict, removed: list[str] = ()):
        super().__init__(keep)
        self.removed = list(removed)


def removable_blocks(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Residual blocks whose input and output have the same shape (identity shortcut), in ResNet
    stages (`layer1`, ...) after each stage's first block. With every parameter of such a block
    masked to zero its output is relu(0 + x) = x, because its input is the previous block's ReLU
    output: the masked model computes exactly what the model without the block computes."""
    from prune_lab.sparsity.subnet import find_stages

    try:
        stages = find_stages(model)
    except PruneLabError:
        return []
    same = {}
    observe_forward(model, example_input,
                    {block: (lambda m, i, o, n=f"{name}.{j}": same.__setitem__(n, tuple(i[0].shape) == tuple(o.shape)))
                     for name, stage in stages for j, block in enumerate(stage) if j > 0})
    return [n for n, s in same.items() if s]


def _kept_levels(size: int, round_to: int, min_keep: float = 0.0, slices: int = 1) -> list[int]:
    """Kept counts a group steps through, largest first: every count, or multiples of round_to
    (and of a grouped conv's groups), down to max(1, ⌈min_keep · size⌉)."""
    return kept_counts(size, slices, round_to, math.ceil(min_keep * size - 1e-9))


class _Greedy:
    """The ratio greedy of the latency knapsack: state = channels pruned per group (lowest
    `scores` first: the method's own criterion decides *which* channels go); a step moves one
    group to its next kept level, the one that loses the least value per ms saved.

    The value lost: with `values` (HALP: BN Taylor saliencies, comparable across layers) the sum
    of the removed channels' values; without, the log of the importance share a group keeps,
    log(Σ kept s / Σ s), summed over groups — scale-free for criteria that do not compare across
    layers (L1 norms, BN scales), each further cut of a group dearer as it shrinks. The log share
    was the first implementation; on Fashion-MNIST it cut the stem's residual stream to 1 of 16
    channels at 50 % latency and lost to the FLOPs plan (README), so HALP's Taylor values are the
    default (`method.latency_importance`)."""

    def __init__(self, groups: ChannelGroups, table: LatencyTable, scores: list[torch.Tensor], round_to: int,
                 values: list[torch.Tensor] | None = None, min_keep: float = 0.0, blocks: list[str] = (),
                 start: list[int] | None = None, lookahead: int = 1):
        self.table, self.sizes, self.roots = table, groups.sizes, groups.roots
        self.order = [drop_order(s.float(), sl) for s, sl in zip(scores, groups.slices)]
        # cum[g][k]: the group's value with its k lowest-scored channels removed (decreasing in k)
        self.cum = []
        for g, s in enumerate(scores):
            if values is not None:
                v = values[g].double().clamp_min(0)[self.order[g]]
                self.cum.append([-c for c in [0.0] + torch.cumsum(v, 0).tolist()])
                continue
            v = s.double().clamp_min(0)[self.order[g]]  # in drop order (sorted, but for grouped convs)
            total = float(v.sum()) or 1.0  # kept share after removing the k lowest, floored: no log 0
            self.cum.append([math.log(max(1.0 - c / total, 1e-9)) for c in [0.0] + torch.cumsum(v, 0).tolist()])
        self.levels = [_kept_levels(size, round_to, min_keep, sl) for size, sl in zip(self.sizes, groups.slices)]
        self.pos = [0] * len(self.sizes)
        self.pruned = [0] * len(self.sizes)
        self.dropped = [torch.zeros(size, dtype=torch.bool) for size in self.sizes]
        self.items = table.flops.items
        self.kept = {n: list(v) for n, v in table.kept(None).items()}
        self.pos_of = {n: L["pos"] for n, L in table.flops.layers.items()}
        self.layers_of = [{name for name, _, _ in entries} for entries in self.items]
        self.neighbours = [[h for h in range(len(self.sizes)) if self.layers_of[h] & self.layers_of[g]]
                           for g in range(len(self.sizes))]
        self.other_per_act = table.other_ms / table.dense_act
        self.ms = table.predict_ms(None)
        # depth: a block's layers, and the groups that live inside it (removed with it)
        self.blocks = {b: ({n for n in self.kept if n.startswith(b + ".")},
                           [g for g, ls in enumerate(self.layers_of) if ls and all(n.startswith(b + ".") for n in ls)])
                       for b in blocks}
        self.blocks = {b: v for b, v in self.blocks.items() if v[0] and v[1]}
        self.removed: list[str] = []
        self.gone: set[str] = set()  # layers of removed blocks
        self.lookahead = max(1, int(lookahead))
        self.cand = [self._candidate(g) for g in range(len(self.sizes))]
        # a progressive schedule's earlier steps: each group first loses at least the channels it
        # already lost (they score lowest, so they go first), whatever they cost
        for g, n in enumerate(start or []):
            while self.pruned[g] < n and self.cand[g] is not None:
                self._apply(g, self._candidate(g, lookahead=1))

    def _changes(self, g: int, new_pruned: int) -> dict[str, list[int]]:
        newly = self.order[g][self.pruned[g]:new_pruned]
        drop = self.dropped[g].clone()
        drop[newly] = True
        changes: dict[str, list[int]] = {}
        for name, kind, root_idxs in self.items[g]:
            d = int(drop[root_idxs].sum()) - int(self.dropped[g][root_idxs].sum())
            c = changes.setdefault(name, [0, 0])
            c[0 if kind == "in" else 1] += d
        return changes

    def _candidate(self, g: int, lookahead: int | None = None):
        """Group g's next move: to one of its next `lookahead` kept levels, the one that loses the
        least value per ms saved (see `step`). Looking past the next level matters where latency is
        a staircase: on an AVX-512 CPU a conv's time steps with every 16 output channels, so
        removing one block of 8 saves nothing and the next one a lot, and a one-level greedy
        never sees the second (HALP sizes its neuron groups to the latency steps for the same
        reason). Returns (value lost, ms change, channels pruned after it, level index) or None."""
        if self.pos[g] >= len(self.levels[g]) or self.layers_of[g] <= self.gone:
            return None
        best = None
        for j in range(self.pos[g], min(self.pos[g] + (lookahead or self.lookahead), len(self.levels[g]))):
            d_imp, d_ms, new_pruned = self._move(g, self.sizes[g] - self.levels[g][j])
            if best is None or self._key(d_imp, d_ms) < self._key(best[0], best[1]):
                best = (d_imp, d_ms, new_pruned, j)
        return best

    @staticmethod
    def _key(d_imp: float, d_ms: float):
        # moves that save time first, by importance lost per ms; then the rest, by importance
        return (0, d_imp / -d_ms) if d_ms < 0 else (1, d_imp)

    def _move(self, g: int, new_pruned: int):
        d_imp = self.cum[g][self.pruned[g]] - self.cum[g][new_pruned]  # value lost (≥ 0)
        d_ms = 0.0
        for name, (d_in, d_out) in self._changes(g, new_pruned).items():
            if name in self.gone:
                continue
            cin, cout = self.kept[name]
            dw = self.table.flops.layers[name]["dw"]
            new_in, new_out = (cout - d_out if dw else cin - d_in), cout - d_out
            d_ms += self.table.layer_ms(name, new_in, new_out) - self.table.layer_ms(name, cin, cout)
            d_ms -= d_out * self.pos_of[name] * self.other_per_act
        return d_imp, d_ms, new_pruned

    def _block_candidate(self, b: str):
        """Removing block b: its layers' time and their activations' share saved; the value its
        inner groups still keep lost."""
        layers, inner = self.blocks[b]
        d_ms = -sum(self.table.layer_ms(n, *self.kept[n]) + self.kept[n][1] * self.pos_of[n] * self.other_per_act
                    for n in layers)
        d_imp = sum(self.cum[g][self.pruned[g]] - self.cum[g][-1] for g in inner)
        return d_imp, d_ms

    def step(self) -> bool:
        """Take the cheapest step (least importance per ms saved); False when none is left."""
        best, best_key = None, None
        options = [(g, c[0], c[1]) for g, c in enumerate(self.cand) if c is not None]
        options += [(b, *self._block_candidate(b)) for b in self.blocks if b not in self.removed]
        for g, d_imp, d_ms in options:
            key = self._key(d_imp, d_ms)
            if best_key is None or key < best_key:
                best, best_key = g, key
        if best is None:
            return False
        if isinstance(best, str):  # a whole block goes
            layers, inner = self.blocks[best]
            self.ms += self._block_candidate(best)[1]
            self.removed.append(best)
            self.gone |= layers
            for g in {h for g in inner for h in self.neighbours[g]}:
                self.cand[g] = self._candidate(g)
            return True
        self._apply(best)
        return True

    def _apply(self, g: int, move=None) -> None:
        """Take group g's candidate move (or `move`, a `_candidate` result)."""
        _, d_ms, new_pruned, level = move or self.cand[g]
        for name, (d_in, d_out) in self._changes(g, new_pruned).items():
            k = self.kept[name]
            k[1] -= d_out
            k[0] = k[1] if self.table.flops.layers[name]["dw"] else k[0] - d_in
        self.dropped[g][self.order[g][self.pruned[g]:new_pruned]] = True
        self.pruned[g] = new_pruned
        self.pos[g] = level + 1
        self.ms += d_ms
        for h in self.neighbours[g]:
            self.cand[h] = self._candidate(h)

    def plan(self) -> ChannelPlan:
        return ChannelPlan({root: ~d for root, d in zip(self.roots, self.dropped)}, self.removed)


def solve_latency_target(groups: ChannelGroups, table: LatencyTable, scores: list[torch.Tensor], target: float,
                         allocation: str = "halp", distribution: str = "uniform", round_to: int = 1,
                         values: list[torch.Tensor] | None = None, min_keep: float = 0.0,
                         blocks: list[str] = (), start: list[int] | None = None,
                         lookahead: int = 1) -> tuple[dict[str, torch.Tensor], float]:
    """A plan whose *predicted* latency reduction is `target` (at least, for `halp`; the closest,
    for `flops`), and that predicted reduction. Within a group channels go in `scores` order;
    `values` (halp only): what a removed channel costs (see `_Greedy`); `min_keep` (halp only):
    no group keeps fewer than this fraction of its channels; `blocks` (halp only): residual blocks the
    greedy may also remove whole (`removable_blocks`), returned in the plan's `removed`; `start`
    (halp only): channels each group has already lost (a progressive schedule's earlier steps),
    removed first whatever the target; `lookahead` (halp only): how many kept levels ahead a
    group's next move may jump (`_Greedy._candidate`). Unreachable targets raise PruneLabError."""
    if allocation not in ALLOCATIONS:
        raise PruneLabError(f"unknown latency allocation '{allocation}'; choose one of: {', '.join(ALLOCATIONS)}")
    dense_ms = table.predict_ms(None)
    if allocation == "halp":
        greedy = _Greedy(groups, table, scores, round_to, values, min_keep, blocks, start, lookahead)
        while greedy.ms > (1.0 - target) * dense_ms:
            if not greedy.step():
                raise PruneLabError(f"budget={target:g} (latency) is not reachable on this model: with every group "
                                    f"at its minimum the table predicts {1 - greedy.ms / dense_ms:.3f}")
        plan = greedy.plan()
        return plan, table.reduction(plan, plan.removed)

    flops = table.flops
    def predicted(f):
        plan = solve_flops_target(groups, flops, scores, f, distribution, round_to, tolerance=1.0)
        return table.reduction(plan), plan

    top = predicted(0.999)
    if top[0] < target:
        raise PruneLabError(f"budget={target:g} (latency) is not reachable with {distribution} FLOPs allocation: "
                            f"the table predicts at most {top[0]:.3f}")
    lo, hi, best = 0.0, 0.999, top
    for _ in range(20):  # predicted latency falls (almost) monotonically with the FLOPs budget
        mid = (lo + hi) / 2
        red, plan = predicted(mid)
        if abs(red - target) < abs(best[0] - target):
            best = (red, plan)
        lo, hi = (mid, hi) if red < target else (lo, mid)
    return best[1], best[0]


def max_reduction(groups: ChannelGroups, table: LatencyTable, round_to: int = 1, min_keep: float = 0.0) -> float:
    """The predicted latency reduction with every group at its smallest kept count."""
    plan = {}
    for root, size, slices in zip(groups.roots, groups.sizes, groups.slices):
        levels = _kept_levels(size, round_to, min_keep, slices) or [size]
        keep = torch.zeros(slices, size // slices, dtype=torch.bool)
        keep[:, :levels[-1] // slices] = True  # the same positions in every slice of a grouped conv
        plan[root] = keep.flatten()
    return table.reduction(plan)


def meet_latency(solve, measure, target: float, tolerance: float, rounds: int = 3, ceiling: float = 0.99,
                 confirm: bool = False):
    """Solve for `target`, measure the shrunk plan, correct the request by the miss and repeat,
    `rounds` times at most or until a plan's measured reduction lies in [target, target + tolerance / 2].

    The budget is a ceiling on latency, as HALP's constraint is: a plan that removes a little more
    than asked is acceptable, one that removes less is not. So each correction aims at the middle
    of that window (asks for asked + (target + tolerance / 4 − measured)), and when no round lands
    in it the plan kept is the one with the smallest miss, a shortfall counting four times an
    overshoot: a plan measured at or above the target is kept unless it overshoots by more than four
    times the best shortfall. (Aiming at the target itself left the final re-measurement below it half
    of the time: a ResNet-50 plan accepted at 0.492 for 0.5 re-measured 0.470; with a shortfall
    counting twice, a ResNet-20 plan was accepted at 0.386 for 0.4 and an independent timing read
    0.339: README, held-out check.)

    confirm: a plan that lands in the window is measured a second time and judged (and corrected) by
    the mean of its two readings (the round's "readings"): one reading can sit high for minutes on a
    shared host (a ResNet-50 plan accepted at 0.508 for 0.5 re-measured 0.461 ± 0.008 in five later
    calls, README), and a plan is only accepted when a second look agrees.

    solve(asked) -> (plan, predicted reduction); measure(plan) -> measured reduction.
    Returns the chosen plan and the history of the rounds; the chosen round has "chosen": True."""
    aim = target + tolerance / 4

    def miss(measured: float) -> float:
        return measured - target if measured >= target else 4.0 * (target - measured)

    asked, history, best = target, [], None
    for i in range(max(1, rounds)):
        try:
            plan, predicted = solve(asked)
        except PruneLabError:
            if i == 0:
                raise
            break  # a correction asked for more than the table can give: keep the best measured

        measured = measure(plan)
        entry = {"asked": asked, "predicted": predicted, "measured": measured, "chosen": False}
        if confirm and target <= measured <= target + tolerance / 2:
            readings = [measured, measure(plan)]
            measured = sum(readings) / 2
            entry.update(measured=measured, readings=readings)
        history.append(entry)
        log.info("latency plan: asked %.4f, table predicts %.4f, measured %.4f (target %.4f)",
                 asked, predicted, measured, target)
        if best is None or miss(measured) < miss(history[best[1]]["measured"]):
            best = (plan, i)
        if target <= measured <= target + tolerance / 2:
            best = (plan, i)
            break
        asked = min(max(asked + (aim - measured), 0.0), ceiling)
    history[best[1]]["chosen"] = True
    return best[0], history
