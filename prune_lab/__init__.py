"""prune_lab: a research framework for neural-network pruning."""

from prune_lab.errors import PruneLabError

__all__ = ["PruneLabError"]
__version__ = "0.1.0"
