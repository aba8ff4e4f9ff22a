"""Training-cost accounting, the dense stem of ERK methods, and the step count the pipeline
plans before training (what IEE's schedule check relies on)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, compose_cfg
from prune_lab.callbacks import MaskUpdate
from prune_lab.models import create_model
from prune_lab.pipeline import build, run_length
from prune_lab.sparsity import MaskSet, OneShot
from prune_lab.sparsity.cost import TrainingCost, weight_macs
from prune_lab.sparsity.importance import Random


def test_cost_ratio_counts_forward_and_both_backward_products():
    cost = TrainingCost({"a.weight": 100, "b.weight": 300})
    cost.add_step({"a.weight": 1.0, "b.weight": 1.0})
    assert cost.ratio == pytest.approx(1.0)  # dense
    cost = TrainingCost({"a.weight": 100, "b.weight": 300})
    cost.add_step({"a.weight": 0.5, "b.weight": 0.1})  # sparse step: 3·(50 + 30) of 3·400
    cost.add_step({"a.weight": 0.5, "b.weight": 0.1}, {"a.weight": 1.0, "b.weight": 1.0})  # + dense weight grad
    assert cost.ratio == pytest.approx((3 * 80 + 2 * 80 + 400) / (2 * 1200))


def test_weight_macs_are_the_flop_counters():
    model = create_model("resnet8", num_classes=10, in_channels=1)
    x = torch.zeros(1, 1, 8, 8)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        model.eval()(x)
    assert sum(weight_macs(model, x).values()) == counter.get_total_flops() // 2


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_dense_stem_keeps_the_first_layer_dense_and_the_budget_exact(distribution):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    module = SimpleNamespace(model=model, masks=MaskSet(model))
    update = MaskUpdate(0.9, distribution=distribution, importance=Random(seed=0), schedule=OneShot(), dense_stem=True)
    update.update(module, None, 0.9)
    masks = module.masks
    stem = masks.prunable[0]
    assert bool(masks[stem].all()) and update.report() == {"dense_layers": [stem]}
    total = sum(masks[n].numel() for n in masks.prunable)
    kept = sum(int(masks[n].sum()) for n in masks.prunable)
    assert abs((1 - kept / total) - 0.9) < 1e-4  # the rest carries the stem's share
    if distribution == "uniform":  # ERK may cap small layers, this stem included, at dense on its own
        assert all(not bool(masks[n].all()) for n in masks.prunable[1:])
        without = MaskUpdate(0.9, distribution=distribution, importance=Random(seed=0), schedule=OneShot())
        module.masks = MaskSet(model)
        without.update(module, None, 0.9)
        assert not bool(module.masks[stem].all())  # what dense_stem changes: the stem would be pruned


@pytest.mark.parametrize("extra", [[], ["data.batch_size=100", "epochs=3"], ["+trainer.max_steps=20"]])
def test_planned_steps_equal_the_loaders_count(extra, tmp_path, dense_dir):
    """What the checks before training use: the batches the train loader yields × epochs (the
    fast config: 1078 training images at batch 64 = 17 steps per epoch)."""
    cfg = compose_cfg([*FAST, "method=static_erk", *extra], tmp_path / "run", dense_dir)
    dm = build(cfg.data)
    planned = run_length(cfg, dm)[1]
    expected = len(dm.train_dataloader()) * cfg.epochs
    assert planned == (min(expected, 20) if "+trainer.max_steps=20" in extra else expected)
