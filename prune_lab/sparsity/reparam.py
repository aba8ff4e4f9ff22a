"""Linear over-parameterization: expand a conv/linear layer into an equivalent chain, merge it back.

A k×k conv W (C_out × C_in per group) becomes 1×1 (C_in → r·C_in) → k×k (r·C_in → r·C_out, the
original stride, padding and dilation) → 1×1 (r·C_out → C_out), with no bias, BN or nonlinearity
between them (the original bias, if any, sits on the last 1×1). A linear layer becomes
Linear(in → r·in) → Linear(r·in → r·out) → Linear(r·out → out). The chain is initialised so it
computes exactly what W computed: the outer factors A (first) and B (last) are random, the middle
is K[:, :, u, v] = B⁺ · W[:, :, u, v] · A⁺ for every kernel tap, so B·K·A = W because a random
B (C_out × r·C_out) has full row rank and a random A (r·C_in × C_in) full column rank.

Why not identity-plus-zeros: with A = [I; 0] and B = [I, 0] the extra rows and columns of K get
exactly zero gradient forever and the chain never leaves the compact solution's parameter space.

Computing the forward (`compute`): "chain" runs the three layers one after the other; "collapsed"
(the default) composes the kernel W(A, K, B) = B·K·A on every forward (differentiably) and runs
one conv of the original shape. The two are the same function of the same parameters (the chain is
linear), so the gradients of A, K and B are the same too, up to float rounding (tests check it);
"collapsed" costs one small weight product per step instead of r² times the conv's MACs.

Padding commutes with the first 1×1 (any padding mode acts per channel, and A·0 = 0 without a
bias), so the chain matches the original conv at the borders too. Grouped and depthwise convs are
expanded per group: every factor is a grouped conv with the same number of groups, so group g of
the chain only ever mixes the channels of group g of the original layer.

Pure torch; no Lightning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _init_factors(w: torch.Tensor, ratio: int, generator: torch.Generator | None):
    """A (r·in × in), B (out × r·out) random, K = B⁺ W A⁺ per tap; w is (out, in, *taps) of one group."""
    out_c, in_c = w.shape[:2]
    w64 = w.detach().double().cpu()
    # variance-preserving scales, so a block's activations keep the original layer's magnitude
    a = torch.randn(ratio * in_c, in_c, generator=generator, dtype=torch.float64) / in_c ** 0.5
    b = torch.randn(out_c, ratio * out_c, generator=generator, dtype=torch.float64) / (ratio * out_c) ** 0.5
    k = torch.einsum("po,oi...,iq->pq...", torch.linalg.pinv(b), w64, torch.linalg.pinv(a))
    return a, k, b


def _compose(a: torch.Tensor, k: torch.Tensor, b: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W = B · K · A per tap and per group; a: (r·in, in/g), k: (r·out, r·in/g, *taps), b: (out, r·out/g)."""
    parts = zip(a.chunk(groups), k.chunk(groups), b.chunk(groups))
    return torch.cat([torch.einsum("op,pq...,qi->oi...", bb, kk, aa) for aa, kk, bb in parts])


def _check_compute(compute: str) -> str:
    if compute not in ("collapsed", "chain"):
        raise ValueError(f"compute must be 'collapsed' or 'chain', got {compute!r}")
    return compute


