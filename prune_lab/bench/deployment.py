"""Realized speed-up of structurally pruned models as deployed: dense vs pruned latency, prune_lab's
plan against torch-pruning's own uniform pruning at the same FLOPs, in several deployments."""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch_pruning as tp
import torchvision

from prune_lab.models import classifier_of
from prune_lab.sparsity import ChannelGroups, FlopsModel, count_flops, shrink, solve_flops_target
from prune_lab.sparsity.importance import Magnitude
from prune_lab.sparsity.measure import compile_for_inference, inference_copy, interleaved_latency_ms, layer_macs


def frozen(model, x):
    """TorchScript-frozen and optimised for inference (BN folded, conv+ReLU fused by oneDNN)."""
    with torch.no_grad():
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))


class Autocast(torch.nn.Module):
    def __init__(self, inner, device):
        super().__init__()
        self.inner, self.device = inner, device

    def forward(self, x):
        with torch.autocast(self.device, dtype=torch.bfloat16):
            return self.inner(x)


# deployments compared on CPU: (name, channels_last, fold_bn, extra); "served" is what results.json measures
LAYOUTS = [("nchw", False, False, None), ("channels_last", True, False, None),
           ("served", True, True, None), ("frozen", True, False, "frozen"), ("compiled", True, False, "compiled")]


def deploy(model, device: str, channels_last: bool, fold_bn: bool, extra, x):
    m = inference_copy(model, channels_last, fold_bn)[0].to(device)
    if extra == "frozen":
        m = frozen(m, x)
    elif extra == "compiled":
        m = compile_for_inference(m, x)
    elif extra == "bf16":
        m = Autocast(m, device)
    return m


def layer_profile(model, served, x, repeats: int = 3) -> dict[str, dict]:
    """Where the served model's time goes: median wall time of each conv, linear and pooling layer
    (forward hooks, synchronous CPU execution) and, for conv/linear, MACs per second. `model` is
    the un-served original (its layer names and MACs), `served` its deployment copy."""
    macs = layer_macs(model, x[:1])
    times: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    hooks = []
    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d)
    for name, mod in served.named_modules():
        if isinstance(mod, kinds):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, i, n=name: starts.__setitem__(n, time.perf_counter())))
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: times.setdefault(n, []).append(time.perf_counter() - starts[n])))
    with torch.no_grad():
        served(x)
        times.clear()
        for _ in range(repeats):
            served(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        out[name] = {"ms": 1e3 * t, "macs": macs.get(name, 0) * len(x),
                     "gmacs_per_s": macs.get(name, 0) * len(x) / t / 1e9 if name in macs else None}
    return out


def tp_uniform(model, x, ratio: float):
    """A copy of `model` pruned by torch-pruning's own uniform pruning: MagnitudePruner (L1 group
    magnitude), the same `ratio` of channels removed from every layer, the classifier kept."""
    m = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[classifier_of(m)[1]])
    pruner.step()
    return m.eval()


def torch_pruning_uniform(model, x, target: float):
    """torch-pruning's own uniform pruning (`tp_uniform`), the ratio bisected so the FLOPs
    reduction matches ours."""
    base = count_flops(model, x)
    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):
        ratio = (lo + hi) / 2
        m = tp_uniform(model, x, ratio)
        red = 1 - count_flops(m, x) / base
        if best is None or abs(red - target) < abs(best[1] - target):
            best = (m, red, ratio)
        lo, hi = (ratio, hi) if red < target else (lo, ratio)
    return best


def realized_speedup(target: float, batches: tuple, size: int, repeats: int, round_to: int, device: str) -> dict:
    """Dense vs pruned ResNet-50 latency, ours and torch-pruning's, in each deployment; the
    speed-up is the median over rounds of dense/pruned time measured back to back."""
    model = torchvision.models.resnet50(num_classes=1000).eval()
    x1 = torch.randn(1, 3, size, size)
    groups = ChannelGroups(model, x1, ignored=[model.fc])
    flops = FlopsModel(groups, x1)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    plan = solve_flops_target(groups, flops, scores, target, "uniform", round_to=round_to)
    ours = shrink(model, plan, x1).eval()
    tpm, tp_red, tp_ratio = torch_pruning_uniform(model, x1, target)
    dense_flops = count_flops(model, x1)
    ideal = {"ours": dense_flops / count_flops(ours, x1), "tp": dense_flops / count_flops(tpm, x1)}
    out = {"input": size, "target": target, "round_to": round_to, "tp_pruning_ratio": tp_ratio}
    layouts = [("cpu",) + lay for lay in LAYOUTS]
    if device == "cuda":
        layouts += [("cuda", "served", True, True, None), ("cuda", "served_bf16", True, True, "bf16")]
    for dev, layout, cl, fold, extra in layouts:
        key = layout if dev == "cpu" else f"cuda_{layout}"
        out[key] = {}
        for batch in batches:
            xb = torch.randn(batch, 3, size, size, device=dev)
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if extra == "compiled":  # fresh caches: no recompilation limit, no shapes marked dynamic
                torch._dynamo.reset()
            models = {k: deploy(m, dev, cl, fold, extra, xb) for k, m in (("dense", model), ("ours", ours), ("tp", tpm))}
            n = repeats if batch > 1 else 3 * repeats  # batch-1 forwards are short and noisier
            times = interleaved_latency_ms(models, xb, warmup=1, repeats=n)
            res = {"dense_latency_ms": statistics.median(times["dense"])}
            for k in ("ours", "tp"):
                measured = statistics.median(d / p for d, p in zip(times["dense"], times[k]))
                res[k] = {"flops_reduction": 1 - 1 / ideal[k], "ideal_speedup": ideal[k], "measured_speedup": measured,
                          "fraction_of_ideal": measured / ideal[k], "latency_ms": statistics.median(times[k])}
            out[key][f"batch{batch}"] = res
            if dev == "cpu" and layout == "served" and batch == max(batches):
                out["layers"] = {k: layer_profile(m, models[k], xb) for k, m in (("dense", model), ("ours", ours))}
    return out
