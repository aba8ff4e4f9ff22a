"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", 2016, section 4.2).

Three stages of ``n = (depth - 2) / 6`` BasicBlocks with widths ``w, 2w, 4w`` (``w = 16`` in the
paper), a 3x3 stem, global average pooling and a linear classifier: depth = 6n + 2 layers.

The paper's CIFAR models use "option A" shortcuts (zero-padding identity on downsampling).
We use "option B" (1x1 conv stride 2 + BN) instead: option A's channel padding is a
parameter-free tensor op that channel-pruning tools cannot trace, so pruning a stage's output
channels would break the residual addition. Option B adds ~1-3% parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

from prune_lab.errors import PruneLabError
from prune_lab.models.registry import register_model
from prune_lab.models.init import kaiming_init


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (post-activation, as in the original paper)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; any input of at least 8x8 pixels works."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise PruneLabError(f"CIFAR ResNet depth={depth} is invalid; use 6n+2 (8, 14, 20, 32, 44, 56, 110, ...)")
        if width < 1:
            raise PruneLabError(f"CIFAR ResNet width={width} must be a positive integer (16 in the paper)")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(width, width, blocks, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, blocks, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    """Generic CIFAR ResNet of any depth 6n+2."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(8, num_classes, in_channels, width)


@register_model("resnet14")
def resnet14(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(14, num_classes, in_channels, width)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(20, num_classes, in_channels, width)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(32, num_classes, in_channels, width)


@register_model("resnet44")
def resnet44(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(44, num_classes, in_channels, width)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(56, num_classes, in_channels, width)


@register_model("resnet110")
def resnet110(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return cifar_resnet(110, num_classes, in_channels, width)
