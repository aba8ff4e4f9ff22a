"""IEE — exploration–exploitation with enhanced saliency (Sun et al., WACV 2025) as a regrowth policy.

The network is split into an active structure Θ_K (trained: exploitation) and an exploration
space Θ_P (masked). Each cycle of H + J + Q optimizer steps:

    estimate (H)  train Θ_K and score it (magnitude: at the end; Taylor: summed over the H steps)
    prune         move the Ω_t lowest-scoring units of each layer's Θ_K to Θ_P, saving their
                  values as their most-recently-used (MRU) values
    improve (J)   train the smaller Θ_K
    explore (Q)   unmask Θ_P at its MRU values, freeze Θ_K (and every other parameter), train Θ_P
                  only, scoring it with the same criterion
    grow          move the Ω_t highest-scoring units of Θ_P back to Θ_K; mask the rest, whose
                  current values become their next MRU values

Ω_t decays exponentially (`omega`, read at each cycle's prune step). Cycles run while they end
before `stop` · total steps; then Θ_K trains alone. Units are single weights (`target: params`;
per-layer counts, so the ERK/uniform distribution of the initial mask is kept) or output channels
of dependency groups (`target: flops`; per-group counts, so the FLOPs of the initial plan are
kept and the exported model is physically shrunk). The phase is a function of the step; Θ_K,
the MRU values, the scores and the pending counts are state, so a checkpoint taken anywhere in
a cycle resumes exactly.

prune_lab's own choices where the paper is silent (METHODS.md §3 [choice]): Ω_0 = 0.3 decaying
to 0.01 at `stop`; the optimizer state of units entering or leaving Θ_K or Θ_P is zeroed; a unit
never active yet has no MRU value: a weight explores from zero, so what it learns in Q steps,
not its random initial value, decides whether it grows, while a channel explores from its value
at fit start, because a channel at zero (zero filter, zero batch-norm scale) is a saddle point
that no gradient leaves (`keep_start_values=true` uses the start values for weights too: right
when they are the dense reference's). Ablations:
  explore=false        the Q steps train Θ_K instead; Θ_P, never trained, is ranked by the
                       magnitude of its dense gradient summed over those steps (RigL's growth
                       signal; channels: Σ (∂L/∂γ)² + (∂L/∂β)² of their batch norms); grown
                       units restart from their MRU values
  freeze_active=false  Θ_K keeps training during explore
  grow_init=zero       grown units start at zero instead of their explored (MRU) values
  improve=false        no improve phase: its J steps join the estimate phase (same cycle count)
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import ChannelGroups, ExponentialDecay, MaskSet
from prune_lab.sparsity.importance import Magnitude, TaylorBN, bn_channel_scores
from prune_lab.sparsity.regrowth import RegrowthPolicy, highest, lowest, reset_optimizer_state


class WeightUnits:
    """Units are single weights of the sparse conv/linear layers; a layer is its weight's name."""

    CRITERIA = ("magnitude", "taylor")

    def __init__(self, model: nn.Module, masks: MaskSet):
        self.params, self.masks = dict(model.named_parameters()), masks

    def maskable(self) -> list[str]:
        return list(self.masks.prunable)

    def keep_from_masks(self) -> dict[str, torch.Tensor]:
        return {n: self.masks[n].clone() for n in self.masks.prunable if n in self.masks.active}

    def param_masks(self, keep) -> dict[str, torch.Tensor]:
        return {n: keep[n] if n in keep else torch.ones_like(self.masks[n]) for n in self.masks.prunable}

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.masks.prunable:
            p = self.params[n]
            if criterion == "magnitude":
                out[n] = p.detach().abs()
            else:  # first-order Taylor |w·∂L/∂w|
                out[n] = torch.zeros_like(p.detach()) if p.grad is None else (p.detach() * p.grad).abs()
        return out

    def grad_scores(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(self.params[n].detach()) if self.params[n].grad is None
                else self.params[n].grad.abs() for n in self.masks.prunable}

    def set_plan(self, keep) -> None:
        pass


