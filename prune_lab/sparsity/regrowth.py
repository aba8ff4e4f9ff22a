"""Dynamic sparse training, the pure-torch half: which units move between the active set and the
pruned set, and the policies that decide when (RigL, SET). No Lightning here: the `Regrowth`
callback (prune_lab/callbacks/regrowth.py) calls a policy's hooks at fixed moments of each
optimizer step; tests can drive a policy with a plain loop.

Every move is per layer and count-preserving (as many units grow as were dropped), so each
layer keeps the density its initial allocation (ERK or uniform) gave it and the global
sparsity stays exactly the budget. Decisions depend only on all-reduced gradients, weights that
are identical on every rank, stable sorts and generators seeded by (seed, step): under DDP every
rank takes the same decisions without communicating.
"""
from __future__ import annotations

import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.masks import MaskSet
from prune_lab.sparsity.schedules import CosineDecay


# -- selection ------------------------------------------------------------------------------------
def _pick(scores: torch.Tensor, candidates: torch.Tensor, n: int, highest: bool) -> torch.Tensor:
    if n > int(candidates.sum()):
        raise ValueError(f"cannot pick {n} units among {int(candidates.sum())} candidates")
    out = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n > 0:
        fill = float("-inf") if highest else float("inf")
        s = torch.where(candidates, scores.float(), torch.full_like(scores, fill, dtype=torch.float))
        # stable: ties break by position, the same way on every run and every rank
        out[torch.sort(s.flatten(), descending=highest, stable=True).indices[:n]] = True
    return out.view_as(scores)


