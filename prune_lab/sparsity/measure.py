"""What a model costs: parameters, nonzero parameters, FLOPs (MACs) and latency.

FLOPs follow DESIGN.md §3: multiply-accumulates of conv and linear layers for one input, i.e.
`torch.utils.flop_counter` divided by 2, so anyone can re-count them from an exported model.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prune_lab.sparsity.masks import PRUNABLE_TYPES


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs for one input (batch of 1), as torch's FLOP counter sees the deployed model."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example_input[:1])
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of each conv/linear layer for one input (every weight is used once per output position)."""
    out: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE_TYPES):
            def hook(mod, inp, o, name=name):
                positions = o[0].numel() // (mod.out_channels if hasattr(mod, "out_channels") else mod.out_features)
                out[name] = mod.weight.numel() * positions
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    model(example_input[:1])
    model.train(was_training)
    for h in hooks:
        h.remove()
    return out


def sparse_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs a sparse kernel would execute: each layer's MACs times its weight density."""
    modules = dict(model.named_modules())
    total = 0.0
    for name, macs in layer_macs(model, example_input).items():
        w = modules[name].weight
        total += macs * int(w.count_nonzero()) / w.numel()
    return int(round(total))


@torch.no_grad()
def latency_ms(model: nn.Module, example_input: torch.Tensor, batch_size: int = 16,
               warmup: int = 3, repeats: int = 10, channels_last: bool = False) -> float:
    """Median wall time of one eval forward at `batch_size`, in milliseconds.

    `channels_last` measures a copy in NHWC layout, the fast path of oneDNN and cuDNN for
    convolutions; thin pruned layers gain the most from it (scripts/bench.py compares)."""
    x = example_input[:1].expand(batch_size, *example_input.shape[1:]).contiguous()
    if channels_last and x.dim() == 4:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    model.train(was_training)
    return statistics.median(times)
