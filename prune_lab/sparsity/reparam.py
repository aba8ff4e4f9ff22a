"""Linear over-parameterization: expand a conv/linear layer into an equivalent chain, merge it back.

A k×k conv W (C_out × C_in per group) becomes 1×1 (C_in → r·C_in) → k×k (r·C_in → r·C_out, the
original stride, padding and dilation) → 1×1 (r·C_out → C_out), with no bias, BN or nonlinearity
between them (the original bias, if any, sits on the last 1×1). A linear layer becomes
Linear(in → r·in) → Linear(r·in → r·out) → Linear(r·out → out). The chain computes
W = s · B · K · A per kernel tap, with s a fixed scalar (a buffer, not trained).

Initialisation, exact and step-matched. A₀ (r·in × in) has orthonormal columns and B₀ (out × r·out)
orthonormal rows (QR of a Gaussian), so A₀⁺ = A₀ᵀ, B₀⁺ = B₀ᵀ and K₀ = B₀ᵀ W A₀ᵀ per tap gives
B₀ K₀ A₀ = W exactly. To first order in the learning rate η, one SGD step on the factors moves W by

    ΔW = −η [ k_K · G + k_A · T_A(G) + k_B · T_B(G) ],   G = ∂L/∂W,
    T_A(G)_t = W_t Σ_u W_uᵀ G_u,   T_B(G)_t = (Σ_u G_u W_uᵀ) W_t    (t, u: kernel taps)

(the step of K, of A and of B), where with stored factors A = a·A₀, B = b·B₀, K = c·K₀ and
s = 1/(a·b·c): k_K = 1/c², k_A = 1/a², k_B = 1/b² (A₀ᵀA₀ = I and B₀B₀ᵀ = I make the step of K
exactly k_K·G, whatever r). Without s (a·b·c = 1, k_K·k_A·k_B = 1) the three cannot all be small:
orthonormal factors (a = b = c = 1) give ‖ΔW‖ = 1 + 2·(‖W‖-dependent) times vanilla's, measured
3–10× per layer on a trained pruned ResNet-8, independent of r; random Gaussian factors add a
factor ≈ r on the step of K. T_A and T_B are bounded linear maps of G: ‖T_A(G)‖ ≤ σ_A²‖G‖ with σ_A
the spectral norm of W unfolded as (taps·out × in), σ_B likewise for (out × in·taps); the maximum
over groups for a grouped conv, whose maps are block-diagonal). So we take k_K = κ,
k_A = κ/σ_A², k_B = κ/σ_B², i.e. a = σ_A/√κ, b = σ_B/√κ, c = 1/√κ: each factor's share of the step
is at most κ·‖G‖, the middle one's exactly κ·G, and the three are partly aligned. κ = `step_share`,
0.7 by default: the ratio ‖ΔW_expanded‖/‖ΔW_vanilla‖ over all layers of a ResNet-8 is then 0.97–1.09
(one SGD step; trained dense, 90 %-pruned and freshly initialised, digits and random batches;
0.76–1.44 per layer), the same at every r to first order; tests check it at r = 1, 2, 4, 8.

Weight decay: W is linear in K, so decaying K alone by η·λ scales W by exactly (1 − η·λ), which is
plain SGD's decay of W; decaying A and B too would shrink W about 3× as fast. The outer factors are
therefore listed by `no_decay_parameters()` (the Lightning module puts them in a weight_decay=0
group); K and the bias keep the optimizer's decay.

Why not identity-plus-zeros: with A = [I; 0] and B = [I, 0] the extra rows and columns of K get
exactly zero gradient forever and the chain never leaves the compact solution's parameter space.

Computing the forward (`compute`): "chain" runs the three layers one after the other; "collapsed"
(the default) composes the kernel W(A, K, B) = s·B·K·A on every forward (differentiably) and runs
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

DEFAULT_STEP_SHARE = 0.7


def _orthonormal_columns(rows: int, cols: int, generator: torch.Generator | None) -> torch.Tensor:
    """rows × cols (rows ≥ cols) with orthonormal columns, uniformly (Haar) distributed."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _gains(w: torch.Tensor, groups: int, step_share: float) -> tuple[float, float, float]:
    """Stored scales (a, b, c) of A₀, B₀, K₀: a = σ_A/√κ, b = σ_B/√κ, c = 1/√κ (module docstring)."""
    sigma_a = sigma_b = 0.0
    for wg in w.detach().double().cpu().chunk(groups):
        sigma_a = max(sigma_a, float(torch.linalg.matrix_norm(wg.movedim(1, -1).reshape(-1, wg.shape[1]), 2)))
        sigma_b = max(sigma_b, float(torch.linalg.matrix_norm(wg.flatten(1), 2)))
    root = step_share ** 0.5
    # an all-zero W has T_A = T_B = 0: any positive scale is exact
    return (sigma_a or 1.0) / root, (sigma_b or 1.0) / root, 1.0 / root


