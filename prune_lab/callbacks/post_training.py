"""Post-training steps: run once on the calibration data before training, or instead of it.

These are not Lightning callbacks but the steps of a method's `prepare:` list, which the
pipeline calls as `step(module, datamodule, trainer)` after the dense weights are loaded (and
never on resume). They make the no-training baselines of UniPTS (METHODS.md §2):

- `OneShotMagnitude`: one-shot magnitude pruning to the budget (uniform | global | erk).
- `RecalibrateBN`: reset and re-estimate the BN statistics on the calibration set.
- `LayerwiseReconstruction`: one-shot magnitude pruning, then per layer the kept weights are
  re-fitted to the dense layer's output (POT-style; see `sparsity/reconstruction.py`).
- `Wanda`: per-row pruning by |W|·‖X‖₂ from the calibration inputs, no weight update
  (`sparsity/wanda.py`); BN re-estimated after.
- `SparseGPT`: layer by layer, OBS pruning with weight updates from the inputs' Hessian
  (`sparsity/obs.py`); BN re-estimated after.

Every step has `report()`: its record for results.json under its own key (`pruning_wall_s`,
`calibration_passes`, ...), merged by the pipeline; empty when the step did not run (a resume).
"""
from __future__ import annotations

import copy
import logging
import time

import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import calibration_batches, masks_from_scores, recalibrate_bn
from prune_lab.sparsity.allocation import DISTRIBUTIONS, layer_sparsities
from prune_lab.sparsity.nm import NMPattern
from prune_lab.sparsity.obs import (collect_inputs, forward_order, groups_of, hessian, inverse_cholesky, nm_order,
                                    relative_output_error, sparsegpt_prune, weight_matrix)
from prune_lab.sparsity.reconstruction import reconstruct_layers
from prune_lab.sparsity.wanda import wanda_mask

log = logging.getLogger("prune_lab")


def _device(trainer) -> torch.device:
    try:
        return trainer.strategy.root_device
    except Exception:  # a strategy that knows its device only inside fit
        return torch.device("cpu")


def _calibration(datamodule, samples, device):
    datamodule.setup("fit")
    return calibration_batches(datamodule.train_dataloader(), samples, device)


def _clock(device) -> float:
    """Wall time, after the device's queued work (GPU kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _check_samples(samples):
    if samples is not None and (isinstance(samples, bool) or int(samples) < 1):
        raise PruneLabError(f"samples={samples} must be a positive integer or null (null: all calibration data)")


def prune_one_shot(module, budget: float, distribution: str) -> None:
    masks = module.masks
    params = dict(module.model.named_parameters())
    scores = {n: params[n].detach().abs() for n in masks.prunable}
    for n, keep in masks_from_scores(scores, budget, distribution).items():
        masks.set(n, keep)
    masks.apply()


class OneShotMagnitude:
    def __init__(self, budget: float, distribution: str = "uniform"):
        if distribution not in DISTRIBUTIONS:
            raise PruneLabError(f"distribution '{distribution}' is not one of: {', '.join(DISTRIBUTIONS)}")
        self.budget, self.distribution = float(budget), distribution
        self.record: dict = {}

    def __call__(self, module, datamodule, trainer) -> None:
        t0 = time.perf_counter()
        prune_one_shot(module, self.budget, self.distribution)
        self.record = {"pruning_wall_s": time.perf_counter() - t0, "calibration_passes": 0}

    def report(self) -> dict:
        return {"oneshot_magnitude": dict(self.record)} if self.record else {}


class RecalibrateBN:
    """`report()`: `bn_recalibration.pruning_wall_s` is this step's wall time (named as every
    post-training step names it, so a method's steps add up), one calibration pass."""

    def __init__(self, samples: int | None = None, noise_std: float = 1e-6, momentum: float | None = None, seed: int = 0):
        _check_samples(samples)
        self.samples, self.noise_std, self.momentum, self.seed = samples, float(noise_std), momentum, int(seed)
        self.record: dict = {}

    def __call__(self, module, datamodule, trainer) -> None:
        device = _device(trainer)
        t0 = _clock(device)
        module.model.to(device)
        recalibrate_bn(module.model, _calibration(datamodule, self.samples, device), self.noise_std,
                       self.momentum, self.seed)
        self.record = {"pruning_wall_s": _clock(device) - t0, "calibration_passes": 1}

    def report(self) -> dict:
        return {"bn_recalibration": dict(self.record)} if self.record else {}


