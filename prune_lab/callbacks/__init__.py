"""Pruning paradigms as Lightning callbacks; they call `prune_lab.sparsity` and never each other."""
from prune_lab.callbacks.pruning import MaskUpdate
from prune_lab.callbacks.regrowth import Regrowth
from prune_lab.callbacks.rng import RNGState

__all__ = ["MaskUpdate", "Regrowth", "RNGState"]
