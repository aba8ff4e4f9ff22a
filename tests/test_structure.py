"""Structured half of the sparsity engine: channel groups, plan -> masks, shrink, FLOPs model and solver."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import (ChannelGroups, FlopsModel, MaskSet, count_flops, count_params, shrink,
                                solve_flops_target)
from prune_lab.sparsity.importance import BNScale, Magnitude, Random

TOL = 0.02


pytestmark = pytest.mark.usefixtures("one_thread")


# -- models -------------------------------------------------------------------------------------------
def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine params, so a wrongly masked channel shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def vgg_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, c = [], 3
    for o in [32, 32, "M", 64, 64, "M", 128, 128]:
        if o == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        c = o
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 64), nn.ReLU(), nn.Linear(64, 10)]
    return randomise_bn(nn.Sequential(*layers), seed)


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_bn(torchvision.models.resnet18(num_classes=10), seed)


class Setup:
    def __init__(self, name: str):
        if name == "resnet18":
            self.model = resnet18()
            self.classifier = self.model.fc
        else:
            self.model = vgg_bn()
            self.classifier = self.model[-1]
        self.model.eval()
        torch.manual_seed(5)
        self.x = torch.randn(2, 3, 32, 32)
        self.groups = ChannelGroups(self.model, self.x, ignored=[self.classifier])
        self.flops = FlopsModel(self.groups, self.x)
        self.dense = count_flops(self.model, self.x)
        torch.manual_seed(6)
        self.scores = {"magnitude": self.groups.scores(Magnitude().channel_scorer()),
                       "random": self.groups.scores(Random().channel_scorer())}


@pytest.fixture(scope="module", params=["resnet18", "vgg"])
def case(request):
    return Setup(request.param)


def masked_copy(model: nn.Module, groups: ChannelGroups, plan) -> nn.Module:
    twin = copy.deepcopy(model)
    ms = MaskSet(twin)
    for n, keep in groups.param_masks(plan).items():
        ms.set(n, keep)
    ms.apply()
    return twin


def shrunk_and_checked(model: nn.Module, groups: ChannelGroups, flops: FlopsModel, plan, x) -> nn.Module:
    """The shrunk model, after checking that it costs what the FLOPs model predicted and computes what
    the masked model computes (eval mode)."""
    small = shrink(model, plan, x).eval()
    assert count_flops(small, x) == flops.macs(plan)
    twin = masked_copy(model, groups, plan).eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), small(x), atol=1e-5, rtol=1e-5)
    return small


# -- the solver, the FLOPs model and shrink agree ------------------------------------------------------
def test_flops_model_dense_equals_torch_counter(case):
    assert case.flops.macs() == case.dense
    assert case.flops.macs({}) == case.dense
    assert len(case.groups) > 0
    assert len(case.groups.roots) == len(case.groups.sizes) == len(case.groups)


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_solve_shrink_and_masks_agree(case, target, mode):
    s = case
    plan = solve_flops_target(s.groups, s.flops, s.scores["magnitude"], target, mode=mode)
    assert set(plan) == set(s.groups.roots)
    for root, size in zip(s.groups.roots, s.groups.sizes):
        assert plan[root].dtype == torch.bool and plan[root].shape == (size,)
        assert int(plan[root].sum()) >= 1

    predicted = s.flops.macs(plan)
    assert abs(1 - predicted / s.dense - target) <= TOL

    small = shrink(s.model, plan, s.x)
    measured = count_flops(small, s.x)
    assert measured == predicted  # the analytic model is exact
    assert abs(1 - measured / s.dense - target) <= TOL

    # shrink copies: the original keeps its shape
    assert count_flops(s.model, s.x) == s.dense
    assert count_params(small) < count_params(s.model)

    # masks zero exactly what shrink removes ...
    masks = s.groups.param_masks(plan)
    kept = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in s.model.named_parameters())
    assert kept == count_params(small)
    # ... so the masked and the shrunk model compute the same
    twin = masked_copy(s.model, s.groups, plan)
    twin.eval()
    small.eval()
    with torch.no_grad():
        ref, got_masked, got_small = s.model(s.x), twin(s.x), small(s.x)
    assert not torch.allclose(ref, got_small, atol=1e-3)  # pruning did change something
    torch.testing.assert_close(got_masked, got_small, atol=1e-5, rtol=1e-5)


def test_random_scores_also_land(case):
    plan = solve_flops_target(case.groups, case.flops, case.scores["random"], 0.5, mode="global")
    assert abs(1 - case.flops.macs(plan) / case.dense - 0.5) <= TOL


def test_plan_prunes_lowest_scores_in_uniform_mode(case):
    scores = case.scores["magnitude"]
    plan = solve_flops_target(case.groups, case.flops, scores, 0.5, mode="uniform")
    for root, sc in zip(case.groups.roots, scores):
        keep = plan[root]
        if (~keep).any():
            assert sc[~keep].max() <= sc[keep].min()


def test_max_reduction_keeps_one_channel_per_group(case):
    one = {r: torch.arange(n) == 0 for r, n in zip(case.groups.roots, case.groups.sizes)}
    max_red = 1 - case.flops.macs(one) / case.dense
    plan = solve_flops_target(case.groups, case.flops, case.scores["magnitude"], max_red, mode="uniform")
    assert abs(1 - case.flops.macs(plan) / case.dense - max_red) <= TOL
    assert all(int(k.sum()) >= 1 for k in plan.values())
    plan = solve_flops_target(case.groups, case.flops, case.scores["magnitude"], max_red, mode="global")
    assert all(int(k.sum()) >= 1 for k in plan.values())


def test_round_to(case):
    plan = solve_flops_target(case.groups, case.flops, case.scores["magnitude"], 0.5, round_to=8)
    for root, size in zip(case.groups.roots, case.groups.sizes):
        k = int(plan[root].sum())
        assert k == size or (k % 8 == 0 and k >= 8)
    assert abs(1 - case.flops.macs(plan) / case.dense - 0.5) <= TOL


def test_unknown_mode_raises(case):
    with pytest.raises(PruneLabError, match="uniform"):
        solve_flops_target(case.groups, case.flops, case.scores["magnitude"], 0.5, mode="layerwise")


# -- hand-checkable cases ------------------------------------------------------------------------------
def test_unreachable_target_raises():
    # the stem is ignored, so its 64 outputs always stay: at most ~94 % of the FLOPs can go
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    x = torch.randn(1, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model[0], model[-1]])
    assert groups.roots == ["2"]
    flops = FlopsModel(groups, x)
    dense = 64 * 3 * 9 * 64 + 64 * 64 * 9 * 64 + 64 * 10
    assert flops.macs() == dense == count_flops(model, x)
    floor = 64 * 3 * 9 * 64 + 1 * 64 * 9 * 64 + 1 * 10
    max_red = 1 - floor / dense
    scores = groups.scores(Magnitude().channel_scorer())
    for mode in ("uniform", "global"):
        with pytest.raises(PruneLabError):
            solve_flops_target(groups, flops, scores, 0.999, mode=mode)
        with pytest.raises(PruneLabError):
            solve_flops_target(groups, flops, scores, max_red + 0.03, mode=mode)
        plan = solve_flops_target(groups, flops, scores, max_red, mode=mode)
        assert flops.macs(plan) == floor


def test_only_classifier_has_no_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    groups = ChannelGroups(model, torch.randn(1, 3, 4, 4), ignored=[model[1]])
    assert len(groups) == 0


def test_untraceable_model_raises_prunelab_error():
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(PruneLabError):
        ChannelGroups(model, torch.randn(1, 3, 8, 8))


def test_param_masks_of_one_dropped_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(1, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model[-1]])
    assert set(groups.roots) == {"0", "3"}
    keep = torch.ones(8, dtype=torch.bool)
    keep[5] = False
    masks = groups.param_masks({"0": keep})
    assert set(masks) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight"}
    for n in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert not bool(masks[n][5].any()) and int((~masks[n]).sum()) == masks[n][5].numel()
    assert not bool(masks["3.weight"][:, 5].any()) and int((~masks["3.weight"]).sum()) == 16 * 9
    # FLOPs: the first conv loses 1/8 of its outputs, the second 1/8 of its inputs
    flops = FlopsModel(groups, x)
    assert flops.macs() - flops.macs({"0": keep}) == 3 * 9 * 64 + 16 * 9 * 64


def test_channel_scores():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))
    groups = ChannelGroups(model, torch.randn(1, 3, 8, 8), ignored=[model[-1]])
    i = groups.roots.index("0")
    mag = groups.scores(Magnitude().channel_scorer())[i]  # L1 of the root filter (Li et al.)
    torch.testing.assert_close(mag, model[0].weight.detach().abs().sum((1, 2, 3)))
    bn = groups.scores(BNScale().channel_scorer())[i]
    torch.testing.assert_close(bn, model[1].weight.detach().abs())


def test_depthwise_model_masks_match_shrink():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    groups = ChannelGroups(model, x, ignored=[model[-1]])
    flops = FlopsModel(groups, x)
    plan = solve_flops_target(groups, flops, groups.scores(Magnitude().channel_scorer()), 0.5)
    shrunk_and_checked(model, groups, flops, plan, x)


def test_channel_plan_masks_survive_maskset_round_trip():
    s = Setup("vgg")
    plan = solve_flops_target(s.groups, s.flops, s.scores["magnitude"], 0.5)
    model = copy.deepcopy(s.model)
    ms = MaskSet(model)
    for n, keep in s.groups.param_masks(plan).items():
        ms.set(n, keep)
    ms.set_channel_plan(plan)
    fresh_model = vgg_bn(seed=1)
    fresh = MaskSet(fresh_model)
    fresh.load_state_dict(ms.state_dict())
    assert set(fresh.channel_plan) == set(plan)
    # the exporter replays the loaded plan: same FLOPs as the original plan
    small = shrink(fresh_model, fresh.channel_plan, s.x)
    assert count_flops(small, s.x) == s.flops.macs(plan)


# -- grouped convolutions, channel shuffles, channel-normalised groups ----------------------------------
class MiniResNeXt(nn.Module):
    """The ResNeXt/RegNet pattern: 1x1 → grouped 3x3 (4 groups) → 1x1, a residual add, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.BatchNorm2d(64), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.c(self.b(self.a(x))))
        return self.head(x.mean((2, 3)))