class LayerwiseReconstruction:
    """Args: budget, distribution (the one-shot pruning); samples (calibration samples used;
    activations of all of them are held per layer), steps, lr, batch_size (Adam per layer),
    inputs ("pruned": the reconstructed network's own activations, or "dense")."""

    def __init__(self, budget: float, distribution: str = "uniform", samples: int | None = 1024, steps: int = 300,
                 lr: float = 1e-3, batch_size: int = 64, inputs: str = "pruned", seed: int = 0):
        if distribution not in DISTRIBUTIONS:
            raise PruneLabError(f"distribution '{distribution}' is not one of: {', '.join(DISTRIBUTIONS)}")
        if inputs not in ("pruned", "dense"):
            raise PruneLabError(f"inputs '{inputs}' is not one of: pruned, dense")
        _check_samples(samples)
        if int(steps) < 0 or int(batch_size) < 1 or not float(lr) > 0:
            raise PruneLabError(f"steps={steps}, batch_size={batch_size}, lr={lr}: need steps >= 0, batch_size >= 1, lr > 0")
        self.budget, self.distribution, self.samples = float(budget), distribution, samples
        self.steps, self.lr, self.batch_size, self.inputs, self.seed = int(steps), float(lr), int(batch_size), inputs, seed
        self.layers: dict = {}  # per layer {"before", "after"}: output MSE of magnitude pruning and after the fit
        self.record: dict = {}

    def report(self) -> dict:
        return {"reconstruction": dict(self.record)} if self.record else {}

    def __call__(self, module, datamodule, trainer) -> None:
        from rich.progress import Progress

        device = _device(trainer)
        t0 = _clock(device)
        module.model.to(device)
        dense = copy.deepcopy(module.model).eval()
        prune_one_shot(module, self.budget, self.distribution)
        batches = _calibration(datamodule, self.samples, device)
        masks = {n: module.masks[n] for n in module.masks.prunable}
        with Progress(transient=True) as bar:
            task = bar.add_task("layer-wise reconstruction", total=len(masks))
            self.layers = reconstruct_layers(dense, module.model, masks, batches, self.steps, self.lr,
                                             self.batch_size, self.inputs, self.seed,
                                             on_layer=lambda _n: bar.advance(task))
        module.masks.apply()
        before = sum(r["before"] for r in self.layers.values())
        after = sum(r["after"] for r in self.layers.values())
        # per layer one (cut-short) pass for the dense inputs and targets, one for the pruned inputs
        passes = len(masks) * (1 if self.inputs == "dense" else 2)
        self.record = {"pruning_wall_s": _clock(device) - t0, "calibration_passes": passes,
                       "mse_before": before, "mse_after": after}
        log.info("layer-wise reconstruction: summed output MSE %.4g -> %.4g over %d layers", before, after, len(masks))