def lowest(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the `n` lowest-scoring entries among `candidates` (a bool mask)."""
    return _pick(scores, candidates, n, highest=False)


def highest(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the `n` highest-scoring entries among `candidates` (a bool mask)."""
    return _pick(scores, candidates, n, highest=True)


def drop_and_grow(keep: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the `n` lowest `drop_scores` among kept units, grow the `n` highest `grow_scores`
    among the others. A unit dropped and grown back in the same update simply stays (RigL).
    Returns (new keep mask, units removed, units added); the kept count is unchanged."""
    after_drop = keep & ~lowest(drop_scores, keep, n)
    new = after_drop | highest(grow_scores, ~after_drop, n)
    return new, keep & ~new, new & ~keep


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, step): the same random draws on every rank and on resume."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                          where: dict[str, torch.Tensor]) -> None:
    """Zero momentum-like state at the entries `where[name]` marks: a regrown unit starts without
    the history of its previous life (`MaskSet.mask_optimizer_state` clears masked entries)."""
    by_id = {id(p): n for n, p in params.items()}
    for p, state in optimizer.state.items():
        name = by_id.get(id(p))
        if name not in where:
            continue
        for v in state.values():
            if torch.is_tensor(v) and v.shape == p.shape:
                v.masked_fill_(where[name].to(v.device), 0)


# -- policies ----------------------------------------------------------------------------------------
class RegrowthPolicy:
    """What the `Regrowth` callback drives, once per optimizer step `step` of `total_steps`:

        before_forward        structural changes that need no gradient of this batch
        after_backward        this batch's gradients are in `.grad`: dense (masked weights get
                              gradients too) and, under DDP, already all-reduced
        before_optimizer_step / after_optimizer_step   around `optimizer.step()`

    The two first return True when the structure changed (the callback then checks that every
    rank agrees). `bind` runs at fit start, after a checkpoint's state was loaded.
    """

    def bind(self, model: nn.Module, masks: MaskSet, example_input: torch.Tensor | None = None,
             classifier: nn.Module | None = None) -> None:
        self.model, self.masks = model, masks

    def before_forward(self, step: int, total_steps: int, optimizers) -> bool:
        return False

    def after_backward(self, step: int, total_steps: int, optimizers) -> bool:
        return False

    def before_optimizer_step(self, step: int, optimizer) -> None:
        pass

    def after_optimizer_step(self, step: int, optimizer) -> None:
        pass

    def decisions(self) -> list[torch.Tensor]:
        """Decision state beyond the MaskSet that every rank must hold identically."""
        return []

    def check_schedule(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Raise PruneLabError (one line) when the policy cannot run in `total_steps` steps; called
        before anything is written."""

    def before_eval(self) -> None:
        """Validation during training is about to run on the current parameters."""

    def after_eval(self) -> None:
        pass

    # -- training cost (RigL's accounting, `prune_lab.sparsity.cost`) -------------------------------
    def weight_grad_density(self, step: int, total_steps: int, forward: dict[str, float]) -> dict[str, float] | None:
        """Density of the weight gradient this step computes per layer; None: that of the forward pass."""
        return None

    def updated_masks(self, step: int, total_steps: int) -> dict[str, torch.Tensor] | None:
        """Entries this step's optimizer update trained; None: the MaskSet's masks after the step."""
        return None

    def grown_entries(self) -> int | None:
        """Weight entries moved into the active set so far (None: not counted, or the units are not
        weights): the callback reports them per weight active at the end, comparable across methods."""
        return None

    def report(self) -> dict:
        """What the policy records about its decisions, merged into results.json's `train`."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DropGrow(RegrowthPolicy):
    """RigL (`grow="gradient"`, Evci et al. 2020) and SET (`grow="random"`, Mocanu et al. 2018).

    At each update of `schedule` (default: every 100 steps until 75 % of training, drop fraction
    cosine-decayed from 0.3), every sparse layer drops the fraction f(t) of its active weights
    with the smallest |w| and grows as many among its inactive weights: those with the largest
    |∂L/∂w| of the dense gradient (RigL) or uniformly at random (SET). Grown weights start at
    zero with zeroed optimizer state. Layers left dense by the allocation are not touched.
    """

    GROW = ("gradient", "random")

    def __init__(self, grow: str = "gradient", schedule=None, seed: int = 0):
        if grow not in self.GROW:
            raise PruneLabError(f"grow={grow!r} is not a grow criterion; choose one of: {', '.join(self.GROW)}")
        self.grow, self.schedule, self.seed = grow, schedule or CosineDecay(), int(seed)
        self.last_update_step = -1
        self.updates = 0
        self.grown: int | None = 0  # None: resumed from a checkpoint written before it was counted

    def check_schedule(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """SET/RigL: at least one drop-and-grow update before `stop` in a run of `total_steps`."""
        if hasattr(self.schedule, "check"):
            self.schedule.check(total_steps)

    @torch.no_grad()
    def after_backward(self, step, total_steps, optimizers):
        if step == self.last_update_step or not self.schedule.is_update(step, total_steps):
            return False
        fraction = self.schedule.fraction(step, total_steps)
        params = dict(self.model.named_parameters())
        generator = step_generator(self.seed, step)
        moved = {}
        for name in self.masks.prunable:  # fixed order: random draws line up on every rank
            if name not in self.masks.active:
                continue  # dense layer: nothing to grow into
            p, keep = params[name], self.masks[name]
            if self.grow == "gradient":
                if p.grad is None:
                    raise RuntimeError(f"RigL growth needs the gradient of {name}; it has none")
                grow_scores = p.grad.abs()
            else:
                grow_scores = torch.rand(p.shape, generator=generator).to(p.device)
            n = round(fraction * int(keep.sum()))
            new, removed, added = drop_and_grow(keep, p.detach().abs(), grow_scores, n)
            p.masked_fill_(added, 0.0)  # regrown weights start at zero (RigL, SET)
            if self.grown is not None:
                self.grown += int(added.sum())
            self.masks.set(name, new)
            moved[name] = removed | added
        self.masks.apply()
        for opt in optimizers:
            reset_optimizer_state(opt, params, moved)
        self.last_update_step, self.updates = step, self.updates + 1
        return True

    def weight_grad_density(self, step, total_steps, forward):
        if self.grow == "gradient" and self.schedule.is_update(step, total_steps):
            return {n: 1.0 for n in forward}  # RigL: the dense gradient, once every ΔT steps
        return None

    def grown_entries(self):
        return self.grown

    def state_dict(self):
        return {"last_update_step": self.last_update_step, "updates": self.updates, "grown": self.grown}

    def load_state_dict(self, state):
        self.last_update_step, self.updates = int(state["last_update_step"]), int(state["updates"])
        self.grown = state.get("grown")
