"""Pruning paradigms as Lightning callbacks; they call `prune_lab.sparsity` and never each other."""
from prune_lab.callbacks.distillation import Distillation
from prune_lab.callbacks.post_training import LayerwiseReconstruction, OneShotMagnitude, RecalibrateBN
from prune_lab.callbacks.pruning import MaskUpdate
from prune_lab.callbacks.reparam import DynamicSparsity
from prune_lab.callbacks.rng import RNGState
from prune_lab.callbacks.search import LayerSparsitySearch

__all__ = ["MaskUpdate", "RNGState", "Distillation", "DynamicSparsity", "LayerSparsitySearch", "OneShotMagnitude",
           "RecalibrateBN", "LayerwiseReconstruction"]