class ExpandedConv2d(nn.Module):
    """1×1 → k×k → 1×1 chain equivalent to one Conv2d; `merge()` returns that Conv2d."""

    def __init__(self, conv: nn.Conv2d, ratio: int = 4, generator: torch.Generator | None = None,
                 compute: str = "collapsed"):
        super().__init__()
        self.compute = _check_compute(compute)
        g, (c_out, c_in) = conv.groups, (conv.out_channels, conv.in_channels)
        kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
        self.a = nn.Conv2d(c_in, ratio * c_in, 1, groups=g, bias=False, **kw)
        self.k = nn.Conv2d(ratio * c_in, ratio * c_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, groups=g, bias=False, padding_mode=conv.padding_mode, **kw)
        self.b = nn.Conv2d(ratio * c_out, c_out, 1, groups=g, bias=conv.bias is not None, **kw)
        self.ratio = ratio
        with torch.no_grad():
            out_g = c_out // g
            for gi, w in enumerate(conv.weight.split(out_g, dim=0)):
                a, k, b = _init_factors(w, ratio, generator)
                self.a.weight[gi * a.shape[0]:(gi + 1) * a.shape[0]].copy_(a[:, :, None, None])
                self.k.weight[gi * k.shape[0]:(gi + 1) * k.shape[0]].copy_(k)
                self.b.weight[gi * b.shape[0]:(gi + 1) * b.shape[0]].copy_(b[:, :, None, None])
            if conv.bias is not None:
                self.b.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "chain":
            return self.b(self.k(self.a(x)))
        w = _compose(self.a.weight.flatten(1), self.k.weight, self.b.weight.flatten(1), self.k.groups)
        return self.k._conv_forward(x, w, self.b.bias)  # k's stride, padding (mode), dilation, groups

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        k = self.k
        conv = nn.Conv2d(self.a.in_channels, self.b.out_channels, k.kernel_size, stride=k.stride, padding=k.padding,
                         dilation=k.dilation, groups=k.groups, bias=self.b.bias is not None,
                         padding_mode=k.padding_mode, device=k.weight.device, dtype=k.weight.dtype)
        # float64, so the merge adds no error beyond the final cast
        w = _compose(self.a.weight.flatten(1).double(), k.weight.double(), self.b.weight.flatten(1).double(), k.groups)
        conv.weight.copy_(w.to(conv.weight.dtype))
        if self.b.bias is not None:
            conv.bias.copy_(self.b.bias)
        return conv


class ExpandedLinear(nn.Module):
    """Linear → Linear → Linear chain equivalent to one Linear; `merge()` returns that Linear."""

    def __init__(self, linear: nn.Linear, ratio: int = 4, generator: torch.Generator | None = None,
                 compute: str = "collapsed"):
        super().__init__()
        self.compute = _check_compute(compute)
        n_in, n_out = linear.in_features, linear.out_features
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.a = nn.Linear(n_in, ratio * n_in, bias=False, **kw)
        self.k = nn.Linear(ratio * n_in, ratio * n_out, bias=False, **kw)
        self.b = nn.Linear(ratio * n_out, n_out, bias=linear.bias is not None, **kw)
        self.ratio = ratio
        with torch.no_grad():
            a, k, b = _init_factors(linear.weight, ratio, generator)
            for layer, w in ((self.a, a), (self.k, k), (self.b, b)):
                layer.weight.copy_(w)
            if linear.bias is not None:
                self.b.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "chain":
            return self.b(self.k(self.a(x)))
        return F.linear(x, self.b.weight @ self.k.weight @ self.a.weight, self.b.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        w = self.k.weight
        linear = nn.Linear(self.a.in_features, self.b.out_features, bias=self.b.bias is not None,
                           device=w.device, dtype=w.dtype)
        linear.weight.copy_(_compose(self.a.weight.double(), w.double(), self.b.weight.double()).to(w.dtype))
        if self.b.bias is not None:
            linear.bias.copy_(self.b.bias)
        return linear


EXPANDED_TYPES = (ExpandedConv2d, ExpandedLinear)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def expand_layers(model: nn.Module, ratio: int = 4, generator: torch.Generator | None = None,
                  skip: tuple[str, ...] = (), compute: str = "collapsed") -> list[str]:
    """Replace every Conv2d and Linear of `model` (in place) by its expanded chain; returns their names.

    `skip`: module names left as they are. Layers that are already chains are not expanded again.
    `compute`: how the chains run their forward ("collapsed" or "chain", see the module docstring).
    """
    if ratio < 1:
        raise ValueError(f"expansion ratio must be >= 1, got {ratio}")
    chains = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, EXPANDED_TYPES))
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip and not n.startswith(chains)]
    if any(n == "" for n, _ in targets):
        raise ValueError("cannot expand a bare layer in place; wrap it or use ExpandedConv2d/ExpandedLinear")
    for name, layer in targets:
        chain = ExpandedConv2d if isinstance(layer, nn.Conv2d) else ExpandedLinear
        _replace(model, name, chain(layer, ratio, generator, compute).train(layer.training))
    return [n for n, _ in targets]


def merge_layers(model: nn.Module) -> list[str]:
    """Replace every expanded chain of `model` (in place) by the single layer it equals; returns their names."""
    chains = [(n, m) for n, m in model.named_modules() if isinstance(m, EXPANDED_TYPES)]
    for name, chain in chains:
        _replace(model, name, chain.merge().train(chain.training))
    return [n for n, _ in chains]
