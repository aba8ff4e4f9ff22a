"""When masks change and to what sparsity: schedules as small objects (jaxpruner style).

Steps are optimizer steps of the global batch; `start`/`end` are fractions of the run's total
steps so a schedule means the same thing whatever the epoch count or number of devices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from prune_lab.errors import PruneLabError


@dataclass
class OneShot:
    """Prune once to the full budget at `at` (fraction of training, 0 = before the first step)."""

    at: float = 0.0

    def update_step(self, total_steps: int) -> int:
        return int(round(self.at * total_steps))

    def is_update(self, step: int, total_steps: int) -> bool:
        return step == self.update_step(total_steps)

    def fraction(self, step: int, total_steps: int) -> float:
        """Fraction of the final budget that should be reached at `step`."""
        return 1.0 if step >= self.update_step(total_steps) else 0.0


@dataclass
class Cubic:
    """Gradual magnitude pruning (Zhu & Gupta 2017): s_t = s_f·(1 − (1 − p)³), p the progress
    from `start` to `end`, masks updated every `every` steps."""

    start: float = 0.0
    end: float = 0.75
    every: int = 10

    def _bounds(self, total_steps: int) -> tuple[int, int]:
        # both ends within training (last step = total_steps - 1), so the final budget is reached
        last = max(total_steps - 1, 0)
        s = min(int(round(self.start * total_steps)), last)
        e = min(last, int(round(self.end * total_steps)))
        return s, max(s, e)

    def is_update(self, step: int, total_steps: int) -> bool:
        s, e = self._bounds(total_steps)
        return s <= step <= e and ((step - s) % self.every == 0 or step == e)

    def check(self, total_steps: int) -> None:
        """Refuse a ramp that does not fit a run of `total_steps` optimizer steps."""
        start, end = float(self.start), float(self.end)
        if not 0.0 <= start < end <= 1.0:
            raise PruneLabError(f"GMP start={self.start}, end={self.end} (method.start, method.end): need "
                                "0 <= start < end <= 1, fractions of training")
        if int(self.every) < 1:
            raise PruneLabError(f"GMP every={self.every} (method.every) must be a positive number of optimizer steps")
        s, e = self._bounds(total_steps)
        if e <= s:
            raise PruneLabError(f"GMP ramp from start={self.start} to end={self.end} of this run's {total_steps} "
                                f"optimizer steps is empty (step {s} to {e}); widen method.start..method.end "
                                "or train more epochs")

    def fraction(self, step: int, total_steps: int) -> float:
        s, e = self._bounds(total_steps)
        if e == s:  # no room for a ramp: prune to the full budget at s
            return 1.0 if step >= s else 0.0
        p = min(max((step - s) / (e - s), 0.0), 1.0)
        return 1.0 - (1.0 - p) ** 3


@dataclass
class Stepwise:
    """Prune in `steps` equal slices of the budget, one every `every` optimizer steps: at steps
    0, every, 2·every, ... the target is (k + 1)/steps of the budget. HALP (Shen et al. 2022) prunes
    this way, a lower latency target every r minibatches with the saliency re-estimated on the
    minibatches in between, then fine-tunes; steps=1 is the one-shot prune at step 0 (`OneShot()`)."""

    steps: int = 1
    every: int = 40

    @property
    def last_step(self) -> int:
        """The optimizer step of the last prune step."""
        return (int(self.steps) - 1) * int(self.every)

    def is_update(self, step: int, total_steps: int) -> bool:
        return step % max(int(self.every), 1) == 0 and step // max(int(self.every), 1) < int(self.steps)

    def check(self, total_steps: int) -> None:
        if int(self.steps) < 1 or int(self.every) < 1:
            raise PruneLabError(f"prune steps={self.steps}, every={self.every} (method.prune_steps, method.prune_every) "
                                "must both be positive")
        last = self.last_step
        if last >= total_steps:
            raise PruneLabError(f"the last of {self.steps} prune steps every {self.every} optimizer steps (step {last}) "
                                f"falls outside this run's {total_steps} steps; lower method.prune_steps or "
                                "method.prune_every, or train more epochs")

    def fraction(self, step: int, total_steps: int) -> float:
        return min(step // max(int(self.every), 1) + 1, int(self.steps)) / int(self.steps)


# -- drop-fraction schedules of dynamic sparse training ----------------------------------------
def _check_decay(name: str, init: float, every: int, end: float) -> None:
    if not 0.0 < float(init) <= 1.0:
        raise PruneLabError(f"{name}.init={init} is outside (0, 1]: it is the fraction of active units moved")
    if int(every) < 1:
        raise PruneLabError(f"{name}.every={every} must be a positive number of optimizer steps")
    if not 0.0 < float(end) <= 1.0:
        raise PruneLabError(f"{name}.end={end} is outside (0, 1]: it is the fraction of training after which "
                            "the structure stays fixed")


class _Decay:
    """Shared timing: updates every `every` optimizer steps, strictly after step 0 (where the
    initial mask is made) and strictly before `end` · total steps (RigL's t < T_end)."""

    init: float
    every: int
    end: float

    def end_step(self, total_steps: int) -> int:
        return max(int(self.end * total_steps), 1)

    def is_update(self, step: int, total_steps: int) -> bool:
        return 0 < step < self.end_step(total_steps) and step % self.every == 0

    def check(self, total_steps: int) -> None:
        """Refuse a schedule with no update in a run of `total_steps` optimizer steps."""
        end_step = self.end_step(total_steps)
        if int(self.every) >= end_step:
            raise PruneLabError(f"mask updates every {self.every} optimizer steps (method.every) until stop={self.end} "
                                f"of training (step {end_step} of this run's {total_steps}) never happen; set "
                                f"method.every below {end_step}, a later method.stop or more epochs")

    def progress(self, step: int, total_steps: int) -> float:
        return min(max(step / self.end_step(total_steps), 0.0), 1.0)


@dataclass
class CosineDecay(_Decay):
    """RigL's drop fraction (Evci et al. 2020): f(t) = init/2 · (1 + cos(π t / t_end))."""

    init: float = 0.3
    every: int = 100
    end: float = 0.75

    def __post_init__(self):
        _check_decay("CosineDecay", self.init, self.every, self.end)

    def fraction(self, step: int, total_steps: int) -> float:
        return self.init / 2 * (1 + math.cos(math.pi * self.progress(step, total_steps)))


@dataclass
class ExponentialDecay(_Decay):
    """f(t) = init · (final/init)^(t / t_end): `init` at step 0, `final` at `end` (IEE's Ω_t)."""

    init: float = 0.3
    final: float = 0.01
    every: int = 100
    end: float = 0.75

    def __post_init__(self):
        _check_decay("ExponentialDecay", self.init, self.every, self.end)
        if not 0.0 < float(self.final) <= float(self.init):
            raise PruneLabError(f"ExponentialDecay.final={self.final} must be in (0, init={self.init}]")

    def fraction(self, step: int, total_steps: int) -> float:
        return self.init * (self.final / self.init) ** self.progress(step, total_steps)