# -- layer-wise pruning from calibration inputs: Wanda, SparseGPT ---------------------------------
class _CalibratedPruner:
    """Shared driver: the calibration set once, the prunable layers in forward order, each layer's
    input statistics from the dense model in one pass (`inputs="dense"`) or, layer by layer, from
    the model as pruned so far (`inputs="pruned"`: one pass cut short after the layer, per layer),
    the layer pruned, then BN statistics re-estimated (`recalibrate_bn`). Captures run in eval
    mode; `capture_bn` says how BN normalises in them: "batch" (each calibration batch's own
    statistics: with pruned upstream layers, the inputs the layer sees once BN is re-estimated),
    "running" (the model's running statistics, the dense model's), "auto" (default): "batch" when
    BN is re-estimated afterwards, else "running" — the inputs of the model as it is deployed.

    `report()[key]`: `pruning_wall_s` (collecting the calibration batches, the capture passes and
    the pruning itself; not the error measurement nor the BN re-estimation, `bn_wall_s`),
    `calibration_passes` (forward passes over the calibration set, cut-short ones included, the BN
    pass too), `reconstruction_error` (Σ over layers of ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² on the inputs X the
    layer was pruned with, before BN re-estimation) and per layer its sparsity and error.
    """

    key = ""
    default_inputs = "pruned"
    need_gram = True  # statistics the pruning reads: the Gram matrix XᵀX, the column norms ‖X_j‖²
    need_sq = False

    def __init__(self, budget: float, distribution: str = "uniform", pattern: str | None = None,
                 inputs: str | None = None, samples: int | None = None, recalibrate_bn: bool = True,
                 noise_std: float = 1e-6, seed: int = 0, capture_bn: str = "auto"):
        if capture_bn not in ("auto", "batch", "running"):
            raise PruneLabError(f"method.capture_bn={capture_bn} is not one of: auto, batch, running")
        if distribution not in ("uniform", "erk"):
            raise PruneLabError(f"method.distribution={distribution} is not one of: uniform, erk (layer by layer, "
                                f"{self.key} has no global ranking)")
        inputs = inputs or self.default_inputs
        if inputs not in ("pruned", "dense"):
            raise PruneLabError(f"method.inputs={inputs} is not one of: pruned, dense")
        _check_samples(samples)
        self.pattern = NMPattern.parse(pattern)
        if self.pattern is not None and abs(float(budget) - self.pattern.sparsity) > 1e-6:
            raise PruneLabError(f"method.pattern={pattern} fixes the sparsity at {self.pattern.sparsity:g}; "
                                f"budget={budget} must be {self.pattern.sparsity:g}")
        self.budget, self.distribution, self.inputs, self.samples = float(budget), distribution, inputs, samples
        self.recalibrate, self.noise_std, self.seed = bool(recalibrate_bn), float(noise_std), int(seed)
        self.capture_bn = capture_bn if capture_bn != "auto" else ("batch" if self.recalibrate else "running")
        self.record: dict = {}
        self.dense_layers: list[str] = []

    def report(self) -> dict:
        if not self.record:
            return {}
        out = {self.key: dict(self.record)}
        if self.pattern is not None:
            out["pattern"] = {"n": self.pattern.n, "m": self.pattern.m, "dense_layers": list(self.dense_layers)}
        return out

    # subclasses: prune one layer in place from its statistics; return (dense, pruned) weights and keep-mask
    def prune_layer(self, layer, stats, sparsity: float):
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def __call__(self, module, datamodule, trainer) -> None:
        device = _device(trainer)
        t0 = _clock(device)
        model = module.model.to(device)
        batches = _calibration(datamodule, self.samples, device)
        names = forward_order(model, list(module.masks.prunable), batches[0][0][:1])
        modules = dict(model.named_modules())
        layers = {n: modules[n.rsplit(".", 1)[0] if "." in n else ""] for n in names}
        if self.pattern is None:
            per_layer = layer_sparsities(self.distribution, {n: tuple(l.weight.shape) for n, l in layers.items()},
                                         self.budget)
            todo = names
        else:
            per_layer = {n: self.pattern.sparsity for n in names}
            self.dense_layers = [n for n in module.masks.prunable if not self.pattern.fits(layers[n].weight)]
            todo = [n for n in names if n not in self.dense_layers]
        t_copy = _clock(device)  # a dense copy only to measure Wanda's errors on dense inputs: not pruning time
        dense_copy = copy.deepcopy(model) if (self.inputs == "dense" and not self.need_gram) else None
        copy_s = _clock(device) - t_copy
        passes, results = 0, {}
        if self.inputs == "dense":  # every layer's statistics from the dense model, one pass
            stats = collect_inputs(model, {n: layers[n] for n in todo}, batches, self.need_gram, self.need_sq, False,
                                   self.capture_bn)
            passes += 1
        for n in todo:
            if self.inputs == "pruned":  # the inputs of the model as pruned so far
                layer_stats = collect_inputs(model, {n: layers[n]}, batches, self.need_gram, self.need_sq, True,
                                             self.capture_bn)[n]
                passes += 1
            else:
                layer_stats = stats.pop(n)
            results[n] = self.prune_layer(layers[n], layer_stats, per_layer[n])
            module.masks.set(n, results[n][2])
            if self.need_gram:  # the Gram matrix is at hand: the error costs nothing more
                results[n] = (*results[n], relative_output_error(*results[n][:2], layer_stats.gram))
            del layer_stats
        module.masks.apply()
        t_pruned = _clock(device)

        errors, measure_passes = {}, 0
        if self.need_gram:
            errors = {n: r[3] for n, r in results.items()}
        elif todo:  # Wanda reads only the column norms: one more pass measures the errors (timed apart)
            source = dense_copy if dense_copy is not None else model  # the inputs each layer was pruned on
            source_modules = dict(source.named_modules())
            grams = collect_inputs(source, {n: source_modules[n.rsplit(".", 1)[0] if "." in n else ""] for n in todo},
                                   batches, True, False, False, self.capture_bn)
            errors = {n: relative_output_error(*results[n][:2], grams[n].gram) for n in todo}
            measure_passes = 1
        del dense_copy
        t_measured = _clock(device)

        if self.recalibrate:
            recalibrate_bn(model, batches, self.noise_std, None, self.seed)
            passes += 1
        t_end = _clock(device)
        layer_rec = {}
        for n in names:
            w = layers[n].weight
            err, ref = errors.get(n, (0.0, 0.0))
            layer_rec[n] = {"sparsity": 1.0 - int(w.count_nonzero()) / w.numel(),
                            "reconstruction_error": err / ref if ref > 0 else 0.0}
        total = sum(r["reconstruction_error"] for r in layer_rec.values())
        self.record = {"pruning_wall_s": t_pruned - t0 - copy_s, "measure_wall_s": t_measured - t_pruned + copy_s,
                       "bn_wall_s": t_end - t_measured, "wall_s": t_end - t0, "calibration_passes": passes,
                       "measurement_passes": measure_passes, "calibration_samples": sum(len(y) for _, y in batches),
                       "inputs": self.inputs, "capture_bn": self.capture_bn, "distribution": self.distribution,
                       "recalibrate_bn": self.recalibrate,
                       **self.settings(), "reconstruction_error": total, "layers": layer_rec}
        log.info("%s: %d layers pruned in %.2f s (%d calibration passes); summed relative output error %.4g",
                 self.key, len(todo), t_pruned - t0 - copy_s, passes, total)


