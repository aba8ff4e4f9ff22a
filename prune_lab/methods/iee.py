"""IEE — exploration–exploitation with enhanced saliency (Sun et al., WACV 2025) as a regrowth policy.

The network is split into an active structure Θ_K (trained: exploitation) and an exploration
space Θ_P (masked). Each cycle of H + J + Q optimizer steps:

    estimate (H)  train Θ_K and score it (magnitude: at the end; Taylor: summed over the H steps)
    prune         move the Ω_t lowest-scoring units of each layer's Θ_K to Θ_P, saving their
                  values as their most-recently-used (MRU) values: the values they had when last active
    improve (J)   train the smaller Θ_K
    explore (Q)   unmask Θ_P at its MRU values, freeze Θ_K (and every other parameter), train Θ_P
                  only, scoring it with the same criterion; batch-norm running statistics are saved
                  before and restored after, and validation in this phase scores the masked network
    grow          move the Ω_t highest-scoring units of Θ_P back to Θ_K, at their explored values
                  or their last-active values (`grow_values`); mask the rest again. The MRU values
                  stay the last-active ones: exploration never overwrites them (`mru=explored`
                  restores the first implementation, where explored values became the next MRU)

Cycle lengths follow the run: by default `cycles` cycles share the first `stop` of training, each
split into equal estimate / improve / explore thirds; or `phase_steps` gives H = J = Q as the paper
does (150 on ImageNet) and the cycles are as many as fit before `stop`; or the three phase lengths
are given as fractions of training (0 < x < 1) or as absolute optimizer steps (integers). Ω_t decays exponentially
(`omega`, read at each cycle's prune step); after the last cycle Θ_K trains alone. Units are
single weights (`target: params`; per-layer counts, so the ERK/uniform distribution of the initial
mask is kept; with `pattern` N:M, per group of M, so the pattern holds) or output channels of
dependency groups (`target: flops`; per-group counts, so the FLOPs of the initial plan are kept
and the exported model is physically shrunk). The phase is a function of the step; Θ_K, the MRU
values, the scores, the pending counts and the saved BN statistics are state, so a checkpoint
taken anywhere in a cycle resumes exactly.

prune_lab's own choices where the paper is silent (METHODS.md §3 [choice]): Ω_0 = 0.3 decaying
to 0.01 at `stop`; the optimizer state of units entering or leaving Θ_K or Θ_P is zeroed; a unit
never active yet has no MRU value: a weight explores from zero, so what it learns in Q steps,
not its random initial value, decides whether it grows, while a channel explores from its value
at fit start, because a channel at zero (zero filter, zero batch-norm scale) is a saddle point
that no gradient leaves (`keep_start_values=true`, or `never_active_values=start`, uses the start
values for weights too: right when they are the dense reference's). Prune and grow rank each
layer's units apart, so the initial ERK split stays (`ranking=layer`); the paper says ERK is used
"for initializing" the distribution, which may mean it drifts: `ranking=global` ranks all weights
together (Ω_t of the network's active weights; the grow brings the same total back). Ablations:
  explore=false        the Q steps train Θ_K instead; Θ_P, never trained, is ranked by the
                       magnitude of its dense gradient summed over those steps (RigL's growth
                       signal; channels: Σ (∂L/∂γ)² + (∂L/∂β)² of their batch norms); grown
                       units restart from their MRU values
  freeze_active=false  Θ_K keeps training during explore
  grow_init=zero       the exploration space restarts from zero instead of its MRU values (the
                       paper's "zero-init instead of MRU")
  improve=false        no improve phase: its J steps join the estimate phase (same cycle count)
"""
from __future__ import annotations

import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.methods.iee_probe import Turnover
from prune_lab.methods.iee_units import ChannelUnits, WeightUnits
from prune_lab.sparsity import ExponentialDecay
from prune_lab.sparsity.nm import NMPattern
from prune_lab.sparsity.regrowth import RegrowthPolicy, highest, lowest, reset_optimizer_state

PHASES = ("estimate_steps", "improve_steps", "explore_steps")
GLOBAL = "__global__"  # ranking=global: the pending count of the whole network