def grouped_setup():
    torch.manual_seed(0)
    model = randomise_bn(MiniResNeXt()).eval()
    x = torch.randn(2, 3, 12, 12)
    groups = ChannelGroups(model, x, ignored=[model.head])
    return model, x, groups, FlopsModel(groups, x)


def test_grouped_conv_prunes_the_same_positions_in_every_group():
    model, x, groups, flops = grouped_setup()
    sliced = {r: s for r, s in zip(groups.roots, groups.slices) if s > 1}
    assert set(sliced) == {"a.0", "b.0"} and set(sliced.values()) == {4}  # b's inputs and b's outputs
    plan = solve_flops_target(groups, flops, groups.scores(Magnitude().channel_scorer()), 0.5)
    for root in sliced:
        rows = plan[root].view(4, -1)
        assert bool((rows == rows[0]).all()) and not bool(rows.all())  # pruned, evenly
    small = shrink(model, plan, x)
    conv = small.b[0]
    assert conv.groups == 4 and conv.in_channels < 64 and conv.out_channels < 64
    assert conv.in_channels % 4 == 0 and conv.out_channels % 4 == 0
    assert count_flops(small, x) == flops.macs(plan)
    assert abs(1 - flops.macs(plan) / count_flops(model, x) - 0.5) <= TOL
    masks = groups.param_masks(plan)
    kept = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in model.named_parameters())
    assert kept == count_params(small)  # the masks zero exactly the weights shrink removes
    twin = masked_copy(model, groups, plan).eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), small(x), atol=1e-3)
        torch.testing.assert_close(twin(x), small(x), atol=1e-5, rtol=1e-5)


