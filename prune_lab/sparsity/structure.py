"""Channel groups from torch-pruning's DependencyGraph: masks first, physical shrink for export.

A *group* is a set of coupled channels (a conv's outputs, its BN, the next layers' inputs, and
across residual adds every layer that writes or reads the same stream). A structured method
decides, per group, which root channels to keep; `param_masks` turns that plan into masks that
zero exactly what `shrink` later removes, so the masked and the shrunk model compute the same.
Hand-written here: the plan→mask translation and the analytic FLOPs model (torch-pruning prunes
but neither masks nor predicts FLOPs of a plan without pruning a copy).

Grouped convolutions (ResNeXt, RegNet) are pruned as torch-pruning's MetaPruner prunes them: a
group whose channels a convolution with G groups reads or writes is cut in G equal slices, the
same positions dropped from every slice (scores averaged over the slices), so the shrunk
convolution keeps its G groups. Two kinds of group are left whole, because pruning them would
make the masked model compute something the shrunk one does not: groups that reach a reshape
or split whose channel mapping is unknown (`tracing.py`: ShuffleNet's channel shuffle, attention
heads), and groups normalised across channels (LayerNorm, GroupNorm: a masked zero channel still
enters the statistics a removed one does not).
"""
from __future__ import annotations

import copy
import math

import torch
import torch_pruning as tp
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.measure import count_flops, observe_forward
from prune_lab.sparsity.tracing import build_graph, root_coupling

ROOT_TYPES = (nn.Conv2d, nn.Linear)
# normalisations whose statistics span the channels they normalise: masking ≠ removing there
CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _slices(layer: nn.Module, graph: tp.DependencyGraph, out: bool) -> int:
    """Into how many equal slices `layer` cuts the channels it writes (`out`) or reads: its
    torch-pruning pruner's channel groups (a grouped conv's `groups`), 1 for a depthwise conv
    (each channel its own group: any subset prunes), as MetaPruner counts them."""
    if _is_depthwise(layer):
        return 1
    pruner = graph.get_pruner_of_module(layer)
    if pruner is None:
        return 1
    n = pruner.get_out_channel_groups(layer) if out else pruner.get_in_channel_groups(layer)
    return max(int(n or 1), 1)


