"""Multinomial logistic regression on pixels: the linear baseline for tiny datasets.

It has no hidden channels, so channel pruning finds no prunable groups in it; the pruning
code relies on that to exercise its "nothing to prune" error path.
"""

from __future__ import annotations

from torch import Tensor, nn

from prune_lab.errors import PruneLabError
from prune_lab.models.registry import register_model


class LogReg(nn.Module):
    """Average-pool to ``input_size`` x ``input_size``, flatten, one Linear layer.

    The factory only knows channels, not image size, so the pool fixes the feature count: any
    image size then works, and for images already of ``input_size`` the pool is the identity.
    Average pooling is linear, so the model stays a logistic regression on pixels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int = 16) -> None:
        super().__init__()
        if input_size < 1:
            raise PruneLabError(f"logreg input_size={input_size} must be a positive integer")
        self.pool = nn.AdaptiveAvgPool2d(input_size)
        self.fc = nn.Linear(in_channels * input_size * input_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))


@register_model("logreg")
def logreg(num_classes: int = 10, in_channels: int = 3, input_size: int = 16) -> LogReg:
    return LogReg(num_classes, in_channels, input_size)
