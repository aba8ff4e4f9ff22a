"""A space of nested subnets of a ResNet: per-stage depth × per-stage width.

Every subnet is a slice of the full network: a stage of depth d keeps its first block and the
d − 1 most important others; a stage of width w keeps, in every channel group of that stage, the
top ⌈w·C⌉ channels of a fixed importance order. A subnet is run *inside* the full model (skipped
blocks swapped for identities, dropped channels zeroed by forward hooks), which computes exactly
what the physically extracted model computes — tests hold the two to 1e-5.
Hand-written: no library offers nested-subnet slicing over torch-pruning's channel groups.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.structure import ChannelGroups, FlopsModel, drop_order

DEFAULT_WIDTHS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class Arch:
    depths: tuple[int, ...]
    widths: tuple[float, ...]

    def genes(self) -> list:
        return [*self.depths, *self.widths]

    def as_dict(self) -> dict:
        return {"depths": list(self.depths), "widths": list(self.widths)}


def find_stages(model: nn.Module) -> list[tuple[str, nn.Sequential]]:
    """ResNet stages: the `layer1`, `layer2`, ... sequences of residual blocks."""
    stages = []
    for i in range(1, 10):
        stage = getattr(model, f"layer{i}", None)
        if not isinstance(stage, nn.Sequential):
            break
        stages.append((f"layer{i}", stage))
    if not stages:
        raise PruneLabError(f"model {type(model).__name__} is not supported by stp: it needs ResNet stages "
                            "(layer1, layer2, ... of residual blocks), as the CIFAR and torchvision ResNets have")
    return stages


class SubnetSpace:
    """Depth and width choices of one model, with its channel groups and FLOPs model.

    `reduction(arch)` is the budget's measure: the FLOPs reduction, or, given a latency table
    (`table`, target=latency), the latency reduction the table predicts for the subnet."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module],
                 widths=DEFAULT_WIDTHS, table=None):
        self.model = model
        self.table = None
        self.table_dense_ms = None
        self.stages = find_stages(model)
        self.stage_names = [n for n, _ in self.stages]
        self.num_blocks = [len(s) for _, s in self.stages]
        self.widths = tuple(sorted(float(w) for w in widths))
        if not self.widths or self.widths[0] <= 0 or self.widths[-1] != 1.0:
            raise PruneLabError(f"method.widths={list(widths)} must be ratios in (0, 1] that include 1.0")
        self.groups = ChannelGroups(model, example_input, ignored=ignored)
        self.flops = FlopsModel(self.groups, example_input)
        self.dense_macs = self.flops.macs()
        self.group_stage = [self._stage_of(entries) for entries in self.flops.items]
        # importance orders (set by `order`); identity until then
        self.channel_order = [torch.arange(n) for n in self.groups.sizes]
        self.block_order = [list(range(1, n)) for n in self.num_blocks]
        if table is not None:
            self.use_table(table)

    def use_table(self, table) -> None:
        """Measure subnets by the latency reduction `table` (a LatencyTable of this model's
        shapes) predicts instead of their FLOPs reduction."""
        self.table = table
        self.table_dense_ms = table.predict_ms(None)  # fixed: computed once, not on every call

    def _stage_of(self, entries) -> int:
        """A group belongs to the first stage whose layers produce its channels (the stem's
        channels are stage 1's residual stream)."""
        stages = [i for i, s in enumerate(self.stage_names) for name, kind, _ in entries
                  if kind == "out" and name.startswith(s + ".")]
        return min(stages) if stages else 0

    # -- importance order -------------------------------------------------------------
    @torch.no_grad()
    def order(self, channel_scores: list[torch.Tensor]) -> None:
        """Fix the nesting: channels by score (high first), non-first blocks by mean |w|."""
        # highest first, stable (a grouped conv's positions are kept in all its groups at once)
        self.channel_order = [drop_order(-s, sl) for s, sl in zip(channel_scores, self.groups.slices)]
        self.block_order = []
        for _, stage in self.stages:
            score = {j: torch.cat([p.detach().abs().flatten() for p in stage[j].parameters()]).mean().item()
                     for j in range(1, len(stage))}
            self.block_order.append(sorted(score, key=lambda j: -score[j]))

    # -- architectures ----------------------------------------------------------------
    def largest(self) -> Arch:
        return Arch(tuple(self.num_blocks), tuple(1.0 for _ in self.stages))

    def smallest(self) -> Arch:
        return Arch(tuple(1 for _ in self.stages), tuple(self.widths[0] for _ in self.stages))

    def random(self, rng: random.Random) -> Arch:
        return Arch(tuple(rng.randint(1, n) for n in self.num_blocks), tuple(rng.choice(self.widths) for _ in self.stages))

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.1) -> Arch:
        depths = tuple(rng.randint(1, n) if rng.random() < prob else d for d, n in zip(arch.depths, self.num_blocks))
        widths = tuple(rng.choice(self.widths) if rng.random() < prob else w for w in arch.widths)
        return Arch(depths, widths)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        return Arch(tuple(x if rng.random() < 0.5 else y for x, y in zip(a.depths, b.depths)),
                    tuple(x if rng.random() < 0.5 else y for x, y in zip(a.widths, b.widths)))

    def skipped_blocks(self, arch: Arch) -> list[str]:
        out = []
        for (name, _), depth, order in zip(self.stages, arch.depths, self.block_order):
            out += [f"{name}.{j}" for j in sorted(order[depth - 1:])]
        return out

    def kept(self, gi: int, width: float) -> int:
        """Channels group `gi` keeps at `width`: ⌈width · size⌉, at least one, rounded up to whole
        positions of every group of a grouped conv."""
        size, slices = self.groups.sizes[gi], self.groups.slices[gi]
        return slices * max(1, math.ceil(width * size / slices - 1e-9))

    def channel_plan(self, arch: Arch) -> dict[str, torch.Tensor]:
        plan = {}
        for gi, (root, size, order, stage) in enumerate(zip(self.groups.roots, self.groups.sizes, self.channel_order,
                                                            self.group_stage)):
            keep = torch.zeros(size, dtype=torch.bool)
            keep[order[:self.kept(gi, arch.widths[stage])]] = True
            plan[root] = keep
        return plan

    def macs(self, arch: Arch) -> int:
        return self.flops.macs(self.channel_plan(arch), skip=self.skipped_blocks(arch))

    def flops_reduction(self, arch: Arch) -> float:
        return 1.0 - self.macs(arch) / self.dense_macs

    def latency_reduction(self, arch: Arch) -> float:
        """The table's predicted latency reduction (LatencyTable.reduction, its dense prediction cached)."""
        return 1.0 - self.table.predict_ms(self.channel_plan(arch), self.skipped_blocks(arch)) / self.table_dense_ms

    def reduction(self, arch: Arch) -> float:
        """The budget's measure of `arch`: its predicted latency reduction with a table, else its FLOPs reduction."""
        return self.flops_reduction(arch) if self.table is None else self.latency_reduction(arch)

    # -- running a subnet inside the full model -----------------------------------------
    @contextmanager
    def activate(self, arch: Arch):
        """Within the block, `self.model(x)` computes subnet `arch`."""
        modules = dict(self.model.named_modules())
        plan = self.channel_plan(arch)
        handles, swapped = [], []
        for gi, (root, members, size, stage) in enumerate(zip(self.groups.roots, self.groups.members, self.groups.sizes,
                                                              self.group_stage)):
            if self.kept(gi, arch.widths[stage]) >= size:  # whole: decided on the host, no read
                continue
            keep = plan[root]
            for name, kind, root_idxs in members:  # every producer of the group's channels (conv, BN)
                if kind == "out":  # the mask moves to the module's device once per subnet, not once per forward
                    device = next(modules[name].parameters()).device
                    handles.append(modules[name].register_forward_hook(_zero_channels(keep[root_idxs].to(device))))
        for name in self.skipped_blocks(arch):
            stage_name, j = name.rsplit(".", 1)
            stage = modules[stage_name]
            swapped.append((stage, int(j), stage[int(j)]))
            stage[int(j)] = nn.Identity()
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for stage, j, block in swapped:
                stage[j] = block


def _zero_channels(keep: torch.Tensor):
    def hook(module, inputs, output):
        mask = keep.to(output.dtype).view(1, -1, *([1] * (output.dim() - 2)))
        return output * mask
    return hook
