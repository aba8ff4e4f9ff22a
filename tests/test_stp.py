"""STP: nested subnets, exact extraction, the budget-respecting search, where gradients go."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch_pruning as tp
import torchvision

from types import SimpleNamespace

from prune_lab.data.base import TensorImageDataset
from prune_lab.data.heldout import stratified_indices
from prune_lab.errors import PruneLabError
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


def bound_stp(model, x, budget, **kwargs):
    """An STP callback bound to `model` as on_fit_start binds it, channels ordered by L1 norm."""
    stp = StimulativeTraining(budget=budget, **{"pool_size": 300, **kwargs})
    stp.check(model, x[:1])
    stp.bind(model, x[:1])
    stp.space.order(stp.space.groups.scores(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)))
    return stp


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_search_never_returns_an_architecture_over_the_budget(budget):
    model = randomised(create_model("resnet20", num_classes=10))
    stp = bound_stp(model, torch.randn(2, 3, 32, 32), budget, search_population=20, search_generations=5)
    stp.elites = [stp.space.largest()]  # infeasible: must not leak through
    # a fitness that rewards big networks pushes the search against the budget from above
    arch, history = stp.evolve(lambda a: -stp.space.macs(a), random.Random(0))
    assert budget <= stp.space.reduction(arch) <= budget + stp.tolerance
    assert history == sorted(history, reverse=True)  # elitist: never worse


@pytest.mark.parametrize("expansion", [True, False])
def test_every_step_trains_a_subnet_in_the_budget_band(expansion):
    """From step 0 to the last, with elites re-ranked as in training (by a fitness that favours
    the largest subnets), every step's students include one the search could return."""
    model = randomised(create_model("resnet20", num_classes=10))
    stp = bound_stp(model, torch.randn(2, 3, 32, 32), 0.85, num_subnets=3, expansion=expansion)
    sampler, steps, elites, in_band = stp.sampler, 200, [stp.space.largest()], 0
    for step in range(steps):
        if step % 10 == 0:
            elites = sampler.select_elites(elites, (step + 10) / steps, lambda a: -stp.space.macs(a),
                                           random.Random(step), k=5)
        archs = sampler.sample(step / steps, random.Random(f"0-{step}"), elites)
        assert len(archs) == 3
        assert 0.85 <= stp.space.reduction(archs[0]) <= 0.87, step  # exact FLOPs, not the cached value
        in_band += sum(sampler.in_band(a) for a in archs)
    assert in_band / (3 * steps) >= 1 / 3


def test_expansion_window_reaches_the_budget_at_reach_and_mutants_stay_inside():
    model = randomised(create_model("resnet20", num_classes=10))
    stp = bound_stp(model, torch.randn(2, 3, 32, 32), 0.7, num_subnets=4, expansion_reach=0.3,
                    expansion_window=0.1)
    sampler = stp.sampler
    assert sampler.centre(0.0) == 0.0 and sampler.centre(0.15) == pytest.approx(0.35)
    assert sampler.centre(0.3) == pytest.approx(0.7) and sampler.centre(0.9) == pytest.approx(0.7)
    assert sampler.region(0.15) == pytest.approx((0.25, 0.45))
    rng, outside_unbounded = random.Random(0), 0
    elites = [stp.pool.sample(rng, 0.25, 0.45) for _ in range(5)]
    for _ in range(200):
        parent = rng.choice(elites)
        child = sampler.mutant_within(parent, 0.25, 0.45, rng)
        assert child is None or 0.25 <= stp.space.reduction(child) <= 0.45
        outside_unbounded += not 0.25 <= stp.space.reduction(stp.space.mutate(parent, rng, 0.2)) <= 0.45
    assert outside_unbounded > 0  # plain mutation does leave the window: the bound is doing work
    for p in (0.0, 0.1, 0.15, 0.3, 0.6):  # students beyond the first come from the window at p
        lo, hi = sampler.region(p)
        for step in range(20):
            for arch in sampler.sample(p, random.Random(step), elites)[1:]:
                assert lo - 1e-9 <= stp.space.reduction(arch) <= hi + 1e-9
    # re-rankings come often enough that the centre moves less than the window's half-width between two
    total = 1000
    for p in (0.0, 0.1, 0.29):
        every = sampler.elite_interval(p, total, 10)
        assert sampler.centre(p + every / total) - sampler.centre(p) < 0.1
    assert sampler.elite_interval(0.5, total, 10) == 4 * sampler.elite_interval(0.1, total, 10)
    # elites are ranked near the centre: a fitness favouring big subnets cannot pull them to 0
    ranked = sampler.select_elites([stp.space.largest()], 0.15, lambda a: -stp.space.macs(a), rng, k=5)
    assert ranked and all(abs(stp.space.reduction(a) - 0.35) <= stp.elite_band + 1e-9 for a in ranked)