def _init_factors(w: torch.Tensor, ratio: int, generator: torch.Generator | None, gains: tuple[float, float, float]):
    """A = a·A₀ (r·in × in), B = b·B₀ (out × r·out), K = c·B₀ᵀ W A₀ᵀ per tap; w is (out, in, *taps) of one group."""
    out_c, in_c = w.shape[:2]
    a0 = _orthonormal_columns(ratio * in_c, in_c, generator)
    b0 = _orthonormal_columns(ratio * out_c, out_c, generator).t()
    k0 = torch.einsum("po,oi...,iq->pq...", b0.t(), w.detach().double().cpu(), a0.t())
    a, b, c = gains
    return a * a0, c * k0, b * b0


def _compose(a: torch.Tensor, k: torch.Tensor, b: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W = B · K · A per tap and per group; a: (r·in, in/g), k: (r·out, r·in/g, *taps), b: (out, r·out/g)."""
    parts = zip(a.chunk(groups), k.chunk(groups), b.chunk(groups))
    return torch.cat([torch.einsum("op,pq...,qi->oi...", bb, kk, aa) for aa, kk, bb in parts])


def _check(compute: str, ratio, step_share) -> None:
    if compute not in ("collapsed", "chain"):
        raise ValueError(f"compute must be 'collapsed' or 'chain', got {compute!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"expansion ratio must be an integer >= 1, got {ratio!r}")
    if not 0.0 < float(step_share) <= 1.0:
        raise ValueError(f"step_share must be in (0, 1], got {step_share!r}")


class ExpandedConv2d(nn.Module):
    """1×1 → k×k → 1×1 chain equivalent to one Conv2d; `merge()` returns that Conv2d."""

    def __init__(self, conv: nn.Conv2d, ratio: int = 4, generator: torch.Generator | None = None,
                 compute: str = "collapsed", step_share: float = DEFAULT_STEP_SHARE):
        super().__init__()
        _check(compute, ratio, step_share)
        self.compute = compute
        g, (c_out, c_in) = conv.groups, (conv.out_channels, conv.in_channels)
        kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
        self.a = nn.Conv2d(c_in, ratio * c_in, 1, groups=g, bias=False, **kw)
        self.k = nn.Conv2d(ratio * c_in, ratio * c_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                           dilation=conv.dilation, groups=g, bias=False, padding_mode=conv.padding_mode, **kw)
        self.b = nn.Conv2d(ratio * c_out, c_out, 1, groups=g, bias=conv.bias is not None, **kw)
        self.ratio = ratio
        gains = _gains(conv.weight, g, float(step_share))
        # s = 1/(a·b·c): fixed, saved with the weights (a resumed run must not recompute it from trained ones)
        self.register_buffer("scale", torch.tensor(1.0 / (gains[0] * gains[1] * gains[2]), **kw))
        with torch.no_grad():
            out_g = c_out // g
            for gi, w in enumerate(conv.weight.split(out_g, dim=0)):
                a, k, b = _init_factors(w, ratio, generator, gains)
                self.a.weight[gi * a.shape[0]:(gi + 1) * a.shape[0]].copy_(a[:, :, None, None])
                self.k.weight[gi * k.shape[0]:(gi + 1) * k.shape[0]].copy_(k)
                self.b.weight[gi * b.shape[0]:(gi + 1) * b.shape[0]].copy_(b[:, :, None, None])
            if conv.bias is not None:
                self.b.bias.copy_(conv.bias)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """The outer factors: weight decay acts on K only (the module docstring says why)."""
        return [self.a.weight, self.b.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "chain":
            return self.b._conv_forward(self.k(self.a(x)), self.b.weight * self.scale, self.b.bias)
        w = _compose(self.a.weight.flatten(1), self.k.weight, self.b.weight.flatten(1), self.k.groups) * self.scale
        # einsum leaves a 1x1 weight with channels-last strides (5, 1, 5, 5): the conv would then take the
        # channels-last path whatever the input's layout (and oneDNN's strided 1x1 backward with < 8 input
        # channels corrupts memory there, see PruneLabModule): give the weight the input's layout
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        w = w.clone(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self.k._conv_forward(x, w, self.b.bias)  # k's stride, padding (mode), dilation, groups

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        k = self.k
        conv = nn.Conv2d(self.a.in_channels, self.b.out_channels, k.kernel_size, stride=k.stride, padding=k.padding,
                         dilation=k.dilation, groups=k.groups, bias=self.b.bias is not None,
                         padding_mode=k.padding_mode, device=k.weight.device, dtype=k.weight.dtype)
        # float64, so the merge adds no error beyond the final cast
        w = _compose(self.a.weight.flatten(1).double(), k.weight.double(), self.b.weight.flatten(1).double(), k.groups)
        conv.weight.copy_((w * self.scale.double()).to(conv.weight.dtype))
        if self.b.bias is not None:
            conv.bias.copy_(self.b.bias)
        return conv


class ExpandedLinear(nn.Module):
    """Linear → Linear → Linear chain equivalent to one Linear; `merge()` returns that Linear."""

    def __init__(self, linear: nn.Linear, ratio: int = 4, generator: torch.Generator | None = None,
                 compute: str = "collapsed", step_share: float = DEFAULT_STEP_SHARE):
        super().__init__()
        _check(compute, ratio, step_share)
        self.compute = compute
        n_in, n_out = linear.in_features, linear.out_features
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.a = nn.Linear(n_in, ratio * n_in, bias=False, **kw)
        self.k = nn.Linear(ratio * n_in, ratio * n_out, bias=False, **kw)
        self.b = nn.Linear(ratio * n_out, n_out, bias=linear.bias is not None, **kw)
        self.ratio = ratio
        gains = _gains(linear.weight, 1, float(step_share))
        self.register_buffer("scale", torch.tensor(1.0 / (gains[0] * gains[1] * gains[2]), **kw))
        with torch.no_grad():
            a, k, b = _init_factors(linear.weight, ratio, generator, gains)
            for layer, w in ((self.a, a), (self.k, k), (self.b, b)):
                layer.weight.copy_(w)
            if linear.bias is not None:
                self.b.bias.copy_(linear.bias)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return [self.a.weight, self.b.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "chain":
            return F.linear(self.k(self.a(x)), self.b.weight * self.scale, self.b.bias)
        return F.linear(x, self.b.weight @ self.k.weight @ self.a.weight * self.scale, self.b.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        w = self.k.weight
        linear = nn.Linear(self.a.in_features, self.b.out_features, bias=self.b.bias is not None,
                           device=w.device, dtype=w.dtype)
        merged = _compose(self.a.weight.double(), w.double(), self.b.weight.double()) * self.scale.double()
        linear.weight.copy_(merged.to(w.dtype))
        if self.b.bias is not None:
            linear.bias.copy_(self.b.bias)
        return linear


EXPANDED_TYPES = (ExpandedConv2d, ExpandedLinear)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def expand_layers(model: nn.Module, ratio: int = 4, generator: torch.Generator | None = None,
                  skip: tuple[str, ...] = (), compute: str = "collapsed",
                  step_share: float = DEFAULT_STEP_SHARE) -> list[str]:
    """Replace every Conv2d and Linear of `model` (in place) by its expanded chain; returns their names.

    `skip`: module names left as they are. Layers that are already chains are not expanded again.
    `compute`: how the chains run their forward ("collapsed" or "chain", see the module docstring).
    `step_share`: κ of the step-matched initialisation (module docstring).
    """
    _check(compute, ratio, step_share)
    chains = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, EXPANDED_TYPES))
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip and not n.startswith(chains)]
    if any(n == "" for n, _ in targets):
        raise ValueError("cannot expand a bare layer in place; wrap it or use ExpandedConv2d/ExpandedLinear")
    for name, layer in targets:
        chain = ExpandedConv2d if isinstance(layer, nn.Conv2d) else ExpandedLinear
        _replace(model, name, chain(layer, ratio, generator, compute, step_share).train(layer.training))
    return [n for n, _ in targets]


def merge_layers(model: nn.Module) -> list[str]:
    """Replace every expanded chain of `model` (in place) by the single layer it equals; returns their names."""
    chains = [(n, m) for n, m in model.named_modules() if isinstance(m, EXPANDED_TYPES)]
    for name, chain in chains:
        _replace(model, name, chain.merge().train(chain.training))
    return [n for n, _ in chains]
