"""torch-pruning's dependency graph, with reshapes, slices and splits checked against real shapes.

torch-pruning maps channel indices through a reshape only for a 4-D NCHW flatten and means to
pass other reshapes through unchanged, but its guards read `_saved_self_sizes`, which torch 2
renamed `_saved_self_sym_sizes`: with torch 2 it guesses a flatten mapping from inferred channel
counts for every reshape. On channels-last tensors (Swin) the guess fans indices out until the
group search runs for hours or out of memory; on ShuffleNet's channel shuffle (a 4-D → 5-D view
that permutes channels) it divides by zero. Here each reshape's input and output shapes are
read off one backward of the traced forward, and the reshape is

- passed through when the channel dimension survives it (same size, same number of elements
  before it: a Linear's token views, Swin's windows, ViT's patch flattening);
- mapped by torch-pruning when it flattens the channels with every dimension after them (VGG's
  classifier input), the one case its mapping is for;
- made *opaque* otherwise: the channel dimension is split or merged with others (a channel
  shuffle, attention heads) or cannot be told (no channel count inferred, off the data's path).

A slice along the channel dimension keeps torch-pruning's mapping and one along another
dimension passes channels through (torch-pruning takes dimension 1 of any 4-D tensor for the
channels, wrong for Swin's (B, H, W, C)); splits whose sizes torch-pruning did not find and
concats whose mapping raises (Swin's patch merging) are made opaque too. Groups end at an
opaque node instead of passing through it, and `ChannelGroups` leaves every group that reaches
one unpruned: masks could not say which channels a shrunk copy would lose.
"""
from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import index_mapping, shape_infer

OPTYPE = tp.ops.OPTYPE


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of `model`; `graph.opaque` holds the nodes groups may not cross."""
    # Tracing runs a forward: eval mode keeps BN running statistics untouched.
    was_training = model.training
    model.eval()
    graph = tp.DependencyGraph()
    graph.opaque = set()
    outputs = []
    x = example_input.detach().clone().requires_grad_(True)  # backward to it reaches every reshape of the data

    def forward(m, inp):
        outputs.append(m(inp))
        return outputs[-1]

    try:
        with torch.enable_grad():  # torch-pruning traces through autograd
            try:
                graph.build_dependency(model, example_inputs=x, forward_fn=forward)
            except Exception:
                if not getattr(graph, "module2node", None):
                    raise  # the trace itself failed, not the index mapping after it
            shapes = _reshape_outputs(graph, outputs, x)
    finally:
        model.train(was_training)
    for node in list(graph.module2node.values()):
        if node.type == OPTYPE.RESHAPE:
            _map_reshape(graph, node, shapes.get(node))
        elif node.type == OPTYPE.SPLIT:
            offsets = getattr(node.module, "offsets", None)
            if offsets is None or len(offsets) != len(node.outputs) + 1:
                _make_opaque(graph, node)  # a split with sizes missing for some outputs
        elif node.type == OPTYPE.SLICE:
            _map_slice(graph, node)
        elif node.type in _UPDATES:
            try:  # e.g. a concat whose inputs' channel counts it cannot infer (Swin's patch merging)
                _UPDATES[node.type](graph, node)
            except Exception:
                _make_opaque(graph, node)
    index_mapping.update_index_mapping(graph)  # every other mapping, as build_dependency ends
    return graph


# torch-pruning's mapping updates of the other node kinds, tried one node at a time
_UPDATES = {OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
            OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
            OPTYPE.EXPAND: index_mapping.update_expand_index_mapping}


def _reshape_outputs(graph, outputs, x) -> dict:
    """Output shape of every reshape node on the data's path, from the gradient that reaches it in
    one backward to the input (autograd keeps a view's input shape, not its output's)."""
    nodes = [n for n in graph.module2node.values() if n.type == OPTYPE.RESHAPE]
    seen = {}
    handles = [n.grad_fn.register_prehook(lambda g, n=n: seen.__setitem__(n, tuple(g[0].shape))
                                          if g and g[0] is not None else None) for n in nodes]
    try:
        outs = [o for o in tp.utils.flatten_as_list(outputs) if torch.is_tensor(o) and o.requires_grad]
        if outs and nodes:
            torch.autograd.grad(sum(o.float().sum() for o in outs), [x], allow_unused=True)
    except RuntimeError:  # a graph autograd cannot run back through: torch-pruning's own guesses decide
        seen.clear()
    finally:
        for h in handles:
            h.remove()
    return seen


def _in_channels(graph, node) -> int | None:
    """The channel count of `node`'s input as torch-pruning infers it (from the layers upstream)."""
    for n in node.inputs:
        channels = shape_infer.infer_out_channels_recursively(graph, n, [0])
        if channels:
            return channels
    return None


def _channel_dim(shape: tuple, channels: int) -> int | None:
    """Which dimension of `shape` holds the channels: 1 for an NCHW 4-D tensor (torch-pruning's
    convention), else the last dimension of that size (channels-last tensors, a Linear's tokens)."""
    dims = [d for d, size in enumerate(shape) if size == channels]
    if not dims:
        return None
    return 1 if len(shape) == 4 and 1 in dims else dims[-1]