def test_a_budget_with_no_subnet_in_its_band_stops_before_training():
    model = create_model("resnet20", num_classes=10)
    stp = StimulativeTraining(budget=0.05, widths=(0.5, 1.0), pool_size=300)
    with pytest.raises(PruneLabError, match=r"no subnet with a FLOPs reduction in \[0.05, 0.070\]"):
        stp.check(model, torch.zeros(1, 3, 32, 32))


class NoTestSet:
    """A data module whose test split raises on any access."""
    num_classes = 3

    def __init__(self, val_set):
        self.val_set = val_set

    @property
    def test_set(self):
        raise AssertionError("the test set was read")


def test_search_fitness_reads_a_stratified_held_out_slice_never_the_test_set():
    model = randomised(create_model("resnet20", num_classes=3)).train()
    x = torch.randn(60, 3, 32, 32)
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    dm = NoTestSet(TensorImageDataset(x, labels))
    stp = bound_stp(model, x, 0.5, search_images=30, search_population=8, search_generations=2)
    trainer = SimpleNamespace(datamodule=dm)
    fitness = stp._fitness(SimpleNamespace(model=model, device=torch.device("cpu")), trainer)
    stp.evolve(fitness, random.Random(0))
    held = stp._held_out(trainer)
    rows = [int(torch.nonzero((x == h).flatten(1).all(1))[0]) for h in held]  # each a val image
    assert len(set(rows)) == 30
    assert torch.bincount(labels[rows], minlength=3).tolist() == [15, 10, 5]  # class shares kept
    assert stratified_indices(dm.val_set, 30, seed=0) == stratified_indices(dm.val_set, 30, seed=0)


