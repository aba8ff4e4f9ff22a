"""STP: nested subnets, exact extraction, the budget-respecting search, where gradients go."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch_pruning as tp
import torchvision

from prune_lab.export import load_model, remove_modules
from prune_lab.methods.stp import ArchPool, StimulativeTraining, subnet_kl
from prune_lab.models import classifier_of, create_model
from prune_lab.sparsity import count_flops, shrink
from prune_lab.sparsity.subnet import Arch, SubnetSpace
from test_pipeline import run_fast


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(model):
    """Random BN statistics and affine parameters, so zeroed channels would show if mishandled."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def space_for(model, x):
    space = SubnetSpace(model, x[:1], ignored=[classifier_of(model)[1]])
    space.order(space.groups.scores(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)))
    return space


def extracted(model, space, arch, x):
    small = shrink(model, space.channel_plan(arch), x[:1])
    remove_modules(small, space.skipped_blocks(arch))
    return small.eval()


@pytest.mark.parametrize("name", ["resnet20", "torchvision_resnet18"])
def test_subnet_forward_equals_the_extracted_model(name):
    if name == "resnet20":
        model, x = create_model("resnet20", num_classes=10), torch.randn(4, 3, 32, 32)
    else:
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)
    model = randomised(model)
    space = space_for(model, x)
    rng = random.Random(1)
    for arch in [space.smallest(), space.random(rng), space.random(rng)]:
        with torch.no_grad():
            with space.activate(arch):
                inside = model(x)
            small = extracted(model, space, arch, x)
            torch.testing.assert_close(inside, small(x), rtol=1e-5, atol=1e-5)
            assert count_flops(small, x) == space.macs(arch)  # the sampler's estimate is exact
    with torch.no_grad():  # the full model is back after the context
        before = model(x)
        with space.activate(space.largest()):
            torch.testing.assert_close(model(x), before)


def test_sampled_subnets_are_nested_slices():
    model = randomised(create_model("resnet20", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    space = space_for(model, x)
    pool = ArchPool(space, budget=0.5, size=300, bins=8, rng=random.Random(0))
    assert space.smallest() in pool.reduction and space.largest() in pool.reduction
    rng = random.Random(2)
    for _ in range(20):
        a, b = pool.sample(rng), pool.sample(rng)
        lo = Arch(tuple(map(min, a.depths, b.depths)), tuple(map(min, a.widths, b.widths)))
        for big in (a, b):  # the smaller architecture is a slice of each larger one
            small_plan, big_plan = space.channel_plan(lo), space.channel_plan(big)
            assert all(bool((small_plan[r] <= big_plan[r]).all()) for r in small_plan)
            assert set(space.skipped_blocks(big)) <= set(space.skipped_blocks(lo))
            assert space.macs(lo) <= space.macs(big)
        for (_, stage), depth, skipped in zip(space.stages, a.depths, [space.skipped_blocks(a)] * 3):
            assert f"{_}.0" not in skipped  # a stage's first block is always kept
    # a width-w stage keeps ceil(w*C) channels of every one of its groups
    arch = Arch((3, 3, 3), (0.5, 0.75, 0.25))
    for root, keep, stage in zip(space.groups.roots, space.channel_plan(arch).values(), space.group_stage):
        assert int(keep.sum()) == max(1, -(-int(arch.widths[stage] * 1000 * keep.numel()) // 1000))


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_search_never_returns_an_architecture_over_the_budget(budget):
    model = randomised(create_model("resnet20", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    stp = StimulativeTraining(budget=budget, search_population=20, search_generations=5, pool_size=200)
    stp.space = space_for(model, x)
    stp.pool = ArchPool(stp.space, budget, 200, 8, random.Random(0))
    stp.elites = [stp.space.largest()]  # infeasible: must not leak through
    # a fitness that rewards big networks pushes the search against the budget from above
    arch, history = stp.evolve(lambda a: -stp.space.macs(a), random.Random(0))
    assert budget <= stp.space.reduction(arch) <= budget + stp.tolerance
    assert history == sorted(history, reverse=True)  # elitist: never worse


def test_distillation_gradients_reach_only_the_weights_a_subnet_uses():
    model = randomised(create_model("resnet20", num_classes=10)).train()
    x = torch.randn(8, 3, 32, 32)
    space = space_for(model, x)
    arch = Arch((2, 3, 1), (0.5, 0.75, 0.25))
    teacher = torch.randn(8, 10)
    with space.activate(arch):
        subnet_kl(model(x), teacher).backward()
    modules = dict(model.named_modules())
    for block in space.skipped_blocks(arch):
        assert all(p.grad is None or not p.grad.any() for p in modules[block].parameters())
    plan = space.channel_plan(arch)
    checked = 0
    for root, members in zip(space.groups.roots, space.groups.members):
        for name, kind, root_idxs in members:
            m = modules[name]
            if any(name.startswith(b + ".") for b in space.skipped_blocks(arch)) or m.weight.grad is None:
                continue
            dropped = ~plan[root][root_idxs]
            grad = m.weight.grad if m.weight.grad.dim() > 1 else m.weight.grad.unsqueeze(1)  # BN: one per channel
            g = grad.flatten(1) if kind == "out" else grad.transpose(0, 1).flatten(1)
            assert not g[dropped].any(), name  # dropped channels learn nothing from the subnet
            checked += int(dropped.sum())
    assert checked > 0 and model.fc.weight.grad.any()


def test_stp_quickstart_extracts_a_subnet_within_budget(tmp_path, dense_dir):
    results, out = run_fast(tmp_path, dense_dir, "method=stp", "budget=0.5", "method.callbacks.stp.search_population=12",
                            "method.callbacks.stp.search_generations=3", "method.callbacks.stp.pool_size=300")
    assert abs(results["pruned"]["flops_reduction"] - 0.5) <= 0.02 and results["budget_met"]
    assert results["pruned"]["flops_reduction"] >= 0.5 - 1e-9  # never over the FLOPs budget
    stp = results["stp"]
    assert stp["estimated_flops_reduction"] == pytest.approx(results["pruned"]["flops_reduction"])
    assert stp["kept_dropped_magnitude"]["ratio"] > 0
    assert json.loads((out / "search.json").read_text())["arch"] == stp["arch"]
    assert results["export"]["max_abs_diff_masked_vs_deployed"] < 1e-4
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.load(str(out / "model.pt2")).module()
    torch.testing.assert_close(program(x), load_model(out)(x), rtol=1e-5, atol=1e-5)
