"""What a model costs: parameters, nonzero parameters, FLOPs (MACs) and latency as served.

FLOPs follow DESIGN.md §3: multiply-accumulates of conv and linear layers for one input, i.e.
`torch.utils.flop_counter` divided by 2, so anyone can re-count them from an exported model.
"""
from __future__ import annotations

import copy
import logging
import statistics
import time

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.utils.flop_counter import FlopCounterMode

from prune_lab import quiet
from prune_lab.sparsity.masks import PRUNABLE_TYPES

log = logging.getLogger(__name__)


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
@torch.no_grad()
def observe_forward(model: nn.Module, example_input: torch.Tensor, hooks: dict[nn.Module, object]) -> None:
    """One eval-mode forward of one input with `hooks` (module → forward hook) attached: how shapes
    and costs are read off a model. Hooks are removed and the model's mode restored afterwards."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs of each conv/linear layer for one input (every weight is used once per output position)."""
    out: dict[str, int] = {}

    def hook_for(name):
        def hook(mod, inp, o):
            positions = o[0].numel() // (mod.out_channels if hasattr(mod, "out_channels") else mod.out_features)
            out[name] = mod.weight.numel() * positions
        return hook
    observe_forward(model, example_input,
                    {m: hook_for(n) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)})
    return out


def sparse_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs a sparse kernel would execute: torch's count with each conv/linear layer's MACs times its
    weight density. What the counter sees beyond those layers (a transformer's attention matmuls)
    stays in at full cost, so a dense model's sparse FLOPs are its FLOPs (for CNNs, the layers'
    sum, as before)."""
    modules = dict(model.named_modules())
    skipped = 0.0
    for name, macs in layer_macs(model, example_input).items():
        w = modules[name].weight
        skipped += macs * (1.0 - int(w.count_nonzero()) / w.numel())
    return int(round(count_flops(model, example_input) - skipped))


def inference_copy(model: nn.Module, channels_last: bool = True, fold_bn: bool = True) -> tuple[nn.Module, bool]:
    """An eval-mode copy of `model` as it would be served, and whether BN was folded.

    `fold_bn` folds every BatchNorm that directly follows a conv or linear layer into its weights
    (torch.fx's `fuse`): BN is memory-bound, so it costs a thin pruned network relatively more
    than a wide dense one. Models that torch.fx cannot trace keep their BN (False is returned).
    `channels_last` stores conv weights in NHWC, the fast path of oneDNN and cuDNN."""
    copy_ = copy.deepcopy(model).eval()
    folded = False
    if fold_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copy_.modules()):
        try:
            copy_ = fx_fuse(copy_, inplace=True)
            folded = True
        except Exception as e:  # noqa: BLE001 - tracing fails in many model-specific ways
            log.warning("BN not folded for latency: torch.fx cannot trace %s (%s)", type(model).__name__,
                        str(e).splitlines()[0][:120])
    if channels_last:
        copy_ = copy_.to(memory_format=torch.channels_last)
    return copy_, folded


@torch.no_grad()
def interleaved_latency_ms(models: dict[str, nn.Module], x: torch.Tensor, warmup: int = 3,
                           repeats: int = 10) -> dict[str, list[float]]:
    """Wall times (ms) of one forward of each model on `x`, `repeats` rounds, the models taking
    turns within a round (in alternating order), so that drift of the machine hits all alike."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    with quiet.measuring():  # other jobs sharing the quiet lock pause their batches meanwhile
        for m in models.values():
            for _ in range(warmup):
                m(x)
        for r in range(repeats):
            for k in (names if r % 2 == 0 else names[::-1]):
                sync()
                t0 = time.perf_counter()
                models[k](x)
                sync()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


_CONTENTION_WARNED = False


def compile_for_inference(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`torch.compile` (Inductor) with the weights frozen as constants, compiled now for `x`'s
    shape: BN folded, convolutions with fused epilogues (ReLU, residual add), prepacked weights.
    Deploying several models for one comparison: reset dynamo's cache (`torch._dynamo.reset()`)
    before the group, not between its members, or the earlier ones recompile unfrozen when run."""
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        compiled = torch.compile(model, dynamic=False)
        compiled(x)
    return compiled


def runnable_others() -> int | None:
    """Threads runnable on this machine right now besides this process's (Linux /proc/loadavg's 4th
    field, "running/total", less torch's intra-op threads); None where it cannot be read. A latency measured while others run
    shares cores, caches and memory bandwidth with them (two study jobs beside the quick start
    made its 0.73 ms read 175 ms)."""
    try:
        with open("/proc/loadavg") as f:
            # the count is of threads: this process's own intra-op threads may be spinning (runnable) too
            return max(0, int(f.read().split()[3].split("/")[0]) - torch.get_num_threads())
    except (OSError, ValueError, IndexError):
        return None


def contention(samples: list[int | None]) -> dict:
    """Whether the measurement shared the CPU: more runnable work than cores at any sample."""
    import os

    seen = [s for s in samples if s is not None]
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    others = max(seen) if seen else None
    return {"runnable_others": others, "cores": cores, "threads": threads,
            "contended": others is not None and others + threads > cores}


def latency_ms(models: dict[str, nn.Module], example_input: torch.Tensor, batch_size: int = 16,
               warmup: int = 3, repeats: int = 10, channels_last: bool = False, fold_bn: bool = False,
               compile: bool = False) -> tuple[dict[str, float], dict[str, bool]]:
    """Median wall time (ms) of one eval forward at `batch_size` of each model, measured
    interleaved on copies prepared by `inference_copy` (and `compile_for_inference` with
    `compile`); the models themselves are not touched. Also returns what was applied to every
    model: {"bn_folded": .., "compiled": ..} (compilation falls back to eager with a warning), and
    each model's fastest round ("min_ms"): on a shared machine interference only ever adds time,
    so the minimum is the robust figure for a latency budget."""
    x = example_input[:1].expand(batch_size, *example_input.shape[1:]).contiguous()
    image = x.dim() == 4
    if channels_last and image:
        x = x.contiguous(memory_format=torch.channels_last)
    prepared, folded = {}, []
    for k, m in models.items():
        prepared[k], f = inference_copy(m, channels_last and image, fold_bn)
        folded.append(f)
    compiled = False
    if compile:
        torch._dynamo.reset()
        try:
            prepared = {k: compile_for_inference(m, x) for k, m in prepared.items()}
            compiled = True
        except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for Inductor's CPU kernels
            log.warning("latency measured eager: torch.compile failed (%s)", str(e).splitlines()[0][:160])
            prepared = {k: inference_copy(m, channels_last and image, fold_bn)[0] for k, m in models.items()}
    before = runnable_others()
    times = interleaved_latency_ms(prepared, x, warmup, repeats)
    shared = contention([before, runnable_others()])
    if shared["contended"]:
        # once per process at warning level: a latency plan measures dozens of times
        global _CONTENTION_WARNED
        say = log.info if _CONTENTION_WARNED else log.warning
        say("latency measured while %d other processes were runnable on %d cores (%d threads here): the figures "
            "are not those of a quiet machine (results.json latency.contention)",
            shared["runnable_others"], shared["cores"], shared["threads"])
        _CONTENTION_WARNED = True
    medians = {k: statistics.median(v) for k, v in times.items()}
    return medians, {"bn_folded": fold_bn and all(folded), "compiled": compiled,
                     "min_ms": {k: min(v) for k, v in times.items()}, "contention": shared}
