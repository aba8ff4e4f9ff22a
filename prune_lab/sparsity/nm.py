"""N:M sparsity (NVIDIA's 2:4 and friends): in every group of M consecutive weights along a layer's
input dimension, exactly N are kept.

"Along the input dimension" is what sparse tensor cores accelerate: a Linear weight (out, in) is
grouped along `in`; a conv weight (out, in, kh, kw) is grouped along `in` at each (out, kh, kw)
position (the layout of the implicit GEMM). A layer whose input dimension is not a multiple of M
(a stem with 1 or 3 input channels, usually) cannot hold the pattern: it is kept dense, and the
callbacks that use a pattern list such layers in results.json (`pattern.dense_layers`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_lab.errors import PruneLabError


@dataclass(frozen=True)
class NMPattern:
    n: int
    m: int

    @classmethod
    def parse(cls, text) -> "NMPattern | None":
        """'2:4' -> NMPattern(2, 4); None/'' -> None; anything else: one-line error."""
        if text in (None, "", "none", "null"):
            return None
        parts = str(text).split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            n = m = 0
        if len(parts) != 2 or not 0 < n < m:
            raise PruneLabError(f"method.pattern={text!r} is not an N:M pattern with 0 < N < M; e.g. 2:4, 1:4, 4:8")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.dim() >= 2 and weight.shape[1] % self.m == 0

    # -- groups: a (groups, M) view and back -------------------------------------------------
    def groups(self, t: torch.Tensor) -> torch.Tensor:
        """(G, M) copy of `t` whose rows are the groups of M consecutive input-dimension entries."""
        moved = t.movedim(1, -1) if t.dim() > 2 else t  # conv: (out, kh, kw, in)
        return moved.reshape(-1, self.m)

    def ungroup(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() > 2:
            shape = (like.shape[0], *like.shape[2:], like.shape[1])
            return g.reshape(shape).movedim(-1, 1).contiguous()
        return g.reshape(like.shape)

    def group_counts(self, t: torch.Tensor) -> torch.Tensor:
        """Nonzeros (or True entries) per group."""
        return (self.groups(t) != 0).sum(dim=1)

    # -- selection ---------------------------------------------------------------------------
    def top_per_group(self, scores: torch.Tensor, k: torch.Tensor | int, candidates: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Bool mask shaped like `scores`: in each group, the `k` (per group or one int) highest
        scores among `candidates` (all when None). Ties break by position (stable sort)."""
        s = self.groups(scores.float())
        if candidates is not None:
            s = torch.where(self.groups(candidates), s, torch.full_like(s, float("-inf")))
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(self.m, device=s.device).expand_as(order))
        k = torch.as_tensor(k, device=s.device).reshape(-1, 1) if torch.is_tensor(k) else k
        return self.ungroup(rank < k, scores)

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Keep the N highest scores of every group (all True where the layer does not fit)."""
        if not self.fits(scores):
            return torch.ones_like(scores, dtype=torch.bool)
        return self.top_per_group(scores, self.n)

    def holds(self, weight: torch.Tensor) -> bool:
        """True when every group of `weight` has at most N nonzeros (exactly N for the masks)."""
        return bool((self.group_counts(weight) <= self.n).all())


def nm_masks(scores: dict[str, torch.Tensor], pattern: NMPattern) -> dict[str, torch.Tensor]:
    """Keep-masks holding `pattern` in every layer that fits it; the others stay dense."""
    return {n: pattern.mask(s) for n, s in scores.items()}


def unfit_layers(weights: dict[str, torch.Tensor], pattern: NMPattern) -> list[str]:
    return [n for n, w in weights.items() if not pattern.fits(w)]
