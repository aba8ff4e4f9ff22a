"""VGG-16/19 for CIFAR (Simonyan & Zisserman 2015, with BatchNorm after every conv).

The ImageNet VGG's three 4096-wide FC layers are replaced by global average pooling and one
``Linear(512, num_classes)``, the usual CIFAR adaptation (and the one pruning papers report).
"""

from __future__ import annotations

from torch import Tensor, nn

from prune_lab.errors import PruneLabError
from prune_lab.models.registry import register_model
from prune_lab.models.init import kaiming_init

# Channel counts at width 64; "M" is a 2x2 max-pool.
CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise PruneLabError(f"VGG width={width} must be a positive integer (64 in the paper)")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                # ceil_mode keeps a 1x1 map at 1x1 instead of 0x0, so the five pools also accept
                # 16x16 (or odd-sized, e.g. 28x28) inputs; for 32x32 it equals the standard pool.
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            out = int(item) * width // 64
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> VGG:
    return VGG(CFGS["vgg16"], num_classes, in_channels, width)


@register_model("vgg19")
def vgg19(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> VGG:
    return VGG(CFGS["vgg19"], num_classes, in_channels, width)
