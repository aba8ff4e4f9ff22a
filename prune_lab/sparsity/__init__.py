"""The pure-torch sparsity engine (no Lightning, no Hydra): masks, channel groups, criteria,
allocations, schedules and measurements."""
from prune_lab.sparsity.allocation import (erk_allocation, exact_counts, layer_sparsities, masks_from_counts,
                                          masks_from_scores, uniform_allocation)
from prune_lab.sparsity.calibration import calibration_batches, recalibrate_bn, top1_accuracy
from prune_lab.sparsity.importance import IMPORTANCES, Importance, build_importance
from prune_lab.sparsity.masks import MaskSet, prunable_weights
from prune_lab.sparsity.measure import count_flops, count_nonzero, count_params, latency_ms, sparse_flops
from prune_lab.sparsity.regrowth import DropGrow, RegrowthPolicy
from prune_lab.sparsity.schedules import CosineDecay, Cubic, ExponentialDecay, OneShot, Stepwise
from prune_lab.sparsity.structure import ChannelGroups, FlopsModel, shrink, solve_flops_target

__all__ = [
    "MaskSet", "prunable_weights", "Importance", "IMPORTANCES", "build_importance",
    "erk_allocation", "uniform_allocation", "layer_sparsities", "masks_from_scores", "masks_from_counts",
    "exact_counts", "calibration_batches", "recalibrate_bn", "top1_accuracy",
    "OneShot", "Stepwise", "Cubic", "CosineDecay", "ExponentialDecay", "RegrowthPolicy", "DropGrow",
    "ChannelGroups", "FlopsModel", "shrink", "solve_flops_target",
    "count_params", "count_nonzero", "count_flops", "sparse_flops", "latency_ms",
]
