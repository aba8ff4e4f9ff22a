"""Latency as the budget (`target: latency`): a per-layer latency table measured on the run's
device, a HALP-style allocation against it, and the measured correction of the plan.

The table: the wall time of every conv/linear layer as a function of its kept input and output
channels, each layer timed standalone as it is served (eval, no grad, channels-last and with the
bias a folded BN leaves when the run's latency settings say so) at the run's latency batch size,
on a grid of kept counts, bilinear in between. Layers of the same signature (kind, channels,
kernel, stride, input size) are timed once; every signature's grid is cached on disk per
machine/threads/torch/settings, so a second run on the same device measures nothing. What the
layers do not account for (activations, residual adds, pooling, unfolded BN, Python overhead) is
the dense model's measured whole-forward time minus the table's sum; it is scaled with the
activation volume (conv/linear outputs) a plan keeps.

The allocation (HALP, Shen et al. 2022) maximises the importance a plan keeps under the latency
budget. HALP solves an augmented knapsack per step; ours is the knapsack's ratio greedy: remove,
one prune step at a time, the channels that lose the least (group-normalised) importance per
millisecond of predicted latency they save, until the prediction meets the budget.
`allocation=flops` is the comparison plan: the FLOPs-target allocation (uniform or global ratios,
as `target: flops` prunes), its FLOPs budget bisected until its predicted latency meets the same
budget. `meet_latency` then shrinks the plan, measures it against the dense model, and corrects
the budget it asks the solver for by the measured miss (a few rounds), because a table of
standalone layers cannot see everything the whole forward pays for.

Hand-written: torch-pruning, NNI and jaxpruner have no latency table for channel pruning.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from prune_lab import quiet
from prune_lab.cpu import cpu_isa, cpu_name
from prune_lab.sparsity.measure import observe_forward
from prune_lab.sparsity.structure import ROOT_TYPES, ChannelGroups, FlopsModel, _is_depthwise, solve_flops_target

log = logging.getLogger(__name__)
ALLOCATIONS = ("halp", "flops")


def _levels(size: int, prunable: bool, points: int, step: int = 1) -> list[int]:
    """Kept counts the grid is timed at; multiples of `step` (a grouped conv's groups: plans keep
    the same count in each, so only those widths exist)."""
    if not prunable:
        return [size]
    return sorted({step * max(1, round(size / step * i / points)) for i in range(1, points + 1)})


@torch.no_grad()
def time_layer(sig: dict, cin: int, cout: int, batch: int, channels_last: bool, bias: bool, device: str,
               repeats: int = 7) -> float:
    """Wall time (ms, the minimum over `repeats`) of one forward of a standalone layer of signature `sig` with `cin`
    inputs and `cout` outputs (depthwise: cin = cout) at `batch`, repeated until a timing is ≥ 0.2 ms
    long so that short layers are not lost in the timer's resolution."""
    if sig["kind"] == "conv":
        groups = cin if sig["dw"] else sig.get("groups", 1)
        layer = nn.Conv2d(cin, cin if sig["dw"] else cout, sig["k"], sig["stride"], sig["padding"], sig["dilation"],
                          groups=groups, bias=bias)
        x = torch.randn(batch, cin, *sig["hw"])
        if channels_last:
            layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    else:
        layer, x = nn.Linear(cin, cout, bias=bias), torch.randn(batch, *sig["extra"], cin)
    layer, x = layer.eval().to(device), x.to(device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with quiet.measuring():  # other jobs sharing the quiet lock pause their batches meanwhile
        layer(x)
        sync()
        t0 = time.perf_counter()
        layer(x)
        sync()
        inner = max(1, min(1000, math.ceil(2e-4 / max(time.perf_counter() - t0, 1e-7))))
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                layer(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return min(times)  # interference only ever adds time: the minimum is the layer's own cost


class LatencyTable:
    """Predicted latency (ms) of a channel plan of `groups.model`, from per-layer timings.

    Args:
        groups: the model's channel groups (the ones the method prunes).
        example_input: one input of the data's shape.
        batch_size, channels_last, fold_bn, compile, warmup, repeats: the run's latency settings
            (results.json's `latency` section measures with the same), so table and check agree.
        points: grid points per prunable dimension (kept fractions 1/points … 1).
        cache_dir: where measured grids are kept (None: not cached).
        device: where layers are timed ("cpu", as results.json measures; "cuda" for a GPU table).
    """

    def __init__(self, groups: ChannelGroups, example_input: torch.Tensor, batch_size: int = 16,
                 channels_last: bool = True, fold_bn: bool = True, compile: bool = False, warmup: int = 3,
                 repeats: int = 10, points: int = 8, cache_dir: str | Path | None = None, device: str = "cpu"):
        self.flops = FlopsModel(groups, example_input)  # per-layer shapes and the plan → removed-count logic
        self.settings = dict(batch_size=int(batch_size), channels_last=bool(channels_last), fold_bn=bool(fold_bn),
                             compile=bool(compile), warmup=int(warmup), repeats=int(repeats))
        self.points, self.device = int(points), device
        model = groups.model
        modules = dict(model.named_modules())
        prunable = {n: {"out": False, "in": False} for n in self.flops.layers}
        for items in self.flops.items:
            for name, kind, _ in items:
                prunable[name][kind] = True
        inputs = self._input_shapes(model, example_input)
        self.sigs, self.grids = {}, {}
        env = dict(cpu=cpu_name(), isa=cpu_isa(), threads=torch.get_num_threads(), torch=torch.__version__, device=device,
                   gpu=torch.cuda.get_device_name() if device == "cuda" else None, points=self.points,
                   batch=self.settings["batch_size"], cl=self.settings["channels_last"])
        self.env = env
        cache = Path(cache_dir) / _digest(env) if cache_dir else None
        for name, L in self.flops.layers.items():
            m = modules[name]
            bias = m.bias is not None or self.settings["fold_bn"]
            if isinstance(m, nn.Conv2d):
                sig = dict(kind="conv", cin=m.in_channels, cout=m.out_channels, k=list(m.kernel_size),
                           stride=list(m.stride), padding=list(m.padding) if not isinstance(m.padding, str)
                           else m.padding, dilation=list(m.dilation), dw=_is_depthwise(m),
                           hw=list(inputs[name][-2:]), bias=bias)
                if m.groups > 1 and not sig["dw"]:
                    sig["groups"] = m.groups  # only here: the signatures (cache keys) of other layers stay as they were
            else:
                sig = dict(kind="linear", cin=m.in_features, cout=m.out_features, extra=list(inputs[name][:-1]),
                           bias=bias)
            step = sig.get("groups", 1)
            sig["ins"] = _levels(sig["cin"], prunable[name]["in"] and not sig.get("dw"), self.points, step)
            sig["outs"] = _levels(sig["cout"], prunable[name]["out"], self.points, step)
            self.sigs[name] = sig
            key = _digest(sig)
            if key not in self.grids:
                self.grids[key] = self._grid(sig, cache / f"{key}.json" if cache else None)
        self.dense_act = sum(L["out"] * L["pos"] for L in self.flops.layers.values())
        self.layers_dense_ms = self.predict_layers(None)
        self.other_ms = 0.0  # set by calibrate_total(); until then predictions cover the layers only

    @staticmethod
    def _input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple]:
        shapes = {}
        observe_forward(model, example_input,
                        {m: (lambda mod, inp, out, n=name: shapes.__setitem__(n, tuple(inp[0].shape[1:])))
                         for name, m in model.named_modules() if isinstance(m, ROOT_TYPES)})
        return shapes

    def _grid(self, sig: dict, path: Path | None) -> list[list[float]]:
        if path is not None and path.exists():
            return json.loads(path.read_text())["ms"]
        s = self.settings
        grid = [[time_layer(sig, cin, cin if sig.get("dw") else cout, s["batch_size"], s["channels_last"],
                            sig["bias"], self.device) for cout in sig["outs"]]
                for cin in (sig["outs"] if sig.get("dw") else sig["ins"])]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{id(self)}")
            tmp.write_text(json.dumps({"sig": sig, "ms": grid}))
            tmp.replace(path)  # atomic: a concurrent run reads a whole grid or none
        return grid

    # -- prediction -------------------------------------------------------------------------
    def layer_ms(self, name: str, cin: int, cout: int) -> float:
        sig = self.sigs[name]
        grid = self.grids[_digest(sig)]
        if sig.get("dw"):
            return _interp(sig["outs"], [row[i] for i, row in enumerate(grid)], cout)
        return _bilinear(sig["ins"], sig["outs"], grid, cin, cout)

    def kept(self, plan: dict[str, torch.Tensor] | None) -> dict[str, tuple[int, int]]:
        """(kept inputs, kept outputs) of every conv/linear layer under `plan`."""
        removed = {n: {"out": 0, "in": 0} for n in self.flops.layers}
        for root, entries in zip(self.flops.roots, self.flops.items):
            if plan is None or root not in plan:
                continue
            dropped = ~plan[root].cpu()
            for name, kind, root_idxs in entries:
                removed[name][kind] += int(dropped[root_idxs].sum())
        out = {}
        for n, L in self.flops.layers.items():
            cout = L["out"] - removed[n]["out"]
            out[n] = (cout if L["dw"] else L["inp"] - removed[n]["in"], cout)
        return out

    def predict_layers(self, plan, skip: list[str] = ()) -> float:
        prefixes = tuple(f"{p}." for p in skip)
        return sum(self.layer_ms(n, cin, cout) for n, (cin, cout) in self.kept(plan).items()
                   if not n.startswith(prefixes))

    def predict_ms(self, plan: dict[str, torch.Tensor] | None = None, skip: list[str] = ()) -> float:
        """Predicted whole-forward latency (ms) with the channels of `plan` removed and the modules
        in `skip` left out (the same arguments as `FlopsModel.macs`)."""
        prefixes = tuple(f"{p}." for p in skip)
        kept = self.kept(plan)
        layers = sum(self.layer_ms(n, cin, cout) for n, (cin, cout) in kept.items() if not n.startswith(prefixes))
        act = sum(cout * self.flops.layers[n]["pos"] for n, (_, cout) in kept.items() if not n.startswith(prefixes))
        return layers + self.other_ms * act / self.dense_act

    def calibrate_total(self, dense_ms: float) -> None:
        """Attribute the dense model's measured time that the layers do not explain to `other`."""
        self.dense_ms = float(dense_ms)
        self.other_ms = max(0.0, self.dense_ms - self.layers_dense_ms)

    def reduction(self, plan, skip: list[str] = ()) -> float:
        return 1.0 - self.predict_ms(plan, skip) / self.predict_ms(None)

    def describe(self) -> dict:
        return {"env": self.env, **self.settings, "layers": len(self.sigs), "signatures": len(self.grids),
                "layers_dense_ms": self.layers_dense_ms, "other_ms": self.other_ms,
                "predicted_dense_ms": self.predict_ms(None)}


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    t = (x - x0) / (x1 - x0)
    return ys[i - 1] + t * (ys[i] - ys[i - 1])  # beyond the grid's ends: linear extrapolation


def _bilinear(ins: list[int], outs: list[int], grid: list[list[float]], cin: float, cout: float) -> float:
    rows = [_interp(outs, row, cout) for row in grid]
    return _interp(ins, rows, cin)


def table_for_run(groups: ChannelGroups, example_input: torch.Tensor, latency: dict, device: str = "cpu",
                  measure_dense: bool = True) -> LatencyTable:
    """The table of a run from its `latency` config section (what results.json measures with), its
    `other` share calibrated on the dense model's measured whole forward."""
    table = LatencyTable(groups, example_input.cpu(), batch_size=latency.get("batch_size", 16),
                         channels_last=latency.get("channels_last", True), fold_bn=latency.get("fold_bn", True),
                         compile=latency.get("compile", False), warmup=latency.get("warmup", 3),
                         repeats=latency.get("repeats", 10), points=latency.get("table_points", 8),
                         cache_dir=latency.get("table_cache"), device=device)
    if measure_dense:
        table.calibrate_total(served_ms({"dense": groups.model}, example_input, latency)["dense"])
    return table


def served_ms(models: dict[str, nn.Module], example_input: torch.Tensor, latency: dict) -> dict[str, float]:
    """Latency (ms) of each model as results.json measures it (CPU copies, the run's settings): the
    fastest of the interleaved rounds, robust to other work on the machine (it only adds time)."""
    from prune_lab.sparsity.measure import latency_ms

    cpu = {k: copy.deepcopy(m).cpu() for k, m in models.items()}
    _, applied = latency_ms(cpu, example_input.cpu(), latency.get("batch_size", 16), latency.get("warmup", 3),
                            latency.get("repeats", 10), latency.get("channels_last", True),
                            latency.get("fold_bn", True), latency.get("compile", False))
    return applied["min_ms"]


def measured_reduction(model: nn.Module, plan: dict[str, torch.Tensor], example_input: torch.Tensor, latency: dict,
                       skip: list[str] = ()) -> dict[str, float]:
    """Shrink a CPU copy of `model` by `plan` (blocks in `skip` replaced by identities), and measure
    it against the dense model interleaved, `latency.plan_measurements` (default 3) times:
    {"dense_ms", "pruned_ms", "reduction"} of the call with the median reduction, and every call's
    "reductions"."""
    from prune_lab.export import remove_modules  # lazy: export imports the sparsity engine
    from prune_lab.sparsity.structure import shrink

    dense = copy.deepcopy(model).cpu().eval()
    small = shrink(dense, {k: v.cpu() for k, v in plan.items()}, example_input.cpu())
    remove_modules(small, list(skip))
    calls = [served_ms({"dense": dense, "pruned": small}, example_input, latency)
             for _ in range(max(1, int(latency.get("plan_measurements", 3))))]
    # the median of several paired calls: on a shared VM one call's reduction moves by ±0.05-0.1 with
    # the machine's phase (README, tolerance); the pair inside a call is timed at the same moment
    calls.sort(key=lambda c: c["pruned"] / c["dense"], reverse=True)  # by reduction, ascending
    reductions = [1.0 - c["pruned"] / c["dense"] for c in calls]
    mid = len(calls) // 2  # the upper median, as statistics.median_high (budget_met) takes it
    return {"dense_ms": calls[mid]["dense"], "pruned_ms": calls[mid]["pruned"], "reduction": reductions[mid],
            "reductions": reductions}