def _global_pick(scores: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor], n: int,
                 highest: bool) -> dict[str, torch.Tensor]:
    """Per layer, the bool mask of the `n` lowest (or highest) scores among every layer's candidates
    ranked together (ranking=global): the layer-wise density may drift from the initial ERK split."""
    layers = list(candidates)
    flat = torch.cat([torch.where(candidates[k], scores[k].to(candidates[k].device).float(),
                                  torch.tensor(float("-inf") if highest else float("inf"))).flatten()
                      for k in layers])
    n = max(0, min(int(n), int(sum(int(candidates[k].sum()) for k in layers))))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if n:
        chosen[torch.topk(flat, n, largest=highest).indices] = True
    out, start = {}, 0
    for k in layers:
        size = candidates[k].numel()
        out[k] = chosen[start:start + size].view_as(candidates[k]) & candidates[k]
        start += size
    return out


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{m}.{b}": buf for m, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for b, buf in mod.named_buffers(recurse=False)}


class IEE(RegrowthPolicy):
    """The five-phase loop; see the module docstring. Step counts are optimizer steps of the
    global batch; `stop` and `omega.end` are fractions of training."""

    RANKINGS = ("layer", "global")
    GROW_INIT = ("mru", "zero")
    GROW_VALUES = ("explored", "last_active", "zero")
    MRU = ("last_active", "explored")

    def __init__(self, target: str = "params", criterion: str | None = None, estimate_steps=None,
                 improve_steps=None, explore_steps=None, cycles: int | None = 10, omega=None, stop: float = 0.75,
                 explore: bool = True, freeze_active: bool = True, grow_init: str = "mru",
                 grow_values: str = "last_active", mru: str = "last_active", improve: bool = True,
                 keep_start_values: bool | None = None, pattern: str | None = None, phase_steps: int | None = None,
                 ranking: str = "layer", never_active_values: str | None = None):
        if target not in ("params", "flops", "latency"):  # latency: the initial plan meets it, counts are kept
            raise PruneLabError(f"IEE target={target!r} is not one of: params, flops, latency")
        allowed = (WeightUnits if target == "params" else ChannelUnits).CRITERIA
        criterion = criterion or allowed[0]
        if criterion not in allowed:
            raise PruneLabError(f"IEE criterion={criterion!r} is not available for target={target}; "
                                f"choose one of: {', '.join(allowed)}")
        choices = (("grow_init", grow_init, self.GROW_INIT), ("grow_values", grow_values, self.GROW_VALUES),
                   ("mru", mru, self.MRU))
        for key, value, options in choices:
            if value not in options:
                raise PruneLabError(f"IEE {key}={value!r} is not one of: {', '.join(options)}")
        if phase_steps is not None:  # the paper's knob: H = J = Q steps, the cycle count follows the schedule
            if isinstance(phase_steps, bool) or not isinstance(phase_steps, int) or phase_steps < 1:
                raise PruneLabError(f"IEE phase_steps={phase_steps} must be an integer >= 1 (H = J = Q optimizer steps)")
            if any(v is not None for v in (estimate_steps, improve_steps, explore_steps)):
                raise PruneLabError("IEE: give method.phase_steps (H = J = Q) or the three phase lengths, not both")
            estimate_steps = improve_steps = explore_steps = phase_steps
        self.phase_steps = phase_steps  # named in the error when its cycle does not fit
        if ranking not in self.RANKINGS:
            raise PruneLabError(f"IEE ranking={ranking!r} is not one of: {', '.join(self.RANKINGS)}")
        if ranking == "global" and (target != "params" or pattern is not None):
            raise PruneLabError("IEE ranking=global ranks single weights across layers: it needs target=params and "
                                "no N:M pattern (channels and N:M keep per-group counts)")
        if never_active_values not in (None, "zero", "start"):
            raise PruneLabError(f"IEE never_active_values={never_active_values!r} is not one of: zero, start "
                                "(or null: start only when training from the dense reference)")
        if never_active_values is not None:
            keep_start_values = never_active_values == "start"
        self.ranking = ranking
        self.lengths = {}
        for key, value, low in zip(PHASES, (estimate_steps, improve_steps, explore_steps), (1, 0, 1)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (isinstance(value, int) and value < low) or (isinstance(value, float) and value >= 1):
                raise PruneLabError(f"IEE {key}={value} must be an integer >= {low} (optimizer steps), a fraction of "
                                    "training in (0, 1), or null (from method.cycles)")
            self.lengths[key] = value
        if self.lengths and len(self.lengths) != 3:
            raise PruneLabError(f"IEE: give all of {', '.join(PHASES)} or none (null: method.cycles decides); "
                                f"got only {', '.join(self.lengths)}")
        if not self.lengths and (cycles is None or isinstance(cycles, bool) or int(cycles) < 1):
            raise PruneLabError(f"IEE cycles={cycles} must be an integer >= 1 when the phase lengths are null")
        if not 0.0 < float(stop) <= 1.0:
            raise PruneLabError(f"IEE stop={stop} is outside (0, 1]: it is the fraction of training after which "
                                "the structure stays fixed")
        self.pattern = NMPattern.parse(pattern)
        if self.pattern is not None and target != "params":
            raise PruneLabError(f"IEE pattern={pattern} needs target=params, not target={target}")
        self.target, self.criterion, self.cycles, self.improve = target, criterion, cycles, bool(improve)
        self.omega = omega or ExponentialDecay(init=0.3, final=0.01, end=stop)
        self.stop, self.explore, self.freeze_active = float(stop), bool(explore), bool(freeze_active)
        self.grow_init, self.grow_values, self.mru_mode = grow_init, grow_values, mru
        self.keep_start_values = target == "flops" if keep_start_values is None else bool(keep_start_values)
        self.resolved_for = None  # total steps the timeline below was computed for
        self.h = self.j = self.q = self.n = 0
        if self.lengths and all(isinstance(v, int) for v in self.lengths.values()):
            self._split(*self.lengths.values())  # absolute lengths: known before the run length is
        # state (checkpointed)
        self.keep: dict[str, torch.Tensor] | None = None   # Θ_K per layer
        self.mru: dict[str, torch.Tensor] | None = None    # most-recently-used values per parameter
        self.pending: dict = {}                            # units pruned this cycle (per layer or per group)
        self.acc: dict[str, torch.Tensor] | None = None    # gradient-based scores summed over a phase
        self.acc_key: list = []                            # ["prune" | "grow", cycle] they belong to
        self.bn_saved: dict[str, torch.Tensor] | None = None  # BN statistics before this exploration
        self.last_step = -1
        self.record = Turnover()  # a record, not a decision: which units each grow brought back
        # transient
        self.total_steps = 0
        self._frozen_masks = None
        self._saved = None
        self._eval_stash = None

    # -- timeline ---------------------------------------------------------------------------
    def _split(self, h: int, j: int, q: int) -> None:
        # improve=false: the J steps join the estimate phase, so cycles keep their length and count
        self.h, self.j, self.q = (h, j, q) if self.improve else (h + j, 0, q)

    def resolve(self, total_steps: int) -> None:
        """Phase lengths and cycle count for a run of `total_steps`; a one-line error when no
        cycle fits."""
        if self.resolved_for == total_steps:
            return
        span = min(int(self.stop * total_steps), total_steps - 1)
        if not self.lengths:
            length = span // int(self.cycles)
            third = length // 3
            if third < 1:
                raise PruneLabError(f"IEE: method.cycles={self.cycles} cycles of at least 3 steps (estimate, improve, "
                                    f"explore) do not fit before stop={self.stop} of the run's {total_steps} steps "
                                    f"({span} steps); lower method.cycles or train longer")
            self._split(length - 2 * third, third, third)
            self.n = int(self.cycles)
        else:
            steps = [v if isinstance(v, int) else max(round(v * total_steps), 1 if k != "improve_steps" else 0)
                     for k, v in self.lengths.items()]
            self._split(*steps)
            self.n = span // self.cycle
            if self.n == 0:
                knob = (f"method.phase_steps={self.phase_steps}" if self.phase_steps is not None
                        else "method.estimate_steps/improve_steps/explore_steps")
                raise PruneLabError(f"IEE: one cycle (estimate + improve + explore = {self.cycle} steps) does not fit "
                                    f"before stop={self.stop} of the run's {total_steps} steps; lower "
                                    f"{knob}, or set it to null and give method.cycles")
        self.resolved_for = total_steps

    def check_schedule(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        self.resolve(total_steps)

    @property
    def cycle(self) -> int:
        return self.h + self.j + self.q

    def n_cycles(self, total_steps: int) -> int:
        self.resolve(total_steps)
        return self.n

    def phase(self, step: int, total_steps: int) -> str:
        """estimate | improve | explore | train (after the last cycle)."""
        self.resolve(total_steps)
        k, r = divmod(step, self.cycle)
        if k >= self.n:
            return "train"
        if r < self.h:
            return "estimate"
        if r < self.h + self.j or not self.explore:
            return "improve"
        return "explore"

    # -- hooks ------------------------------------------------------------------------------
    def bind(self, model, masks, example_input=None, classifier=None):
        super().bind(model, masks)
        if self.target == "params":
            self.units = WeightUnits(model, masks)
        else:
            self.units = ChannelUnits(model, masks, example_input, classifier)
        params = dict(model.named_parameters())
        if self.mru is None:  # fresh run: bound before the initial mask, so these are the start values
            keep = self.keep_start_values
            self.mru = {n: params[n].detach().clone() if keep else torch.zeros_like(params[n].detach())
                        for n in self.units.maskable()}
        device = next(iter(params.values())).device
        self.mru = {n: v.to(params[n].device) for n, v in self.mru.items()}
        stats = _bn_stats(model)
        if self.bn_saved is not None:
            self.bn_saved = {n: v.to(stats[n].device) for n, v in self.bn_saved.items()}
        if self.target == "params":  # weight-unit state lives with the weights; channel state on CPU
            move = (lambda d: None if d is None else {n: v.to(device) for n, v in d.items()})
            self.keep, self.acc = move(self.keep), move(self.acc)
            self.record.to(device)
            self.pending = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.pending.items()}

    @torch.no_grad()
    def before_forward(self, step, total_steps, optimizers):
        self.total_steps = total_steps
        if step == self.last_step:
            return False
        self.resolve(total_steps)
        self.last_step = step
        k, r = divmod(step, self.cycle)
        n = self.n
        changed = False
        if r == 0 and 1 <= k <= n:
            self._grow(k - 1, optimizers)
            changed = True
        if k < n and r == self.h:
            self._prune(k, self.omega.fraction(step, total_steps), optimizers)
            changed = True
        if k < n and r == self.h + self.j and self.explore:
            self._start_explore(optimizers)
            changed = True
        return changed

    @torch.no_grad()
    def after_backward(self, step, total_steps, optimizers):
        # gradient-based scores are summed over their phase; magnitude is read at the transition
        phase, (k, r) = self.phase(step, total_steps), divmod(step, self.cycle)
        if phase == "train":
            return False
        if self.criterion == "taylor" and phase in ("estimate", "explore"):
            self._accumulate(["prune" if phase == "estimate" else "grow", k], self.units.scores("taylor"))
        elif not self.explore and r >= self.h + self.j:  # the Q steps without exploration
            self._accumulate(["grow", k], self.units.grad_scores())
        return False

    def _accumulate(self, key: list, scores: dict[str, torch.Tensor]) -> None:
        if self.acc is None or self.acc_key != key:
            self.acc, self.acc_key = scores, key
        else:
            self.acc = {layer: self.acc[layer] + s for layer, s in scores.items()}

    def _explore_frozen(self, step) -> bool:
        return self.freeze_active and self.phase(step, self.total_steps) == "explore"

    @torch.no_grad()
    def before_optimizer_step(self, step, optimizer):
        self._saved = None
        if not self._explore_frozen(step):
            return
        # the step may move everything (weight decay, momentum); restore all but Θ_P after it
        self._saved = {id(p): (p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
                                                    if torch.is_tensor(v) and v.shape == p.shape})
                       for p in self.model.parameters()}

    @torch.no_grad()
    def after_optimizer_step(self, step, optimizer):
        if self._saved is None:
            return
        frozen_masks = self._frozen()
        for name, p in self.model.named_parameters():
            value, state = self._saved[id(p)]
            frozen = frozen_masks.get(name)  # True on Θ_K; parameters outside the masks: all frozen
            p.copy_(value if frozen is None else torch.where(frozen, value, p))
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    old = state.get(k, torch.zeros_like(v))  # state created by this very step: was zero
                    v.copy_(old if frozen is None else torch.where(frozen, old, v))
        self._saved = None

    def _frozen(self) -> dict[str, torch.Tensor]:
        if self._frozen_masks is None:
            self._frozen_masks = self.units.param_masks(self.keep)
        return self._frozen_masks

    # -- evaluation and training cost ---------------------------------------------------------
    @torch.no_grad()
    def before_eval(self) -> None:
        """Validation inside an exploration scores the masked network Θ_K with the BN statistics
        it had before exploring; `after_eval` puts the exploration back."""
        if self.bn_saved is None or self._eval_stash is not None:
            return
        params, stats = dict(self.model.named_parameters()), _bn_stats(self.model)
        active = self._frozen()
        self._eval_stash = ({n: params[n].detach().clone() for n in active},
                            {n: v.clone() for n, v in stats.items()})
        for name, m in active.items():
            params[name].mul_(m)
        for name, v in self.bn_saved.items():
            stats[name].copy_(v)

    @torch.no_grad()
    def after_eval(self) -> None:
        if self._eval_stash is None:
            return
        values, saved_stats = self._eval_stash
        params, stats = dict(self.model.named_parameters()), _bn_stats(self.model)
        for name, v in values.items():
            params[name].copy_(v)
        for name, v in saved_stats.items():
            stats[name].copy_(v)
        self._eval_stash = None

    def weight_grad_density(self, step, total_steps, forward):
        phase = self.phase(step, total_steps)
        if phase == "explore" and self.freeze_active:  # only Θ_P's weight gradients are needed
            return {n: 1.0 - m.count_nonzero().double() / m.numel() for n, m in self._frozen().items() if n in forward}
        if phase == "improve" and not self.explore and divmod(step, self.cycle)[1] >= self.h + self.j:
            return {n: 1.0 for n in forward}  # the dense gradient that ranks Θ_P
        return None

    def updated_masks(self, step, total_steps):
        if self._explore_frozen(step):
            return {n: ~m for n, m in self._frozen().items()}
        return None

    def decisions(self):
        return [] if self.keep is None else [self.keep[k] for k in sorted(self.keep)]

    # -- transitions ----------------------------------------------------------------------
    def _scores(self, purpose: str, cycle: int) -> dict[str, torch.Tensor]:
        """Scores for "prune" (of Θ_K) or "grow" (of Θ_P) at the end of `cycle`'s phase."""
        accumulated = self.criterion == "taylor" or (purpose == "grow" and not self.explore)
        if not accumulated:
            return self.units.scores(self.criterion)
        if self.acc is None or self.acc_key != [purpose, cycle]:
            raise RuntimeError(f"IEE has no {purpose} scores for cycle {cycle} (have {self.acc_key})")
        return self.acc

    def _prune(self, cycle: int, omega: float, optimizers) -> None:
        if self.keep is None:
            self.keep = self.units.keep_from_masks()
        scores = self._scores("prune", cycle)
        old = self.units.param_masks(self.keep)
        self.record.start(self.keep)
        if self.ranking == "global":
            total = sum(int(k.sum()) for k in self.keep.values())
            removed_all = _global_pick(scores, self.keep, round(omega * total), highest=False)
            for layer, keep in self.keep.items():
                removed = removed_all[layer]
                if bool((keep & ~removed).sum() == 0):  # a layer never loses its last unit
                    removed = removed & ~highest(scores[layer].to(keep.device), keep, 1)
                self.keep[layer] = keep & ~removed
                self.record.pruned[layer] = removed
            self.pending = {GLOBAL: sum(int(r.sum()) for r in self.record.pruned.values())}
        for layer, keep in self.keep.items() if self.ranking == "layer" else ():
            s = scores[layer].to(keep.device)
            kept = int(keep.sum())
            n = min(round(omega * kept), kept - 1)  # a layer never loses its last unit
            removed = lowest(s, keep, n)
            self.keep[layer] = keep & ~removed
            self.record.pruned[layer] = removed
            # N:M: each group grows back as many as it lost, so the pattern holds after the grow
            self.pending[layer] = self.pattern.group_counts(removed) if self.pattern is not None else n
        new = self.units.param_masks(self.keep)
        params = dict(self.model.named_parameters())
        for name, m in new.items():  # the values they had when last active: their MRU values
            self.mru[name] = torch.where(old[name] & ~m, params[name], self.mru[name])
        self._set_masks(new, {name: old[name] & ~m for name, m in new.items()}, optimizers)

    def _restart_values(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.mru[name] if self.grow_init == "mru" else torch.zeros_like(like)

    def _start_explore(self, optimizers) -> None:
        active = self.units.param_masks(self.keep)
        params = dict(self.model.named_parameters())
        self.bn_saved = {n: v.clone() for n, v in _bn_stats(self.model).items()}
        for name, m in active.items():
            restart = self._restart_values(name, params[name])
            params[name].copy_(torch.where(m, params[name], restart))  # Θ_P back at its MRU values
            self.masks.set(name, torch.ones_like(m))
        for opt in optimizers:
            reset_optimizer_state(opt, params, {name: ~m for name, m in active.items()})
        self._frozen_masks = active

    def _grow(self, cycle: int, optimizers) -> None:
        old = self.units.param_masks(self.keep)
        params = dict(self.model.named_parameters())
        scores = self._scores("grow", cycle)
        before = {layer: keep.clone() for layer, keep in self.keep.items()}
        if self.explore and self.mru_mode == "explored":  # the first implementation's reading
            for name, m in old.items():
                self.mru[name] = torch.where(m, self.mru[name], params[name])
        if self.ranking == "global":  # the same total count back, wherever the scores are highest
            grown_all = _global_pick(scores, {layer: ~keep for layer, keep in self.keep.items()},
                                     int(self.pending.get(GLOBAL, 0)), highest=True)
            for layer, keep in self.keep.items():
                self.keep[layer] = keep | grown_all[layer]
        for layer, keep in self.keep.items() if self.ranking == "layer" else ():
            s, count = scores[layer].to(keep.device), self.pending.get(layer, 0)
            if self.pattern is not None:
                grown = self.pattern.top_per_group(s, count, candidates=~keep)
            else:
                grown = highest(s, ~keep, count)
            self.keep[layer] = keep | grown
        self.pending = {}
        self.record.grown(cycle, before, self.keep)
        new = self.units.param_masks(self.keep)
        for name, m in new.items():
            grown = m & ~old[name]
            if self.grow_values == "zero":
                start = torch.zeros_like(params[name])
            elif self.grow_values == "explored" and self.explore:
                start = params[name]
            else:  # last_active (and without exploration: there are no explored values)
                start = self._restart_values(name, params[name])
            params[name].copy_(torch.where(grown, start, params[name]))
        if self.bn_saved is not None:  # exploration leaves the BN statistics as it found them
            stats = _bn_stats(self.model)
            for name, v in self.bn_saved.items():
                stats[name].copy_(v)
            self.bn_saved = None
        self._set_masks(new, {name: ~m for name, m in old.items()}, optimizers)

    def report(self) -> dict:
        return self.record.report()

    def grown_entries(self):
        # the record counts units: weight entries only when the units are weights
        return sum(row[1] for row in self.record.rows) if self.target == "params" else None

    def _set_masks(self, new: dict[str, torch.Tensor], reset: dict[str, torch.Tensor], optimizers) -> None:
        for name, m in new.items():
            self.masks.set(name, m)
        self.units.set_plan(self.keep)
        self.masks.apply()
        params = dict(self.model.named_parameters())
        for opt in optimizers:
            reset_optimizer_state(opt, params, reset)
        self._frozen_masks = None

    # -- state ----------------------------------------------------------------------------
    def state_dict(self):
        return {"keep": self.keep, "mru": self.mru, "pending": dict(self.pending), "acc": self.acc,
                "acc_key": list(self.acc_key), "last_step": self.last_step, "bn_saved": self.bn_saved,
                "turnover": self.record.state_dict()}

    def load_state_dict(self, state):
        self.keep, self.mru = state["keep"], state["mru"]
        self.pending = {k: v if torch.is_tensor(v) else int(v) for k, v in state["pending"].items()}
        self.acc, self.acc_key, self.last_step = state["acc"], list(state["acc_key"]), int(state["last_step"])
        self.bn_saved = state.get("bn_saved")
        self.record.load_state_dict(state.get("turnover"))