def _map_reshape(graph, node, out_shape) -> None:
    in_shape = tuple(getattr(node.grad_fn, "_saved_self_sym_sizes", getattr(node.grad_fn, "_saved_self_sizes", ())))
    channels = _in_channels(graph, node)
    if out_shape is None or not in_shape or not channels:  # which dimension is the channels' is unknown
        if len(in_shape) not in (1, 4):
            _pass_through(node)  # what torch-pruning's rank guard means to do
        else:
            _make_opaque(graph, node)
        return
    d_in = _channel_dim(in_shape, channels)
    if d_in is None:
        _make_opaque(graph, node)
        return
    before, after = math.prod(in_shape[:d_in]), math.prod(in_shape[d_in + 1:])
    for d_out in range(len(out_shape)):
        if math.prod(out_shape[:d_out]) != before:
            continue
        if out_shape[d_out] == channels:
            _pass_through(node)
            return
        if out_shape[d_out] == channels * after and d_out == len(out_shape) - 1:
            try:  # a flatten of channels with everything after them: torch-pruning's stride mapping
                index_mapping.update_reshape_index_mapping(graph, node)
                return
            except Exception:
                break
    _make_opaque(graph, node)


def _map_slice(graph, node) -> None:
    """A slice along the channel dimension gets torch-pruning's mapping; one along any other
    dimension passes channels through (torch-pruning takes dimension 1 of a 4-D tensor for the
    channels, which on Swin's channels-last (B, H, W, C) maps a slice of H onto channels)."""
    shape = tuple(getattr(node.grad_fn, "_saved_self_sym_sizes", ()))
    dim, channels = getattr(node.grad_fn, "_saved_dim", None), _in_channels(graph, node)
    d = _channel_dim(shape, channels) if shape and channels and isinstance(dim, int) else None
    if d is None:
        _make_opaque(graph, node)
    elif dim % len(shape) != d:
        _pass_through(node)
    else:
        try:
            index_mapping.update_slice_index_mapping(graph, node)
        except Exception:
            _make_opaque(graph, node)


def _pass_through(node) -> None:
    node.type = OPTYPE.ELEMENTWISE  # identity mapping; torch-pruning's update skips it from now on
    _reset_mappings(node)


def _reset_mappings(node) -> None:
    """Drop the index mappings on `node`'s edges (what torch-pruning's guess wrote); its next
    update rewrites those of concat and split neighbours."""
    for dep in node.dependencies + [d for n in node.inputs + node.outputs for d in n.dependencies if d.target is node]:
        dep.index_mapping = [tp.dependency.constants.INDEX_MAPPING_PLACEHOLDER] * 2


def _make_opaque(graph: tp.DependencyGraph, node) -> None:
    """Keep `node` in the groups that reach it, but let no group pass through it: its mappings go
    and its own dependencies get a trigger no pruning function is."""
    _pass_through(node)
    for dep in node.dependencies:
        dep.trigger = _never
    graph.opaque.add(node)


def _never(*args):
    """The trigger of an opaque node's dependencies: never a layer's pruning function."""


def root_coupling(graph: tp.DependencyGraph, group) -> int | None:
    """How many of its own root channels each root channel of `group` takes with it when pruned.

    Usually 1. A group can reach its root layer again through a second path: in GhostNet a
    block's output is the concatenation of a conv's channels and a depthwise conv of the same
    channels, added to the block's input, so block-input channels i and i + n/2 lean on one conv
    channel and must go together. torch-pruning prunes such a closure whole, but the root indices
    it records per layer keep only the first path, so a plan that drops i alone would shrink more
    than its masks and FLOPs model say. Here the group is walked as torch-pruning walks it, with
    every (layer, index) remembering every root index that reaches it. Returns S when the root
    indices fall into classes {r, r + n/S, r + 2n/S, ...} (a plan then treats them as S slices,
    as for a grouped conv), None for any other coupling (the group is left unpruned)."""
    n = len(group[0].idxs)
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    root = group[0].dep
    owner = {(root.target, root.handler, i): i for i in range(n)}
    seen = {(key, r) for key, r in owner.items()}
    stack = [(root, [_HybridIndex(idx=i, root_idx=i) for i in range(n)])]
    while stack:
        dep, idxs = stack.pop()
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            mapped = idxs
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            fresh = []
            for h in mapped:
                key = (new_dep.target, new_dep.handler, h.idx)
                first = owner.setdefault(key, h.root_idx)
                parent[find(h.root_idx)] = find(first)
                if (key, h.root_idx) not in seen:
                    seen.add((key, h.root_idx))
                    fresh.append(h)
            if fresh:
                stack.append((new_dep, fresh))
    classes = {}
    for r in range(n):
        classes.setdefault(find(r), []).append(r)
    size = len(next(iter(classes.values())))
    if size == 1 and len(classes) == n:
        return 1
    per = n // size
    regular = n % size == 0 and all(c == list(range(c[0], n, per)) and c[0] < per for c in classes.values())
    return size if regular else None
