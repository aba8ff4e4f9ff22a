"""Wide ResNets (Zagoruyko & Komodakis, "Wide Residual Networks", 2016).

WRN-d-k: a 16-channel 3x3 stem, three stages of ``(d - 4) / 6`` pre-activation basic blocks
with widths ``16k, 32k, 64k`` (strides 1, 2, 2), then BN-ReLU, global average pooling and a
linear classifier. Dropout between the two convs of a block is off by default.
"""

from __future__ import annotations

from torch import Tensor, nn

from prune_lab.errors import PruneLabError
from prune_lab.models.registry import register_model
from prune_lab.models.init import kaiming_init


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, plus a shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.project = stride != 1 or in_planes != planes
        # No BN on the projection: in a pre-activation net the next block normalises the sum.
        self.shortcut: nn.Module = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if self.project else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        # When the shape changes the projection reads the pre-activated input, as in the
        # authors' reference implementation; identity shortcuts keep the raw input.
        residual = self.shortcut(pre) if self.project else x
        out = self.conv1(pre)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    def __init__(
        self, depth: int = 22, widen: int = 2, num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise PruneLabError(f"WideResNet depth={depth} is invalid; use 6n+4 (10, 16, 22, 28, 40, ...)")
        if widen < 1:
            raise PruneLabError(f"WideResNet widen={widen} must be a positive integer")
        if not 0.0 <= drop_rate < 1.0:
            raise PruneLabError(f"WideResNet drop_rate={drop_rate} is outside [0, 1)")
        blocks = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_stage(16, widths[0], blocks, 1, drop_rate)
        self.layer2 = self._make_stage(widths[0], widths[1], blocks, 2, drop_rate)
        self.layer3 = self._make_stage(widths[1], widths[2], blocks, 2, drop_rate)
        # Pre-activation blocks end on a conv, so the trunk needs a final BN-ReLU.
        self.bn = nn.BatchNorm2d(widths[2])
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int, drop_rate: float) -> nn.Sequential:
        layers = [PreActBlock(in_planes, planes, stride, drop_rate)]
        layers += [PreActBlock(planes, planes, 1, drop_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        kaiming_init(self)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.act(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


def wide_resnet(
    depth: int, widen: int, num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0
) -> WideResNet:
    """Generic WRN-depth-widen."""
    return WideResNet(depth, widen, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)


@register_model("wrn16_8")
def wrn16_8(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return wide_resnet(16, 8, num_classes, in_channels, drop_rate)


@register_model("wrn22_2")
def wrn22_2(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return wide_resnet(22, 2, num_classes, in_channels, drop_rate)


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    return wide_resnet(28, 10, num_classes, in_channels, drop_rate)
