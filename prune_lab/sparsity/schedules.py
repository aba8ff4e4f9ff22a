"""When masks change and to what sparsity: schedules as small objects (jaxpruner style).

Steps are optimizer steps of the global batch; `start`/`end` are fractions of the run's total
steps so a schedule means the same thing whatever the epoch count or number of devices.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    def fraction(self, step: int, total_steps: int) -> float:
        s, e = self._bounds(total_steps)
        if e == s:  # no room for a ramp: prune to the full budget at s
            return 1.0 if step >= s else 0.0
        p = min(max((step - s) / (e - s), 0.0), 1.0)
        return 1.0 - (1.0 - p) ** 3
