"""Latency as the budget, realized: ResNet-50 shapes pruned to remove a fraction
`target` of the served model's latency, at batch 1 and 16 on CPU, prune_lab's latency plan
against torch-pruning's uniform pruning at the same measured latency.

Per batch size:
1. the per-layer latency table (`LatencyTable`) at that batch size, its `other` share calibrated
   on the dense model's measured forward (what `table_for_run` does in a run), timed as built;
2. our plan: L1-magnitude channel scores, the HALP-style allocation against the table, corrected
   on the measured model by `meet_latency` (measure = `measured_reduction`, as a run measures; a
   plan landing in the window is read a second time and judged by the mean, as `latency.confirm`);
3. torch-pruning's `MagnitudePruner` with one ratio for every layer (`tp_uniform`), the ratio
   bisected until its *measured* latency reduction matches our plan's measured reduction;
4. dense, ours and torch-pruning's re-measured interleaved on their served copies (channels-last,
   BN folded: `inference_copy`); the speed-up is the median over rounds of dense/pruned time,
   reported as a fraction of the target speed-up 1/(1 − target);
5. the run-to-run noise of a measured reduction: the same dense/ours pair measured `noise_k`
   times the way `measured_reduction` measures it (mean and standard deviation), the scale a
   `budget_met` tolerance on latency has to allow for.

Every measurement goes through the repository's own timing helpers (`served_ms`,
`interleaved_latency_ms`), so the benchmark times exactly what `results.json` reports.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from prune_lab.bench.deployment import tp_uniform
from prune_lab.errors import PruneLabError
from prune_lab.models import classifier_of
from prune_lab.sparsity import ChannelGroups, count_flops, count_params, shrink
from prune_lab.sparsity.importance import Magnitude
from prune_lab.sparsity.latency import measured_reduction, served_ms, table_for_run
from prune_lab.sparsity.latency_allocation import meet_latency, solve_latency_target
from prune_lab.sparsity.measure import inference_copy, interleaved_latency_ms

# what results.json measures by default (conf/train.yaml's `latency`), at each batch size of the study
SERVED = dict(channels_last=True, fold_bn=True, compile=False, warmup=3, repeats=10)
# the goals: realized speed-up as a fraction of the target speed-up, per batch size
GOALS = {1: 0.85, 16: 0.95}


def tp_at_measured_reduction(model: nn.Module, x: torch.Tensor, latency: dict, goal: float, steps: int = 7,
                             max_ratio: float = 0.9):
    """torch-pruning's uniform pruning with its ratio bisected so that its measured latency
    reduction (dense and pruned measured interleaved, as `measured_reduction` does) is closest to
    `goal`. Returns (model, measured reduction, ratio, [{ratio, measured} per try])."""
    lo, hi, best, tries = 0.0, max_ratio, None, []
    for _ in range(max(1, steps)):
        ratio = (lo + hi) / 2
        pruned = tp_uniform(model, x, ratio)
        ms = served_ms({"dense": model, "tp": pruned}, x, latency)
        reduction = 1.0 - ms["tp"] / ms["dense"]
        tries.append({"ratio": ratio, "measured": reduction})
        if best is None or abs(reduction - goal) < abs(best[1] - goal):
            best = (pruned, reduction, ratio)
        lo, hi = (ratio, hi) if reduction < goal else (lo, ratio)
    return (*best, tries)


def reduction_noise(dense: nn.Module, pruned: nn.Module, x: torch.Tensor, latency: dict, k: int) -> dict:
    """The latency reduction of one fixed dense/pruned pair, measured `k` times as a run measures it."""
    reductions = []
    for _ in range(k):
        ms = served_ms({"dense": dense, "pruned": pruned}, x, latency)
        reductions.append(1.0 - ms["pruned"] / ms["dense"])
    return {"k": k, "reductions": reductions, "mean": statistics.fmean(reductions),
            "std": statistics.stdev(reductions) if k > 1 else 0.0}


def _grid_files(cache_dir) -> int:
    return sum(1 for _ in Path(cache_dir).rglob("*.json")) if cache_dir and Path(cache_dir).exists() else 0


def _served_comparison(models: dict[str, nn.Module], batch: int, size: int, latency: dict, repeats: int,
                       target_speedup: float) -> dict:
    """Dense, ours and tp measured interleaved on served copies; speed-ups as medians over rounds."""
    channels = next(m for m in models["dense"].modules() if isinstance(m, nn.Conv2d)).in_channels
    xb = torch.randn(batch, channels, size, size)
    if latency["channels_last"]:
        xb = xb.contiguous(memory_format=torch.channels_last)
    served = {k: inference_copy(m, latency["channels_last"], latency["fold_bn"])[0] for k, m in models.items()}
    n = repeats if batch > 1 else 3 * repeats  # batch-1 forwards are short and noisier
    times = interleaved_latency_ms(served, xb, warmup=latency["warmup"], repeats=n)
    out = {"rounds_ms": times, "dense_latency_ms": statistics.median(times["dense"])}
    for k in ("ours", "tp"):
        speedup = statistics.median(d / p for d, p in zip(times["dense"], times[k]))
        out[k] = {"latency_ms": statistics.median(times[k]), "measured_speedup": speedup,
                  "measured_reduction": 1.0 - 1.0 / speedup, "fraction_of_target": speedup / target_speedup}
    return out


def latency_target_speedup(target: float = 0.5, batches: tuple[int, ...] = (1, 16), size: int = 224,
                           model: nn.Module | None = None, points: int = 8, cache_dir: str | Path | None = None,
                           round_to: int = 8, tolerance: float = 0.02, rounds: int = 3, tp_steps: int = 7,
                           repeats: int = 21, noise_k: int = 5, latency: dict | None = None) -> dict:
    """The issue-18 ResNet-50 benchmark (see the module docstring); `model` (default: torchvision
    ResNet-50, random init) is any model prune_lab's channel groups trace, its classifier kept.

    Returns {"target", "target_speedup", settings..., "batch<b>": {...}} where each batch holds:
    `table` (build_s, grids_measured, predicted_reduction of our plan, the table's description),
    `meet_latency` (the correction loop's rounds: asked, predicted, measured), `dense` / `ours` /
    `tp` (latency_ms, flops, flops_reduction, params; ours and tp: measured_speedup = median over
    rounds of dense/pruned time, measured_reduction = 1 − 1/measured_speedup, fraction_of_target =
    measured_speedup / target_speedup), `tp` also its pruning_ratio and bisection tries,
    `rounds_ms` (the interleaved per-round times the medians come from), `noise` (the same
    dense/ours pair's reduction measured noise_k times: mean, std), `goal_fraction` and `wall_s`."""
    if not 0.0 < target < 1.0:
        raise PruneLabError(f"latency target={target!r}: expected the fraction of the dense latency to remove, in (0, 1)")
    model = (model or torchvision.models.resnet50(num_classes=1000)).eval()
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x1 = torch.randn(1, channels, size, size)
    groups = ChannelGroups(model, x1, ignored=[classifier_of(model)[1]])
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    dense_flops, dense_params = count_flops(model, x1), count_params(model)
    target_speedup = 1.0 / (1.0 - target)
    settings = {**SERVED, **(latency or {})}
    out = {"model": type(model).__name__, "input": size, "target": target, "target_speedup": target_speedup,
           "round_to": round_to, "points": points, "tolerance": tolerance, "rounds": rounds,
           "allocation": "halp", "scores": "l1 magnitude (log share), min_keep 0.25", "latency": settings,
           "cache_dir": str(cache_dir) if cache_dir else None, "threads": torch.get_num_threads()}
    for batch in batches:
        lat = {**settings, "batch_size": int(batch), "table_points": points, "table_cache": cache_dir}
        before = _grid_files(cache_dir)
        t_batch = t0 = time.perf_counter()
        table = table_for_run(groups, x1, lat)
        build_s = time.perf_counter() - t0

        def solve(asked):
            # a random-init model has no training signal for HALP's Taylor values: L1 log share, with
            # the runs' default floor (min_keep 0.25)
            return solve_latency_target(groups, table, scores, asked, allocation="halp", round_to=round_to,
                                        min_keep=0.25)

        def measure(plan):
            return measured_reduction(model, plan, x1, lat)["reduction"]

        plan, history = meet_latency(solve, measure, target, tolerance, rounds, confirm=True)
        ours = shrink(model, plan, x1).eval()
        ours_loop = next(h["measured"] for h in history if h["chosen"])
        tpm, tp_red, tp_ratio, tries = tp_at_measured_reduction(model, x1, lat, ours_loop, tp_steps)
        res = _served_comparison({"dense": model, "ours": ours, "tp": tpm}, batch, size, lat, repeats,
                                 target_speedup)
        for k, m in (("dense", model), ("ours", ours), ("tp", tpm)):
            flops = count_flops(m, x1)
            res.setdefault(k, {}).update(flops=flops, flops_reduction=1.0 - flops / dense_flops,
                                         params=count_params(m), params_reduction=1.0 - count_params(m) / dense_params)
        res["dense"]["latency_ms"] = res.pop("dense_latency_ms")
        res["ours"]["measured_reduction_in_loop"] = ours_loop
        res["tp"].update(pruning_ratio=tp_ratio, measured_reduction_in_bisection=tp_red, bisection=tries)
        res["table"] = {"build_s": build_s, "grids_measured": _grid_files(cache_dir) - before if cache_dir else None,
                        "predicted_reduction": table.reduction(plan), **table.describe()}
        res["meet_latency"] = history
        res["noise"] = reduction_noise(model, ours, x1, lat, noise_k)
        res["goal_fraction"] = GOALS.get(int(batch))
        res["wall_s"] = time.perf_counter() - t_batch
        out[f"batch{batch}"] = res
    return out