def test_kept_dropped_ratio_uses_one_fixed_plan_including_removed_blocks():
    model = randomised(create_model("resnet20", num_classes=10))
    stp = bound_stp(model, torch.randn(2, 3, 32, 32), 0.5)
    arch = Arch((2, 3, 3), (0.5, 0.75, 0.5))
    plan, skipped = stp.space.channel_plan(arch), stp.space.skipped_blocks(arch)
    start = stp.filter_magnitudes(model)
    before = stp.kept_dropped(start, plan, skipped)
    with torch.no_grad():  # double every kept filter: the kept mean doubles, the dropped one stays
        modules = dict(model.named_modules())
        for root, members in zip(stp.space.groups.roots, stp.space.groups.members):
            for name, kind, root_idxs in members:
                if kind == "out" and name in start and not any(name.startswith(b + ".") for b in skipped):
                    modules[name].weight[plan[root][root_idxs]] *= 2
    after = stp.kept_dropped(stp.filter_magnitudes(model), plan, skipped)
    assert after["kept_mean_abs"] == pytest.approx(2 * before["kept_mean_abs"], rel=1e-5)
    assert after["dropped_mean_abs"] == pytest.approx(before["dropped_mean_abs"], rel=1e-5)
    assert stp.kept_dropped(start, plan, skipped) == before  # the snapshot is a copy
    # every filter of a removed block counts as dropped
    assert before["dropped_mean_abs"] != stp.kept_dropped(start, plan, [])["dropped_mean_abs"]


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
                            "method.callbacks.stp.search_generations=3", "method.callbacks.stp.pool_size=300",
                            "method.weight_decay=1e-4", "method.search_images=100",
                            "method.callbacks.stp.elite_updates=3")
    assert abs(results["pruned"]["flops_reduction"] - 0.5) <= 0.02 and results["budget_met"]
    assert results["pruned"]["flops_reduction"] >= 0.5 - 1e-9  # never over the FLOPs budget
    stp = results["stp"]
    assert stp["estimated_flops_reduction"] == pytest.approx(results["pruned"]["flops_reduction"])
    assert stp["subnet_counts"]["steps"] == results["train"]["steps"] > 0
    assert stp["subnet_counts"]["steps_without_band"] == 0  # the budget is trained from the first step
    # the full pass (1) plus 2 subnet passes a step, each below the full network's MACs (exact sum: unit test)
    assert 1.0 < results["train"]["flops_ratio"] < 3.0
    assert 0.5 <= stp["budget_band_share"] <= 1 and stp["budget_band"] == [0.5, 0.52]
    magnitude = stp["kept_dropped_magnitude"]
    assert magnitude["start"]["ratio"] > 0 and magnitude["end"]["ratio"] > 0
    assert magnitude["start"]["kept_mean_abs"] != magnitude["end"]["kept_mean_abs"]  # training moved them
    on_disk = json.loads((out / "search.json").read_text())
    assert on_disk["arch"] == stp["arch"] and on_disk["kept_dropped_magnitude"] == magnitude
    assert stp["search_images"] == 100
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {g["weight_decay"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {1e-4}  # STP's own
    assert results["export"]["max_abs_diff_masked_vs_deployed"] < 1e-4
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.load(str(out / "model.pt2")).module()
    torch.testing.assert_close(program(x), load_model(out)(x), rtol=1e-5, atol=1e-5)


def test_stratified_slice_without_stored_labels_reads_equal_shares():
    labels = torch.arange(90) % 3

    class NoStoredLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 90

        def __getitem__(self, i):
            return torch.zeros(1), int(labels[i])

    picked = stratified_indices(NoStoredLabels(), 30, seed=1, num_classes=3)
    assert len(set(picked)) == 30 and torch.bincount(labels[picked]).tolist() == [10, 10, 10]
    with_labels = TensorImageDataset(torch.zeros(90, 1), labels)
    assert torch.bincount(labels[stratified_indices(torch.utils.data.Subset(with_labels, range(90)), 30)]).tolist() \
        == [10, 10, 10]


@pytest.mark.parametrize("target", ["teacher", "labels"])
def test_subnet_target_chooses_what_the_sampled_subnets_learn_from(target):
    """`method.subnet_target`: STP's subnets match the full network's outputs (KL); the ablation trains the
    same sampled subnets on the labels (cross-entropy) instead. Recomputed here from the same archs."""
    import torch.nn.functional as F

    from prune_lab.methods.stp import frozen_bn_stats

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    cb = StimulativeTraining(budget=0.5, num_subnets=2, subnet_target=target, seed=3)
    cb.bind(model, x[:1])
    cb.space.order(cb.space.groups.scores(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)))
    cb.ordered, cb.elites = True, [cb.space.largest()]
    trainer = SimpleNamespace(global_step=7, estimated_stepping_batches=100)
    module = SimpleNamespace(model=model, training=True, trainer=trainer, log=lambda *a, **k: None)
    logits = model(x)
    loss = cb._subnet_loss(module, (x, y), logits)
    archs = cb.sampler.sample(0.07, random.Random("3-7"), cb.elites)
    expected = 0.0
    with torch.no_grad(), frozen_bn_stats(model):
        for arch in archs:
            with cb.space.activate(arch):
                out = model(x)
            expected += float(subnet_kl(out, logits) if target == "teacher" else F.cross_entropy(out, y))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # training cost: each subnet pass at its own MACs, the full pass at 1 (a step of 2 subnets here)
    fractions = [cb.space.macs(a) / cb.space.dense_macs for a in archs]
    assert cb.subnet_macs == pytest.approx(sum(fractions)) and all(0 < f <= 1 for f in fractions)
    cb.train_steps = 1
    assert cb.report()["train"]["flops_ratio"] == pytest.approx(1.0 + sum(fractions))
    resumed = StimulativeTraining(budget=0.5, num_subnets=2, subnet_target=target, seed=3)
    resumed.load_state_dict(cb.state_dict())  # a resumed run keeps counting from where it stopped
    resumed.bind(model, x[:1])
    assert resumed.sampled_archs == cb.sampled_archs and resumed.subnet_macs == pytest.approx(cb.subnet_macs)
    with pytest.raises(PruneLabError, match="method.subnet_target=kd is not one of: teacher, labels"):
        StimulativeTraining(budget=0.5, subnet_target="kd")