def _check_even(name: str, layer: nn.Module, out: bool, idxs: list[int]) -> None:
    """Refuse, in one line, dropping a grouped conv's channels unevenly: the shrunk copy would be
    no valid convolution, or would move channels between its groups (torch-pruning's conv pruner
    keeps the first group's kept inputs for every group)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups == 1 or _is_depthwise(layer):
        return
    per = (layer.out_channels if out else layer.in_channels) // layer.groups
    positions = [set() for _ in range(layer.groups)]
    for c in idxs:
        positions[c // per].add(c % per)
    if any(p != positions[0] for p in positions):
        raise PruneLabError(f"the channel plan drops {'outputs' if out else 'inputs'} of grouped convolution {name} "
                            f"(groups={layer.groups}) unevenly; a plan must drop the same positions in every "
                            "group (drop_order gives that order)")


class ChannelGroups:
    """The prunable channel groups of a model, each identified by its root module's name.

    `roots`, `sizes`, `members` per group; `slices[i]`: into how many equal slices grouped
    convolutions (or a coupling of the group's own channels, `tracing.root_coupling`) cut group i
    (1 for most): a plan drops the same positions in each (`drop_order`)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module] = ()):
        self.model = model
        try:
            self.graph = build_graph(model, example_input)
            groups = list(self.graph.get_all_groups(ignored_layers=list(ignored), root_module_types=ROOT_TYPES))
        except Exception as e:  # tracing failures surface as one line, not a torch-pruning traceback
            raise PruneLabError(f"cannot trace channel dependencies of {type(model).__name__}: {e}") from e
        names = {m: n for n, m in model.named_modules()}
        self._names = names
        self.groups, self.slices = [], []
        for g in groups:
            if len(g[0].idxs) <= 1 or not self._prunable(g):
                continue
            coupled = root_coupling(self.graph, g)  # a channel that takes others of its group with it
            if coupled is None:
                continue  # an irregular coupling: no plan over root channels describes what would go
            slices = math.lcm(coupled, *[_slices(item.dep.target.module, self.graph,
                                                 self.graph.is_out_channel_pruning_fn(item.dep.handler))
                                         for item in g if isinstance(item.dep.target.module, nn.Module)
                                         and item.dep.target.module in names])
            if len(g[0].idxs) % slices or len(g[0].idxs) == slices:
                continue  # one channel per slice (or slices that do not tile the group): nothing can go
            self.groups.append(g)
            self.slices.append(slices)  # a plan drops the same positions in each of these slices
        self.roots = [names[g[0].dep.target.module] for g in self.groups]
        self.sizes = [len(g[0].idxs) for g in self.groups]
        # per group: (module name, "out"|"in", root index of each of the module's indices)
        self.members = []
        for g in self.groups:
            entries = []
            for item in g:
                layer = item.dep.target.module
                if isinstance(layer, nn.Module) and layer in names:
                    kind = "out" if self.graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                    entries.append((names[layer], kind, torch.tensor(item.root_idxs)))
            self.members.append(entries)

    def _prunable(self, group) -> bool:
        for item in group:
            node, layer = item.dep.target, item.dep.target.module
            if node in self.graph.opaque or item.dep.source in self.graph.opaque or isinstance(layer, CHANNEL_NORMS):
                return False
        return True

    def __len__(self):
        return len(self.groups)

    def scores(self, scorer: tp.importance.Importance) -> list[torch.Tensor]:
        out = []
        for g, size in zip(self.groups, self.sizes):
            s = scorer(g)
            out.append(torch.zeros(size) if s is None else s.detach().float().cpu())
        return out

    def _items(self, gi: int, keep: torch.Tensor):
        """(module_name, module, 'out'|'in', layer-local indices) pruned by dropping ~keep in group gi."""
        root = self.groups[gi][0].dep.target.module
        pruned = (~keep).nonzero().flatten().tolist()
        if not pruned:
            return
        group = self.graph.get_pruning_group(root, self.groups[gi][0].dep.handler, pruned)
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if not isinstance(layer, nn.Module) or layer not in self._names:
                continue  # functional ops (add, flatten, cat) carry no parameters
            kind = "out" if self.graph.is_out_channel_pruning_fn(fn) else "in"
            _check_even(self._names[layer], layer, kind == "out", list(item.idxs))
            yield self._names[layer], layer, kind, list(item.idxs)

    def param_masks(self, plan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masks (True = kept) over parameters that zero every entry `shrink(plan)` removes."""
        masks: dict[str, torch.Tensor] = {}

        def zero(pname, p, idx, dim):
            m = masks.setdefault(pname, torch.ones_like(p, dtype=torch.bool))
            m.index_fill_(dim, torch.tensor(idx, dtype=torch.long, device=p.device), False)

        for gi, root in enumerate(self.roots):
            if root not in plan:
                continue
            for name, layer, kind, idx in self._items(gi, plan[root]):
                for pn, p in layer.named_parameters(recurse=False):
                    full = f"{name}.{pn}" if name else pn
                    if kind == "out" or _is_depthwise(layer):
                        zero(full, p, idx, 0)  # filters, biases and BN entries of dropped outputs
                    elif p.dim() == 1:
                        continue  # a bias belongs to the outputs, not the inputs
                    elif isinstance(layer, nn.Linear) or layer.groups == 1:
                        zero(full, p, idx, 1)
                    else:  # grouped conv: input c feeds only its group's filters, at position c mod in/G
                        m = masks.setdefault(full, torch.ones_like(p, dtype=torch.bool))
                        per_in, per_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
                        for c in idx:
                            g = c // per_in
                            m[g * per_out:(g + 1) * per_out, c % per_in] = False
        return masks


def shrink(model: nn.Module, plan: dict[str, torch.Tensor], example_input: torch.Tensor) -> nn.Module:
    """A physically smaller copy of `model` with the channels of `plan` removed (masks ignored)."""
    small = copy.deepcopy(model)
    graph = build_graph(small, example_input)
    modules = dict(small.named_modules())
    names = {m: n for n, m in modules.items()}
    for root, keep in plan.items():
        pruned = (~keep.cpu()).nonzero().flatten().tolist()
        if not pruned:
            continue
        m = modules[root]
        fn = graph.get_pruner_of_module(m).prune_out_channels
        group = graph.get_pruning_group(m, fn, pruned)
        for item in group:
            layer = item.dep.target.module
            if layer in names:
                _check_even(names[layer], layer, graph.is_out_channel_pruning_fn(item.dep.handler), list(item.idxs))
        group.prune(record_history=False)
    return small


class FlopsModel:
    """MACs of every conv/linear layer as a function of a channel plan, without pruning a copy.

    Spatial sizes are recorded once by forward hooks; a plan removes, per layer, the out/in
    indices its groups touch. `macs(plan)` equals torch's FLOP counter on the shrunk model / 2
    (tests check it). What the counter sees beyond the conv/linear modules' forwards (attention
    matmuls, Swin's functional `F.linear` on its modules' weights) is `other`, a constant: it acts
    on channels no prunable group reaches (a transformer's residual stream is LayerNorm-ed, its
    heads cross opaque reshapes), so a plan does not change it.
    """

    def __init__(self, groups: ChannelGroups, example_input: torch.Tensor):
        self.layers: dict[str, dict] = {}
        observe_forward(groups.model, example_input,
                        {m: self._record(n) for n, m in groups.model.named_modules() if isinstance(m, ROOT_TYPES)})
        self.other = max(0, count_flops(groups.model, example_input) - self._layer_macs({}, ()))
        # per group: for each item, the layer, direction and the root index of every local index
        modules = dict(groups.model.named_modules())
        self.items = [[(n, kind, idx) for n, kind, idx in members if isinstance(modules[n], ROOT_TYPES)]
                      for members in groups.members]
        self.roots = groups.roots

    def _record(self, name):
        def hook(m, inp, out):
            if isinstance(m, nn.Conv2d):
                self.layers[name] = dict(out=m.out_channels, inp=m.in_channels, groups=m.groups,
                                         k=math.prod(m.kernel_size), pos=out.shape[-1] * out.shape[-2],
                                         dw=_is_depthwise(m))
            else:
                self.layers[name] = dict(out=m.out_features, inp=m.in_features, groups=1, k=1,
                                         pos=out[0].numel() // m.out_features, dw=False)
        return hook

    def macs(self, plan: dict[str, torch.Tensor] | None = None, skip: list[str] = ()) -> int:
        """MACs with the channels of `plan` removed and the modules named in `skip` (and their
        children) left out entirely."""
        removed = {n: {"out": 0, "in": 0} for n in self.layers}
        for root, entries in zip(self.roots, self.items):
            if plan is None or root not in plan:
                continue
            dropped = ~plan[root].cpu()
            for name, kind, root_idxs in entries:
                removed[name][kind] += int(dropped[root_idxs].sum())
        return self.other + self._layer_macs(removed, skip)

    def _layer_macs(self, removed: dict, skip) -> int:
        total = 0
        prefixes = tuple(f"{p}." for p in skip)
        for name, L in self.layers.items():
            if name.startswith(prefixes):
                continue
            cut = removed.get(name, {"out": 0, "in": 0})
            out = L["out"] - cut["out"]
            if L["dw"]:
                total += out * L["k"] * L["pos"]
            else:
                inp = L["inp"] - cut["in"]
                total += out * (inp // L["groups"]) * L["k"] * L["pos"]
        return total


def drop_order(scores: torch.Tensor, slices: int = 1) -> torch.Tensor:
    """Indices in the order a plan drops them, lowest score first (stable). With `slices` > 1
    (a group a grouped conv cuts in equal slices) a position goes from every slice at once,
    ranked by its mean score over the slices (torch-pruning's MetaPruner averages likewise), so
    dropping any multiple of `slices` of the first indices drops the same positions everywhere."""
    if slices == 1:
        return torch.sort(scores, stable=True).indices
    per = scores.numel() // slices
    ranked = torch.sort(scores.view(slices, per).mean(0), stable=True).indices
    return (ranked[:, None] + per * torch.arange(slices)).flatten()


def kept_counts(size: int, slices: int = 1, round_to: int = 1, floor: int = 1) -> list[int]:
    """Kept counts a group can step through, largest first, below `size` down to `floor`: whole
    slices-worth (a multiple of `slices`) and, with `round_to`, multiples of it."""
    return [k for k in range(size - 1, max(floor, 1) - 1, -1)
            if k % slices == 0 and (round_to <= 1 or k % round_to == 0)]


def _plan_for(scores, counts, slices) -> list[torch.Tensor]:
    plans = []
    for s, n_prune, sl in zip(scores, counts, slices):
        keep = torch.ones(len(s), dtype=torch.bool)
        if n_prune > 0:
            keep[drop_order(s, sl)[:n_prune]] = False
        plans.append(keep)
    return plans


def _prune_events(mode, scores, sizes, round_to, slices) -> list[tuple[float, int, int]]:
    """Single prune steps (key, group, channels pruned after the step), in the order they apply.

    `uniform` orders steps by the group's pruned fraction after the step, so every prefix keeps
    the groups' ratios as equal as channel counts allow; `global` orders by the group-normalised
    score of the channel removed. Kept counts stay ≥ 1 and, with `round_to`, multiples of it; a
    sliced group (grouped conv) steps a whole position of every slice at a time.
    """
    events = []
    for g, (s, size, sl) in enumerate(zip(scores, sizes, slices)):
        unit = s.view(sl, -1).mean(0) if sl > 1 else s
        norm = torch.sort(unit / (unit.mean() + 1e-12), stable=True).values
        for kept in kept_counts(size, sl, round_to):
            pruned = size - kept
            key = pruned / size if mode == "uniform" else float(norm[pruned // sl - 1])
            events.append((key, g, pruned))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    return events


def solve_flops_target(groups: ChannelGroups, flops: FlopsModel, scores: list[torch.Tensor], target: float,
                       mode: str = "uniform", round_to: int = 1, tolerance: float = 0.02) -> dict[str, torch.Tensor]:
    """Per-group keep masks whose FLOPs reduction is within `tolerance` of `target`.

    Prune steps are ordered once (`_prune_events`); FLOPs fall monotonically along that order, so
    a bisection over the number of steps taken finds the plan closest to the target.
    """
    if mode not in ("uniform", "global"):
        raise PruneLabError(f"unknown channel allocation '{mode}'; choose one of: uniform, global")
    dense = flops.macs()
    events = _prune_events(mode, scores, groups.sizes, round_to, groups.slices)

    def reduction(n_steps):
        counts = [0] * len(groups.sizes)
        for _, g, pruned in events[:n_steps]:
            counts[g] = max(counts[g], pruned)
        plan = dict(zip(groups.roots, _plan_for(scores, counts, groups.slices)))
        return 1.0 - flops.macs(plan) / dense, plan

    lo, hi = 0, len(events)
    while lo < hi:  # smallest number of steps whose reduction reaches the target
        mid = (lo + hi) // 2
        if reduction(mid)[0] < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [reduction(n) for n in {max(lo - 1, 0), lo}]
    achieved, plan = min(candidates, key=lambda c: abs(c[0] - target))
    if abs(achieved - target) > tolerance:
        raise PruneLabError(f"budget={target} is not reachable on this model within ±{tolerance} "
                            f"(closest FLOPs reduction: {achieved:.3f}); every group keeps at least one channel")
    return plan
