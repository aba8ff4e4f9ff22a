"""DepGraph's recipe (method=depgraph): torch-pruning's group-norm regulariser before the prune, only
then, without touching BN statistics; the FLOPs budget met on a physically smaller model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prune_lab.callbacks import GroupNormPenalty
from prune_lab.errors import PruneLabError
from prune_lab.models import classifier_of, create_model
from test_pipeline import run_fast

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(model):
    return SimpleNamespace(model=model, example_input=torch.randn(1, 3, 16, 16), device=torch.device("cpu"),
                           classifier=classifier_of(model)[1])


def test_the_penalty_moves_gradients_only_before_until_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).train()
    bn = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    cb = GroupNormPenalty(reg=1e-2, alpha=4, until=0.5)
    module = _module(model)
    cb.on_fit_start(None, module)
    assert all(torch.equal(b, bn[n]) for n, b in model.named_buffers() if "running" in n)  # traced in eval mode
    assert model.training
    conv = model.conv1 if hasattr(model, "conv1") else next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))

    def grads_after(step):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        cb.on_after_backward(SimpleNamespace(global_step=step, estimated_stepping_batches=100), module)
        return conv.weight.grad.clone()

    g = grads_after(10)
    assert g.abs().sum() > 0
    # each output channel's gradient is reg · γ · w with one γ per channel, γ between 1 and alpha
    ratio = (g / conv.weight.detach()).flatten(1)
    gamma = ratio[:, 0] / cb.reg
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    assert float(gamma.min()) >= 1 - 1e-5 and float(gamma.max()) <= 4 + 1e-5
    assert not grads_after(50).any()  # until=0.5 of 100 steps: no penalty from step 50 on


def test_bad_penalty_values_are_one_line():
    with pytest.raises(PruneLabError, match="reg=-1.0, alpha=4, until=0.5: need reg >= 0"):
        GroupNormPenalty(reg=-1.0, alpha=4, until=0.5)


def test_depgraph_meets_the_flops_budget_with_a_smaller_model(tmp_path, dense_dir):
    results, out = run_fast(tmp_path, dense_dir, "method=depgraph", "budget=0.5")
    assert results["budget_met"] and abs(results["pruned"]["flops_reduction"] - 0.5) <= 0.02
    assert results["pruned"]["params"] < results["dense"]["params"]
    assert results["export"]["max_abs_diff_masked_vs_deployed"] < 1e-4