def test_an_uneven_grouped_conv_plan_is_refused_in_one_line():
    model, x, groups, _ = grouped_setup()
    keep = torch.ones(64, dtype=torch.bool)
    keep[0] = False  # one channel of the first group only: no valid 4-group convolution remains
    for attempt in (lambda: groups.param_masks({"b.0": keep}), lambda: shrink(model, {"b.0": keep}, x)):
        with pytest.raises(PruneLabError, match="unevenly") as e:
            attempt()
        assert "\n" not in str(e.value)


def test_drop_order_takes_a_position_from_every_slice_at_once():
    from prune_lab.sparsity.structure import drop_order

    s = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0, 0.0])  # two slices of three: position means 4.5, 1.5, 1.5
    assert drop_order(s).tolist() == [5, 1, 4, 2, 3, 0]
    assert drop_order(s, 2).tolist() == [1, 4, 2, 5, 0, 3]


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: view into 2 groups, swap, flatten back (a permutation)."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


def test_groups_through_a_channel_shuffle_stay_whole_and_the_rest_prunes():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Shuffle(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model[-1]])
    assert groups.graph.opaque and "0" not in groups.roots  # the shuffled channels are not pruned ...
    assert {"4", "7"} <= set(groups.roots)  # ... the channels after it are
    flops = FlopsModel(groups, x)
    plan = solve_flops_target(groups, flops, groups.scores(Magnitude().channel_scorer()), 0.4)
    shrunk_and_checked(model, groups, flops, plan, x)


