"""Pruning paradigms as Lightning callbacks; they call `prune_lab.sparsity` and never each other."""
from prune_lab.callbacks.distillation import Distillation
from prune_lab.callbacks.pruning import BNScalePenalty, MaskUpdate
from prune_lab.callbacks.reparam import LinearExpansion
from prune_lab.callbacks.rng import RNGState

__all__ = ["BNScalePenalty", "Distillation", "LinearExpansion", "MaskUpdate", "RNGState"]
