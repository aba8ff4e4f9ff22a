"""Weight initialisation shared by the CIFAR-style models."""
from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """He et al.'s scheme (Kaiming normal, fan_out) for convolutions; BN as identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
