"""Layer-wise one-shot pruning from calibration inputs: the Optimal-Brain-Surgeon machinery of
SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"; after OBC, Frantar et al. 2022, "Optimal Brain Compression"), and the input statistics
Wanda needs too (`sparsity/wanda.py`). Pure torch, no Lightning.

Every layer is a linear map on columns. A Linear layer's columns are its input features; a
convolution's are the im2col columns (in_channel, kh, kw) of every output position of every sample,
so its weight is the matrix out × (in·kh·kw) and `conv(x) = W · unfold(x)` (a grouped convolution is
one such matrix per group). With X (tokens × columns) the layer's calibration inputs, pruning a row
w of W to ŵ changes that row's outputs by ‖X(w − ŵ)‖² = (w − ŵ)ᵀ XᵀX (w − ŵ): the layer-wise
problem is quadratic with Hessian H ∝ XᵀX, the same for every row, and that is all SparseGPT uses.

SparseGPT's solver (`sparsegpt_prune`), as the paper's Algorithm 1 describes it:

- H = 2·XᵀX/n + λI, λ = dampening · mean diag(H) (the paper dampens by 1 % of the mean diagonal
  so that H⁻¹ exists and is well conditioned).
- Columns are processed left to right. When column j is reached, the weights of columns < j are
  frozen (pruned or kept, no longer updated); pruning weight w_j of a row and letting only the
  not-yet-processed weights (columns ≥ j) compensate is an OBS step on the sub-problem of columns
  F_j = {j, …, d−1}: δ = −w_j / [H_F⁻¹]_jj · [H_F⁻¹]_{j,:}, with H_F⁻¹ = (H[F_j, F_j])⁻¹.
- The inverses of all these nested sub-problems come from one factorisation: with H⁻¹ = UᵀU (U the
  upper Cholesky factor of H⁻¹), row j of U satisfies [H_F⁻¹]_{j,:} = U_jj · U[j, j:]. So
  δ = −(w_j / U_jj) · U[j, j:], and the OBS error of pruning w_j there is w_j² / U_jj². The same U
  serves every row, which is why the update is one outer product over all rows at once.
- Mask selection is adaptive: every `block_size` columns the mask of the block is chosen from the
  *current* (already compensated) weights by the score w² / U_cc² — unstructured: the block's
  lowest scores (the layer's sparsity in every block); N:M: in every M consecutive columns the
  M − N lowest scores of each row.
- Lazy batching: the updates of a block's pruned weights reach the columns after the block once,
  as one matrix product E · U[block, after] — the same result as column-by-column updates.

Bias terms are not changed (SparseGPT updates weights only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.nm import NMPattern
from prune_lab.sparsity.reconstruction import StopForward, forward_until_stopped

# unfold at most this many elements at once (a batch is split along samples beyond it)
_CHUNK_ELEMENTS = 1 << 25


# -- layers as matrices ------------------------------------------------------------------------
def _check_layer(layer: nn.Module) -> None:
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise PruneLabError(f"{type(layer).__name__} layers are not supported by the layer-wise (OBS/Wanda) "
                            "pruners; they handle Linear, Conv1d and Conv2d")


def groups_of(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def weight_matrix(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """(groups, out/groups, in/groups·k…) view: each group's rows × its im2col columns, in the
    weight's own (in, kh, kw) column order."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def unfold_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as its matrix X: (groups, tokens, columns), columns in the weight's
    (in, kh, kw) order, so that layer(x) = X · Wᵀ per group (+ bias). Padding is applied as the
    layer pads (zeros, or its padding_mode); padded positions are real inputs of the layer."""
    _check_layer(layer)
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).unsqueeze(0)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(layer.kernel_size)
    else:
        padding = layer.padding
    kernel, dilation, stride = layer.kernel_size, layer.dilation, layer.stride
    if isinstance(layer, nn.Conv1d):  # a 1-high image
        x = x.unsqueeze(-2)
        kernel, dilation, stride, padding = ((1, *kernel), (1, *dilation), (1, *stride), (0, *padding))
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C·K, L), C-major
    n, ck, positions = cols.shape
    g = layer.groups
    return cols.view(n, g, ck // g, positions).permute(1, 0, 3, 2).reshape(g, n * positions, ck // g)


def nm_order(weight: torch.Tensor) -> torch.Tensor:
    """Column permutation (in, kh, kw) → (kh, kw, in): in that order M consecutive columns are M
    consecutive input channels at one kernel position, the groups `NMPattern` (nm.py) uses."""
    if weight.dim() <= 2:
        return torch.arange(weight.shape[1], device=weight.device)
    c, k = weight.shape[1], math.prod(weight.shape[2:])
    return torch.arange(c * k, device=weight.device).reshape(c, k).t().reshape(-1)


class InputStats:
    """Running statistics of one layer's calibration inputs, per group: the Gram matrix XᵀX
    (`gram=True`), the per-column sums of squares Σ_t X_tj² (`sq=True`; ‖X_j‖₂² for Wanda) and the
    number of tokens. Accumulated in float64 so that millions of tokens add up exactly enough."""

    def __init__(self, layer: nn.Module, gram: bool = True, sq: bool = True):
        self.layer, self.want_gram, self.want_sq = layer, gram, sq
        self.gram: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        per_sample = max(1, x[0].numel() * math.prod(getattr(self.layer, "kernel_size", (1,))))
        step = max(1, _CHUNK_ELEMENTS // per_sample)
        for part in x.split(step):
            cols = unfold_inputs(self.layer, part.float())
            if self.want_sq:
                s = cols.square().sum(1).double()
                self.sq = s if self.sq is None else self.sq + s
            if self.want_gram:
                g = (cols.transpose(1, 2) @ cols).double()
                self.gram = g if self.gram is None else self.gram + g
            self.tokens += cols.shape[1]


# -- SparseGPT ---------------------------------------------------------------------------------
def hessian(gram: torch.Tensor, tokens: int, dampening: float = 0.01) -> torch.Tensor:
    """H = 2·XᵀX/n + λI with λ = dampening · mean diag(2·XᵀX/n) (1 when that mean is 0)."""
    h = 2.0 * gram / max(tokens, 1)
    mean_diag = float(h.diagonal().mean()) if h.numel() else 0.0
    lam = dampening * mean_diag if mean_diag > 0 else 1.0
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def inverse_cholesky(h: torch.Tensor, max_tries: int = 6) -> tuple[torch.Tensor, int]:
    """U upper-triangular with H⁻¹ = UᵀU, and how many times the damping had to be raised (×10 of
    the mean diagonal each time) for the Cholesky factorisations to succeed in this precision."""
    mean_diag = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    for attempt in range(max_tries):
        try:
            lower = torch.linalg.cholesky(h + extra * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), attempt
        except RuntimeError:  # torch.linalg.LinAlgError: not positive definite in this precision
            extra = (extra * 10) if extra else 0.01 * max(mean_diag, 1e-12)
    raise PruneLabError("the layer's Hessian stayed singular after raising its damping; raise method.dampening")


def _block_counts(sparsity: float, rows: int, cols: int, block_size: int) -> list[int]:
    """Pruned weights per column block: round(sparsity · rows · cumulative columns) differences, so
    every block is at the layer's sparsity and the layer prunes exactly round(sparsity · numel)."""
    edges = list(range(0, cols, block_size)) + [cols]
    cum = [round(sparsity * rows * e) for e in edges]
    return [min(cum[i + 1] - cum[i], rows * (edges[i + 1] - edges[i])) for i in range(len(edges) - 1)]


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.0, pattern: NMPattern | None = None,
                    block_size: int = 128, u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the rows of `w` (rows × d) against Hessian `h` (d × d) with OBS updates, in place of
    nothing: returns (new weights, keep-mask). Unstructured at `sparsity` (exactly
    round(sparsity · numel) weights pruned), or `pattern` N:M along the columns (d % M == 0 and
    block_size % M == 0). `u`: H⁻¹'s upper Cholesky factor when already computed. The columns are
    processed in the given order (callers permute for N:M layouts). See the module docstring."""
    rows, d = w.shape
    if pattern is not None and (d % pattern.m or block_size % pattern.m):
        raise PruneLabError(f"N:M {pattern}: columns ({d}) and method.block_size ({block_size}) must be "
                            f"multiples of M={pattern.m}")
    if u is None:
        u = inverse_cholesky(h.to(w.dtype))[0]
    u = u.to(w.dtype)
    w = w.clone()
    keep = torch.ones_like(w, dtype=torch.bool)
    counts = _block_counts(sparsity, rows, d, block_size) if pattern is None else None
    for b, i1 in enumerate(range(0, d, block_size)):
        i2 = min(i1 + block_size, d)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        diag = u1.diagonal()
        err = torch.zeros_like(w1)
        k1 = torch.ones_like(w1, dtype=torch.bool)
        if pattern is None and counts[b] > 0:
            # adaptive mask selection: the block's lowest OBS errors w²/U_cc² on the current weights
            score = (w1.square() / diag.square()).flatten()
            k1.view(-1)[torch.sort(score, stable=True).indices[:counts[b]]] = False
        for j in range(i2 - i1):
            if pattern is not None and j % pattern.m == 0:
                # N:M: in this group of M columns each row keeps its N highest w²/U_cc² (current weights)
                score = w1[:, j:j + pattern.m].square() / diag[j:j + pattern.m].square()
                order = torch.sort(score, dim=1, descending=True, stable=True).indices
                k1[:, j:j + pattern.m] = False
                k1[:, j:j + pattern.m].scatter_(1, order[:, :pattern.n], True)
            # OBS step for the pruned weights of column j; kept ones just freeze (error 0)
            e = torch.where(k1[:, j], torch.zeros_like(w1[:, j]), w1[:, j] / diag[j])
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, i1:i2] = w1 * k1  # the pruned entries are exactly 0 (they are ≈ 0 after the step already)
        keep[:, i1:i2] = k1
        if i2 < d:  # the block's updates reach the later columns at once (lazy batch update)
            w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, keep


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """(‖X(W − Ŵ)ᵀ‖², ‖XWᵀ‖²) from the Gram matrix XᵀX, summed over groups: w, w_hat (groups, rows,
    cols), gram (groups, cols, cols). No bias: it cancels in the difference."""
    g = gram.double()
    delta = (w - w_hat).double()
    err = float(torch.einsum("grc,gcd,grd->", delta, g, delta))
    ref = float(torch.einsum("grc,gcd,grd->", w.double(), g, w.double()))
    return err, ref


# -- calibration passes, layer by layer ---------------------------------------------------------


@torch.no_grad()
def forward_order(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    """`names` (weight names) in the order their layers are first called by a forward pass."""
    modules = dict(model.named_modules())
    layer_of = {n: n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    seen: list[str] = []
    handles = [modules[layer_of[n]].register_forward_pre_hook(lambda _m, _a, n=n: seen.append(n) if n not in seen
                                                              else None) for n in names]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    missing = [n for n in names if n not in seen]
    if missing:
        raise PruneLabError(f"layers {', '.join(missing)} are never called by the model's forward pass; the "
                            "layer-wise pruners need their calibration inputs")
    return seen


@torch.no_grad()
def collect_inputs(model: nn.Module, layers: dict[str, nn.Module], batches, gram: bool, sq: bool,
                   stop_after: bool, bn: str = "running") -> dict[str, InputStats]:
    """One pass over `batches` in eval mode with every layer of `layers` recording its inputs.
    `stop_after` (one layer only): the forward pass is cut right after that layer.

    `bn`: how batch-norm layers normalise during the pass: "running" (eval mode: the model's
    running statistics, the dense model's until they are re-estimated) or "batch" (each calibration
    batch's own statistics; the running statistics are left as they were). With pruned upstream
    layers, "batch" gives the inputs the layer will see once BN is re-estimated after pruning."""
    if bn not in ("running", "batch"):
        raise ValueError(f"bn={bn!r}; choose one of: running, batch")
    stats = {n: InputStats(layer, gram=gram, sq=sq) for n, layer in layers.items()}

    def hook(n):
        def fn(_mod, args, _out):
            stats[n].update(args[0].detach())
            if stop_after:
                raise StopForward
        return fn

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if bn == "batch" else []
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in bns]
    for m in bns:  # batch statistics for normalising; momentum 0 leaves the running statistics unchanged
        m.train()
        m.momentum = 0.0
    try:
        forward_until_stopped(model, batches)
    finally:
        for hd in handles:
            hd.remove()
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    return stats