class TinyTransformer(nn.Module):
    """Patches → tokens → LayerNorm → token mixing by a functional matmul → MLP, residual stream."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, c, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # (B, N, C)
        n = self.norm1(t)
        t = t + torch.softmax(n @ n.transpose(1, 2), -1) @ n  # FLOPs no conv/linear module makes
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


def test_layernormed_stream_stays_whole_and_flops_outside_modules_are_counted():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(2, 3, 16, 16)
    groups = ChannelGroups(model, x, ignored=[model.head])
    assert groups.roots == ["mlp.0"]  # the stream is LayerNorm-ed: masking ≠ removing there
    flops = FlopsModel(groups, x)
    assert flops.other > 0 and flops.macs() == count_flops(model, x)
    plan = solve_flops_target(groups, flops, groups.scores(Magnitude().channel_scorer()), 0.3)
    shrunk_and_checked(model, groups, flops, plan, x)


def test_a_flops_budget_the_prunable_groups_cannot_reach_is_refused_before_training():
    from types import SimpleNamespace

    from prune_lab.checks import check_structured

    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(1, 3, 16, 16)

    def cfg(budget, name="l1_filter"):
        return SimpleNamespace(method=SimpleNamespace(target="flops", name=name), model=SimpleNamespace(name="tiny"),
                               budget=budget)

    check_structured(cfg(0.3), model, x)  # the MLP alone can remove that much
    with pytest.raises(PruneLabError, match="budget=0.95 is out of reach for l1_filter on model tiny") as e:
        check_structured(cfg(0.95), model, x)
    assert "\n" not in str(e.value)


class Ghost(nn.Module):
    """GhostNet's module with a residual add: half the channels a conv, half a depthwise conv of them."""

    def __init__(self, c: int):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.BatchNorm2d(c // 2), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1, groups=c // 2), nn.BatchNorm2d(c // 2))

    def forward(self, x):
        y = self.primary(x)
        return x + torch.cat([y, self.cheap(y)], 1)


def test_a_group_coupled_to_itself_prunes_its_coupled_channels_together():
    """Input channels i and i + 8 of the Ghost block lean on one primary-conv channel: torch-pruning
    removes both when one goes, so plans must drop them in pairs for masks and FLOPs to be exact."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Ghost(16),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model[-1]])
    from prune_lab.sparsity.tracing import root_coupling

    stem = groups.graph.get_pruner_of_module(model[0]).prune_out_channels
    assert root_coupling(groups.graph, groups.graph.get_pruning_group(model[0], stem, list(range(16)))) == 2
    flops = FlopsModel(groups, x)
    plan = solve_flops_target(groups, flops, groups.scores(Magnitude().channel_scorer()), 0.4, tolerance=0.05)
    small = shrunk_and_checked(model, groups, flops, plan, x)
    assert small[0].out_channels < 16
