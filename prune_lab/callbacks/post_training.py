"""Post-training steps: run once on the calibration data before training, or instead of it.

These are not Lightning callbacks but the steps of a method's `prepare:` list, which the
pipeline calls as `step(module, datamodule, trainer)` after the dense weights are loaded (and
never on resume). They make the no-training baselines of UniPTS (METHODS.md §2):

- `OneShotMagnitude`: one-shot magnitude pruning to the budget (uniform | global | erk).
- `RecalibrateBN`: reset and re-estimate the BN statistics on the calibration set.
- `LayerwiseReconstruction`: one-shot magnitude pruning, then per layer the kept weights are
  re-fitted to the dense layer's output (POT-style; see `sparsity/reconstruction.py`).
"""
from __future__ import annotations

import copy
import logging

import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import calibration_batches, masks_from_scores, recalibrate_bn
from prune_lab.sparsity.allocation import DISTRIBUTIONS
from prune_lab.sparsity.reconstruction import reconstruct_layers

log = logging.getLogger("prune_lab")


def _device(trainer) -> torch.device:
    try:
        return trainer.strategy.root_device
    except Exception:  # a strategy that knows its device only inside fit
        return torch.device("cpu")


def _calibration(datamodule, samples, device):
    datamodule.setup("fit")
    return calibration_batches(datamodule.train_dataloader(), samples, device)


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

    def __call__(self, module, datamodule, trainer) -> None:
        prune_one_shot(module, self.budget, self.distribution)


class RecalibrateBN:
    def __init__(self, samples: int | None = None, noise_std: float = 1e-6, momentum: float | None = None, seed: int = 0):
        _check_samples(samples)
        self.samples, self.noise_std, self.momentum, self.seed = samples, float(noise_std), momentum, int(seed)

    def __call__(self, module, datamodule, trainer) -> None:
        device = _device(trainer)
        module.model.to(device)
        recalibrate_bn(module.model, _calibration(datamodule, self.samples, device), self.noise_std,
                       self.momentum, self.seed)


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
        self.report: dict = {}

    def __call__(self, module, datamodule, trainer) -> None:
        from rich.progress import Progress

        device = _device(trainer)
        module.model.to(device)
        dense = copy.deepcopy(module.model).eval()
        prune_one_shot(module, self.budget, self.distribution)
        batches = _calibration(datamodule, self.samples, device)
        masks = {n: module.masks[n] for n in module.masks.prunable}
        with Progress(transient=True) as bar:
            task = bar.add_task("layer-wise reconstruction", total=len(masks))
            self.report = reconstruct_layers(dense, module.model, masks, batches, self.steps, self.lr,
                                             self.batch_size, self.inputs, self.seed,
                                             on_layer=lambda _n: bar.advance(task))
        module.masks.apply()
        before = sum(r["before"] for r in self.report.values())
        after = sum(r["after"] for r in self.report.values())
        log.info("layer-wise reconstruction: summed output MSE %.4g -> %.4g over %d layers", before, after, len(masks))
