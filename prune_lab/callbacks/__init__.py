"""Pruning paradigms as Lightning callbacks; they call `prune_lab.sparsity` and never each other."""
from prune_lab.callbacks.checkpoint import ResumableCheckpoint
from prune_lab.callbacks.cost import TrainCost
from prune_lab.callbacks.distillation import Distillation
from prune_lab.callbacks.post_training import (LayerwiseReconstruction, OneShotMagnitude, RecalibrateBN, SparseGPT,
                                              Wanda)
from prune_lab.callbacks.pruning import BNScalePenalty, GroupNormPenalty, KeepMasks, MaskUpdate
from prune_lab.callbacks.quiet_steps import QuietSteps
from prune_lab.callbacks.regrowth import Regrowth
from prune_lab.callbacks.reparam import DynamicSparsity, LinearExpansion
from prune_lab.callbacks.rng import RNGState
from prune_lab.callbacks.search import LayerSparsitySearch

__all__ = ["BNScalePenalty", "Distillation", "DynamicSparsity", "GroupNormPenalty", "LayerSparsitySearch",
           "KeepMasks", "LayerwiseReconstruction",
           "LinearExpansion", "MaskUpdate", "OneShotMagnitude", "RNGState", "RecalibrateBN", "Regrowth",
           "QuietSteps", "ResumableCheckpoint", "SparseGPT", "TrainCost", "Wanda"]
