"""Wanda (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
Models"): prune by weights and activations, no weight update. Pure torch.

The score of weight W_ij is S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the L2 norm of input feature j
over all calibration tokens (for a convolution: of im2col column (in, kh, kw) over every output
position of every sample, `obs.unfold_inputs`). Weights are compared per output row ("per output"
in the paper): every row of a layer prunes the same number of its lowest scores. When the layer's
count round(s · numel) does not divide into the rows, the remainder goes one weight each to the rows
whose next candidate has the lowest score, so the layer is exact and rows differ by at most one.
N:M: the N highest scores of every M consecutive weights along the input dimension (`NMPattern`).
"""
from __future__ import annotations

import torch

from prune_lab.sparsity.nm import NMPattern


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X_j‖₂ shaped like `weight`; `sq_norms` (groups, columns): Σ_t X_tj² per group's
    im2col column (`InputStats.sq`)."""
    groups = sq_norms.shape[0]
    norms = sq_norms.sqrt().to(weight.dtype)  # (groups, cols)
    per_row = norms.repeat_interleave(weight.shape[0] // groups, dim=0)  # each row sees its group's columns
    return weight.detach().abs() * per_row.reshape(weight.shape[0], *weight.shape[1:])


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly round(sparsity · numel) lowest scores, compared within each output
    row (dimension 0), the same number per row up to one (see the module docstring). Ties break by
    position (stable sort)."""
    rows = scores.shape[0]
    flat = scores.reshape(rows, -1).float()
    cols = flat.shape[1]
    total = round(sparsity * flat.numel())
    base, extra = divmod(total, rows)
    order = torch.sort(flat, dim=1, stable=True).indices
    per_row = torch.full((rows,), base, dtype=torch.long, device=flat.device)
    if extra:  # the remainder: rows whose next-lowest score is lowest
        nxt = flat.gather(1, order[:, base:base + 1]).squeeze(1)
        per_row[torch.sort(nxt, stable=True).indices[:extra]] += 1
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=flat.device).expand(rows, cols))
    return (rank >= per_row[:, None]).reshape(scores.shape)


def wanda_mask(weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: float = 0.0,
               pattern: NMPattern | None = None) -> torch.Tensor:
    """Wanda's keep-mask for one layer: per-row at `sparsity`, or `pattern` N:M (a layer whose input
    dimension is not a multiple of M stays dense)."""
    scores = wanda_scores(weight, sq_norms)
    return pattern.mask(scores) if pattern is not None else row_mask(scores, sparsity)