class ChannelUnits:
    """Units are output channels of dependency groups; a layer is the group's root module."""

    CRITERIA = ("taylor", "magnitude")

    def __init__(self, model: nn.Module, masks: MaskSet, example_input: torch.Tensor, classifier: nn.Module):
        self.model, self.masks = model, masks
        self.groups = ChannelGroups(model, example_input, ignored=[classifier] if classifier is not None else [])
        if len(self.groups) == 0:
            raise PruneLabError(f"model {type(model).__name__} has no prunable channel groups; use method=iee")

    def maskable(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    def keep_from_masks(self) -> dict[str, torch.Tensor]:
        plan = self.masks.channel_plan
        if not plan:
            raise PruneLabError("structured IEE needs an initial channel plan: pair it with "
                                "MaskUpdate(target=flops) at step 0 (see conf/method/iee_channels.yaml)")
        return {r: plan[r].cpu().clone() for r in self.groups.roots if r in plan}

    def param_masks(self, keep) -> dict[str, torch.Tensor]:
        touched = self.groups.param_masks(keep)
        return {n: touched.get(n, torch.ones_like(p, dtype=torch.bool)) for n, p in self.model.named_parameters()}

    def scores(self, criterion: str) -> dict[str, torch.Tensor]:
        # Taylor: (γ·∂L/∂γ + β·∂L/∂β)² over the group's batch norms; magnitude: L1 of the root filter
        scorer = TaylorBN().channel_scorer() if criterion == "taylor" else Magnitude(p=1).channel_scorer()
        return dict(zip(self.groups.roots, self.groups.scores(scorer)))

    def grad_scores(self) -> dict[str, torch.Tensor]:
        scorer = partial(bn_channel_scores, gate=lambda bn, idx: bn.weight.grad[idx] ** 2 + bn.bias.grad[idx] ** 2)
        return dict(zip(self.groups.roots, self.groups.scores(scorer)))

    def set_plan(self, keep) -> None:
        self.masks.set_channel_plan(keep)


class IEE(RegrowthPolicy):
    """The five-phase loop; see the module docstring. Step counts are optimizer steps of the
    global batch; `stop` and `omega.end` are fractions of training."""

    GROW_INIT = ("mru", "zero")

    def __init__(self, target: str = "params", criterion: str | None = None, estimate_steps: int = 150,
                 improve_steps: int = 150, explore_steps: int = 150, omega=None, stop: float = 0.75,
                 explore: bool = True, freeze_active: bool = True, grow_init: str = "mru", improve: bool = True,
                 keep_start_values: bool | None = None):
        if target not in ("params", "flops"):
            raise PruneLabError(f"IEE target={target!r} is not one of: params, flops")
        allowed = (WeightUnits if target == "params" else ChannelUnits).CRITERIA
        criterion = criterion or allowed[0]
        if criterion not in allowed:
            raise PruneLabError(f"IEE criterion={criterion!r} is not available for target={target}; "
                                f"choose one of: {', '.join(allowed)}")
        if grow_init not in self.GROW_INIT:
            raise PruneLabError(f"IEE grow_init={grow_init!r} is not one of: {', '.join(self.GROW_INIT)}")
        for key, value, low in (("estimate_steps", estimate_steps, 1), ("improve_steps", improve_steps, 0),
                                ("explore_steps", explore_steps, 1)):
            if int(value) < low:
                raise PruneLabError(f"IEE {key}={value} must be an integer >= {low}")
        if not 0.0 < float(stop) <= 1.0:
            raise PruneLabError(f"IEE stop={stop} is outside (0, 1]: it is the fraction of training after which "
                                "the structure stays fixed")
        self.target, self.criterion = target, criterion
        # improve=false: the J steps join the estimate phase, so cycles keep their length and count
        self.h = int(estimate_steps) + (0 if improve else int(improve_steps))
        self.j = int(improve_steps) if improve else 0
        self.q = int(explore_steps)
        self.omega = omega or ExponentialDecay(init=0.3, final=0.01, end=stop)
        self.stop, self.explore, self.freeze_active = float(stop), bool(explore), bool(freeze_active)
        self.grow_init = grow_init
        self.keep_start_values = target == "flops" if keep_start_values is None else bool(keep_start_values)
        # state (checkpointed)
        self.keep: dict[str, torch.Tensor] | None = None   # Θ_K per layer
        self.mru: dict[str, torch.Tensor] | None = None    # most-recently-used values per parameter
        self.pending: dict[str, int] = {}                 # units pruned this cycle, to grow back
        self.acc: dict[str, torch.Tensor] | None = None    # gradient-based scores summed over a phase
        self.acc_key: list = []                            # ["prune" | "grow", cycle] they belong to
        self.last_step = -1
        # transient
        self.total_steps = 0
        self._frozen_masks = None
        self._saved = None

    # -- timeline ---------------------------------------------------------------------------
    @property
    def cycle(self) -> int:
        return self.h + self.j + self.q

    def n_cycles(self, total_steps: int) -> int:
        return min(int(self.stop * total_steps), total_steps - 1) // self.cycle

    def phase(self, step: int, total_steps: int) -> str:
        """estimate | improve | explore | train (after the last cycle)."""
        k, r = divmod(step, self.cycle)
        if k >= self.n_cycles(total_steps):
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
        if self.target == "params":  # weight-unit state lives with the weights; channel state on CPU
            move = (lambda d: None if d is None else {n: v.to(device) for n, v in d.items()})
            self.keep, self.acc = move(self.keep), move(self.acc)

    @torch.no_grad()
    def before_forward(self, step, total_steps, optimizers):
        self.total_steps = total_steps
        if step == self.last_step:
            return False
        if self.n_cycles(total_steps) == 0:
            raise PruneLabError(f"IEE: one cycle (estimate + improve + explore = {self.cycle} steps) does not fit "
                                f"before stop={self.stop} of the run's {total_steps} steps; lower "
                                "method.estimate_steps/improve_steps/explore_steps or train longer")
        self.last_step = step
        k, r = divmod(step, self.cycle)
        n = self.n_cycles(total_steps)
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

    @torch.no_grad()
    def before_optimizer_step(self, step, optimizer):
        self._saved = None
        if not (self.freeze_active and self.phase(step, self.total_steps) == "explore"):
            return
        # the step may move everything (weight decay, momentum); restore all but Θ_P after it
        self._saved = {id(p): (p.detach().clone(), {k: v.clone() for k, v in optimizer.state.get(p, {}).items()
                                                    if torch.is_tensor(v) and v.shape == p.shape})
                       for p in self.model.parameters()}

    @torch.no_grad()
    def after_optimizer_step(self, step, optimizer):
        if self._saved is None:
            return
        if self._frozen_masks is None:
            self._frozen_masks = self.units.param_masks(self.keep)
        for name, p in self.model.named_parameters():
            value, state = self._saved[id(p)]
            frozen = self._frozen_masks.get(name)  # True on Θ_K; parameters outside the masks: all frozen
            p.copy_(value if frozen is None else torch.where(frozen, value, p))
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    old = state.get(k, torch.zeros_like(v))  # state created by this very step: was zero
                    v.copy_(old if frozen is None else torch.where(frozen, old, v))
        self._saved = None

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
        for layer, keep in self.keep.items():
            s = scores[layer].to(keep.device)
            kept = int(keep.sum())
            n = min(round(omega * kept), kept - 1)  # a layer never loses its last unit
            self.keep[layer] = keep & ~lowest(s, keep, n)
            self.pending[layer] = n
        new = self.units.param_masks(self.keep)
        params = dict(self.model.named_parameters())
        for name, m in new.items():
            self.mru[name] = torch.where(old[name] & ~m, params[name], self.mru[name])
        self._set_masks(new, {name: old[name] & ~m for name, m in new.items()}, optimizers)

    def _start_explore(self, optimizers) -> None:
        active = self.units.param_masks(self.keep)
        params = dict(self.model.named_parameters())
        for name, m in active.items():
            params[name].copy_(torch.where(m, params[name], self.mru[name]))  # Θ_P back at its MRU values
            self.masks.set(name, torch.ones_like(m))
        for opt in optimizers:
            reset_optimizer_state(opt, params, {name: ~m for name, m in active.items()})
        self._frozen_masks = active

    def _grow(self, cycle: int, optimizers) -> None:
        old = self.units.param_masks(self.keep)
        params = dict(self.model.named_parameters())
        scores = self._scores("grow", cycle)
        if self.explore:
            for name, m in old.items():  # every explored unit's value now is its most recent one
                self.mru[name] = torch.where(m, self.mru[name], params[name])
        for layer, keep in self.keep.items():
            s = scores[layer].to(keep.device)
            self.keep[layer] = keep | highest(s, ~keep, self.pending.get(layer, 0))
        self.pending = {}
        new = self.units.param_masks(self.keep)
        for name, m in new.items():
            grown = m & ~old[name]
            start = self.mru[name] if self.grow_init == "mru" else torch.zeros_like(params[name])
            params[name].copy_(torch.where(grown, start, params[name]))
        self._set_masks(new, {name: ~m for name, m in old.items()}, optimizers)

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
                "acc_key": list(self.acc_key), "last_step": self.last_step}

    def load_state_dict(self, state):
        self.keep, self.mru = state["keep"], state["mru"]
        self.pending = {k: int(v) for k, v in state["pending"].items()}
        self.acc, self.acc_key, self.last_step = state["acc"], list(state["acc_key"]), int(state["last_step"])