class Wanda(_CalibratedPruner):
    """Wanda (Sun et al. 2023): S_ij = |W_ij|·‖X_j‖₂, the lowest scores of every output row pruned
    (or N:M with `pattern`), no weight update. `inputs="dense"` (default): every layer's norms from
    the dense model in one pass, as the paper computes them; `"pruned"`: layer by layer from the
    model as pruned so far."""

    key = "wanda"
    default_inputs = "dense"
    need_gram, need_sq = False, True

    @torch.no_grad()
    def prune_layer(self, layer, stats, sparsity):
        w = layer.weight.detach()
        keep = wanda_mask(w, stats.sq, sparsity, self.pattern)
        dense = weight_matrix(w.clone(), groups_of(layer))
        layer.weight.mul_(keep)
        return dense, weight_matrix(layer.weight.detach().clone(), groups_of(layer)), keep


class SparseGPT(_CalibratedPruner):
    """SparseGPT (Frantar & Alistarh 2023): per layer H = 2XᵀX/n + λI (λ = `dampening` × mean
    diag), columns pruned in blocks of `block_size` with adaptive masks and OBS updates of the
    remaining weights (`sparsity/obs.py`); N:M with `pattern`. `inputs="pruned"` (default): each
    layer's X from the model as pruned so far. The math runs in float64 on CPU, float32 on GPU."""

    key = "sparsegpt"
    default_inputs = "pruned"
    need_gram, need_sq = True, False

    def __init__(self, budget: float, distribution: str = "uniform", pattern: str | None = None,
                 inputs: str | None = None, samples: int | None = None, recalibrate_bn: bool = True,
                 noise_std: float = 1e-6, seed: int = 0, capture_bn: str = "auto", block_size: int = 128,
                 dampening: float = 0.01):
        super().__init__(budget, distribution, pattern, inputs, samples, recalibrate_bn, noise_std, seed, capture_bn)
        if isinstance(block_size, bool) or int(block_size) < 1:
            raise PruneLabError(f"method.block_size={block_size} must be a positive integer (e.g. 128)")
        if not float(dampening) >= 0:
            raise PruneLabError(f"method.dampening={dampening} must be >= 0 (a fraction of the mean diagonal, "
                                "e.g. 0.01)")
        if self.pattern is not None and int(block_size) % self.pattern.m:
            raise PruneLabError(f"method.block_size={block_size} must be a multiple of M={self.pattern.m} "
                                f"for method.pattern={self.pattern}")
        self.block_size, self.dampening = int(block_size), float(dampening)
        self.damping_raised = 0

    def settings(self) -> dict:
        return {"block_size": self.block_size, "dampening": self.dampening, "damping_raised": self.damping_raised}

    def __call__(self, module, datamodule, trainer) -> None:
        self.damping_raised = 0
        super().__call__(module, datamodule, trainer)

    @torch.no_grad()
    def prune_layer(self, layer, stats, sparsity):
        w = layer.weight.detach()
        groups = groups_of(layer)
        dtype = torch.float64 if w.device.type == "cpu" else torch.float32
        dense = weight_matrix(w, groups).to(dtype, copy=True)
        rows, cols = dense.shape[1:]
        perm = nm_order(w).to(w.device) if self.pattern is not None else torch.arange(cols, device=w.device)
        # exact layer count with groups: each group prunes the difference of the rounded cumulative counts
        cum = [round(sparsity * rows * cols * g) for g in range(groups + 1)]
        new, keep = torch.empty_like(dense), torch.empty_like(dense, dtype=torch.bool)
        for g in range(groups):
            h = hessian(stats.gram[g].to(dtype), stats.tokens, self.dampening)[perm][:, perm]
            u, raised = inverse_cholesky(h)
            self.damping_raised += raised
            pruned, kept = sparsegpt_prune(dense[g][:, perm], h, (cum[g + 1] - cum[g]) / (rows * cols),
                                           self.pattern, self.block_size, u=u)
            new[g][:, perm], keep[g][:, perm] = pruned, kept
        keep_w = keep.reshape(w.shape)
        layer.weight.copy_((new * keep).reshape(w.shape).to(w.dtype))
        return dense, new * keep, keep_w
