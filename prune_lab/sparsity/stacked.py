"""Many weight variants of one network evaluated in one pass: the variants are stacked along the
channel axis, so `count` candidates of a search cost one forward pass of a `count`-times wider
network made of grouped convolutions (every candidate is one group; no FLOPs are added).

`stack_network(model, count)` returns a copy of `model` in which every Conv2d, Linear and
BatchNorm2d holds `count` copies of its parameters, candidate-major: a (N, C, H, W) activation
becomes (N, count·C, H, W) with candidate p in channels [p·C, (p+1)·C). The model's own forward
runs unchanged, so only channel-agnostic glue is allowed between those layers (ReLU, residual
adds, pooling, flatten after global pooling: every CIFAR/ImageNet ResNet, VGG, WRN here);
`StackingUnsupported` is raised for anything else (other parametrised modules, linear layers on
non-flat inputs), and the caller checks one forward against the original (`matches`) before
trusting it. The network input is shared by all candidates: the first convolution reads it once
(one convolution with count·C_out output channels).

BatchNorm2d of count·C channels computes each channel's batch statistics exactly as a C-channel
one does, so BN re-estimation of the stack gives every candidate its own statistics.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class StackingUnsupported(Exception):
    """The network has a layer the channel stacking cannot represent."""


class StackedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, count: int):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise StackingUnsupported(f"conv padding_mode {conv.padding_mode!r}")
        self.count, self.in_channels, self.groups = count, conv.in_channels, conv.groups
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().repeat(count, 1, 1, 1), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().repeat(count), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.in_channels * self.count:  # stacked input: one group per candidate
            groups = self.groups * self.count
        elif x.shape[1] == self.in_channels:  # the shared network input
            if self.groups == 1:
                groups = 1  # every candidate's filters read the same channels: one wide convolution
            else:
                x, groups = x.repeat(1, self.count, 1, 1), self.groups * self.count
        else:
            raise StackingUnsupported(f"conv input has {x.shape[1]} channels, expected {self.in_channels}·{self.count}")
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


class StackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, count: int):
        super().__init__()
        self.count, self.in_features, self.out_features = count, linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().repeat(count, 1), requires_grad=False)  # (count·K, C)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().repeat(count),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise StackingUnsupported("a linear layer on a non-flat input")
        n = x.shape[0]
        if x.shape[1] == self.in_features * self.count:
            x = x.view(n, self.count, self.in_features)
        elif x.shape[1] == self.in_features:
            x = x.unsqueeze(1).expand(n, self.count, self.in_features)
        else:
            raise StackingUnsupported(f"linear input has {x.shape[1]} features")
        w = self.weight.view(self.count, self.out_features, self.in_features)
        out = torch.einsum("npc,pkc->npk", x, w).reshape(n, self.count * self.out_features)
        return out if self.bias is None else out + self.bias


def _stacked_batch_norm(bn: nn.BatchNorm2d, count: int) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(bn.num_features * count, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    out = out.to(next(iter([*bn.parameters(), *bn.buffers()])).device)
    with torch.no_grad():
        if bn.affine:
            out.weight.copy_(bn.weight.repeat(count))
            out.bias.copy_(bn.bias.repeat(count))
        if bn.track_running_stats:
            out.running_mean.copy_(bn.running_mean.repeat(count))
            out.running_var.copy_(bn.running_var.repeat(count))
    return out.requires_grad_(False)


def stack_network(model: nn.Module, count: int) -> nn.Module:
    """A copy of `model` holding `count` candidates (see the module docstring)."""
    stacked = copy.deepcopy(model)
    for name, module in list(stacked.named_modules()):
        if isinstance(module, nn.Conv2d):
            new = StackedConv2d(module, count)
        elif isinstance(module, nn.Linear):
            new = StackedLinear(module, count)
        elif type(module) is nn.BatchNorm2d:
            new = _stacked_batch_norm(module, count)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise StackingUnsupported(f"layer {name} ({type(module).__name__})")
        else:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(stacked.get_submodule(parent) if parent else stacked, leaf, new)
    return stacked
