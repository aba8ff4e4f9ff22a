"""The unstructured half of the sparsity engine: masks, allocation, importance, schedules, measures."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torchvision
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import (IMPORTANCES, Cubic, Importance, MaskSet, OneShot, build_importance, count_flops,
                                count_nonzero, count_params, erk_allocation, latency_ms, masks_from_scores,
                                prunable_weights, sparse_flops, uniform_allocation)
from prune_lab.sparsity.allocation import layer_sparsities
from prune_lab.sparsity.importance import BNScale, Gradient, Magnitude, Random, Taylor
from prune_lab.models import create_model
from prune_lab.sparsity.measure import compile_for_inference, inference_copy, layer_macs


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ----------------------------------------------------------------------------------
def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def random_masks(ms: MaskSet, density: float = 0.5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in ms.prunable:
        m = torch.rand(ms[n].shape, generator=g) < density
        ms.set(n, m)
        out[n] = m
    return out


def loss_step(model: nn.Module, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def shapes_of(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in prunable_weights(model).items()}


# -- prunable_weights ---------------------------------------------------------------------------
def test_prunable_weights_are_conv_and_linear_weights_only():
    model = resnet18()
    names = set(prunable_weights(model))
    assert {"conv1.weight", "fc.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight"} <= names
    assert not any("bn" in n or n.endswith(".bias") or "downsample.1" in n for n in names)
    modules = dict(model.named_modules())
    for n in names:
        assert isinstance(modules[n.rsplit(".", 1)[0]], (nn.Conv2d, nn.Linear))
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert len(names) == n_layers


# -- masks_from_scores + MaskSet: exact sparsity -----------------------------------------------------
@pytest.fixture(scope="module")
def r18_scores():
    model = resnet18()
    return {n: p.detach().abs().clone() for n, p in prunable_weights(model).items()}


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
@pytest.mark.parametrize("budget", [0.5, 0.9, 0.97])
def test_masks_from_scores_hit_budget_exactly(distribution, budget, r18_scores):
    model = resnet18()
    weights = prunable_weights(model)
    assert all(int(w.count_nonzero()) == w.numel() for w in weights.values())  # so zeros come from the masks
    ms = MaskSet(model)
    masks = masks_from_scores(r18_scores, budget, distribution)
    assert set(masks) == set(weights)
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == weights[n].shape
        ms.set(n, m)
    ms.apply()

    total = sum(w.numel() for w in weights.values())
    assert abs(ms.sparsity() - budget) < 1e-3
    if distribution == "global":
        assert total - sum(int(m.sum()) for m in masks.values()) == round(budget * total)
        # one threshold: every pruned score is <= every kept score
        pruned = torch.cat([r18_scores[n][~m] for n, m in masks.items()])
        kept = torch.cat([r18_scores[n][m] for n, m in masks.items()])
        assert pruned.max() <= kept.min()
    else:
        per_layer = layer_sparsities(distribution, shapes_of(model), budget)
        for n, m in masks.items():
            w = weights[n]
            assert int((w == 0).sum()) == round(per_layer[n] * w.numel()), n
            assert int((~m).sum()) == round(per_layer[n] * w.numel()), n
            if (~m).any() and m.any():  # per-layer threshold: lowest scores are pruned
                assert r18_scores[n][~m].max() <= r18_scores[n][m].min()
        if distribution == "uniform":
            dens = ms.density()
            for n, w in weights.items():
                assert dens[n] == pytest.approx(1 - round(budget * w.numel()) / w.numel(), abs=1e-12)


def test_masks_from_scores_ties_are_deterministic_and_exact():
    scores = {"a": torch.zeros(7, 3), "b": torch.ones(10)}
    m1 = masks_from_scores(scores, 0.5, "uniform")
    m2 = masks_from_scores(scores, 0.5, "uniform")
    for n in scores:
        assert torch.equal(m1[n], m2[n])
        assert int((~m1[n]).sum()) == round(0.5 * scores[n].numel())
    g = masks_from_scores(scores, 0.5, "global")
    assert int((~g["a"]).sum()) + int((~g["b"]).sum()) == round(0.5 * 31)
    # the 21 zero scores go first
    assert int((~g["a"]).sum()) == min(21, round(0.5 * 31)) and bool(g["b"].all())


def test_masks_from_scores_zero_budget_keeps_everything():
    scores = {"a": torch.rand(4, 4), "b": torch.rand(3)}
    for dist in ("uniform", "erk", "global"):
        assert all(bool(m.all()) for m in masks_from_scores(scores, 0.0, dist).values())


def test_unknown_distribution_raises_naming_accepted():
    with pytest.raises(PruneLabError) as e:
        masks_from_scores({"a": torch.rand(3, 3)}, 0.5, "gaussian")
    assert "gaussian" in str(e.value) and "uniform" in str(e.value) and "erk" in str(e.value)


# -- MaskSet enforcement ---------------------------------------------------------------------------
def test_apply_zeroes_masked_weights_only():
    model = small_cnn()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ms = MaskSet(model)
    masks = random_masks(ms)
    ms.apply()
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert bool((params[n][~m] == 0).all())
        assert torch.equal(params[n][m], before[n][m])
    for n, p in params.items():  # biases, BN: no active mask, untouched
        if n not in masks:
            assert torch.equal(p, before[n])


def test_mask_grads_zeroes_masked_gradients():
    model = small_cnn()
    ms = MaskSet(model)
    masks = random_masks(ms)
    loss_step(model)
    params = dict(model.named_parameters())
    raw = {n: params[n].grad.clone() for n in masks}
    assert all(bool((raw[n][~m] != 0).any()) for n, m in masks.items())  # test is meaningful
    ms.mask_grads()
    for n, m in masks.items():
        assert bool((params[n].grad[~m] == 0).all())
        assert torch.equal(params[n].grad[m], raw[n][m])


def warmed_sgd(model):
    """SGD with momentum and weight decay after two steps: momentum is built up everywhere."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for i in range(2):
        opt.zero_grad()
        loss_step(model, seed=10 + i)
        opt.step()
    return opt


def test_sgd_momentum_weight_decay_then_apply_keeps_masked_zero():
    model = small_cnn()
    ms = MaskSet(model)
    opt = warmed_sgd(model)  # then prune
    masks = random_masks(ms, density=0.3)
    ms.apply()
    params = dict(model.named_parameters())
    start = {n: params[n].detach().clone() for n in masks}
    for i in range(3):
        opt.zero_grad()
        loss_step(model, seed=20 + i)
        ms.mask_grads()
        opt.step()
        ms.apply()
        for n, m in masks.items():
            assert bool((params[n][~m] == 0).all())
    # training really happened on kept weights
    assert any(not torch.equal(params[n][m], start[n][m]) for n, m in masks.items())


def test_sgd_step_without_apply_moves_masked_weights_unless_state_is_masked():
    """Stale momentum pushes pruned weights away from zero; mask_optimizer_state + mask_grads stops it."""
    def run(mask_state: bool):
        model = small_cnn()
        ms = MaskSet(model)
        opt = warmed_sgd(model)
        masks = random_masks(ms, density=0.3)
        ms.apply()
        if mask_state:
            ms.mask_optimizer_state(opt)
        opt.zero_grad()
        loss_step(model, seed=30)
        ms.mask_grads()
        opt.step()  # no apply() afterwards
        params = dict(model.named_parameters())
        return all(bool((params[n][~m] == 0).all()) for n, m in masks.items())

    assert not run(mask_state=False)
    assert run(mask_state=True)


def test_mask_optimizer_state_clears_momentum_at_masked_entries():
    model = small_cnn()
    ms = MaskSet(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for opt in (sgd, adam):
        opt.zero_grad()
        loss_step(model)
        opt.step()
    masks = random_masks(ms)
    params = dict(model.named_parameters())
    before_sgd = {n: sgd.state[p]["momentum_buffer"].clone() for n, p in params.items()}
    before_adam = {n: {k: v.clone() for k, v in adam.state[p].items()} for n, p in params.items()}
    ms.mask_optimizer_state(sgd)
    ms.mask_optimizer_state(adam)
    for n, p in params.items():
        buf = sgd.state[p]["momentum_buffer"]
        if n in masks:
            m = masks[n]
            assert bool((before_sgd[n][~m] != 0).any())
            assert bool((buf[~m] == 0).all()) and torch.equal(buf[m], before_sgd[n][m])
            for k in ("exp_avg", "exp_avg_sq"):
                assert bool((adam.state[p][k][~m] == 0).all())
                assert torch.equal(adam.state[p][k][m], before_adam[n][k][m])
            assert torch.equal(adam.state[p]["step"], before_adam[n]["step"])
        else:
            assert torch.equal(buf, before_sgd[n])


def test_set_validates_shape_and_tracks_active():
    model = small_cnn()
    ms = MaskSet(model)
    assert ms.active == set()
    with pytest.raises(ValueError):
        ms.set("0.weight", torch.ones(3, 3, dtype=torch.bool))
    ms.set("0.weight", torch.ones_like(model[0].weight, dtype=torch.bool))
    assert ms.active == set()  # an all-ones mask costs nothing
    m = torch.ones_like(model[0].weight, dtype=torch.bool)
    m[0] = False
    ms.set("0.weight", m)
    assert ms.active == {"0.weight"}
    assert "0.weight" in ms and "nope.weight" not in ms
    ms.set_channel_plan({"0": torch.tensor([True] * 7 + [False])})
    ms.reset()
    assert ms.active == set() and bool(ms["0.weight"].all()) and ms.channel_plan == {}


def test_bind_points_masks_at_a_copy():
    model = small_cnn()
    ms = MaskSet(model)
    masks = random_masks(ms)
    twin = copy.deepcopy(model)
    ms.bind(twin)
    ms.apply()
    assert bool((twin[0].weight[~masks["0.weight"]] == 0).all())
    assert int(model[0].weight.count_nonzero()) == model[0].weight.numel()


def test_state_dict_round_trip_restores_masks_active_and_channel_plan():
    model = resnet18(0)
    ms = MaskSet(model)
    scores = {n: p.detach().abs() for n, p in prunable_weights(model).items()}
    some = dict(list(masks_from_scores(scores, 0.8, "uniform").items())[:5])
    for n, m in some.items():
        ms.set(n, m)
    bn_mask = torch.rand(64) > 0.5
    ms.set("bn1.weight", bn_mask)  # masks exist for every parameter, not just prunable ones
    plan = {"conv1": torch.rand(64) > 0.3, "layer4.0.downsample.0": torch.rand(512) > 0.5,
            "layer2.1.conv1": torch.rand(128) > 0.5}
    ms.set_channel_plan(plan)
    buf = io.BytesIO()
    torch.save(ms.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)

    fresh_model = resnet18(1)
    fresh = MaskSet(fresh_model)
    assert fresh.channel_plan == {} and fresh.active == set()
    fresh.load_state_dict(sd)  # strict: channel buffers must be created on load
    assert fresh.active == set(some) | {"bn1.weight"}
    for n, _ in fresh_model.named_parameters():
        assert torch.equal(fresh[n], ms[n]), n
    assert set(fresh.channel_plan) == set(plan)
    for root, keep in plan.items():
        assert fresh.channel_plan[root].dtype == torch.bool
        assert torch.equal(fresh.channel_plan[root], keep)
    # the loaded masks are enforced on the fresh model
    fresh.apply()
    w = dict(fresh_model.named_parameters())
    for n, m in some.items():
        assert bool((w[n][~m] == 0).all())
    assert bool((fresh_model.bn1.weight[~bn_mask] == 0).all())


def test_density_and_sparsity_read_the_weights_not_the_masks():
    model = small_cnn()
    ms = MaskSet(model)
    assert ms.sparsity() == 0.0 and all(d == 1.0 for d in ms.density().values())
    masks = random_masks(ms, density=0.25)
    assert ms.sparsity() == 0.0  # not applied yet
    ms.apply()
    w = prunable_weights(model)
    total = sum(p.numel() for p in w.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert ms.sparsity() == pytest.approx(zeros / total, abs=1e-12)
    for n, d in ms.density().items():
        assert d == pytest.approx(int(masks[n].sum()) / masks[n].numel(), abs=1e-12)
    # a zero written directly (no mask) counts too; non-prunable params do not
    with torch.no_grad():
        model[-1].weight.zero_()
        model[1].weight.zero_()
    assert ms.density()["8.weight"] == 0.0
    assert "1.weight" not in ms.density()
    zeros2 = zeros + int(masks["8.weight"].sum())
    assert ms.sparsity() == pytest.approx(zeros2 / total, abs=1e-12)


# -- erk_allocation ----------------------------------------------------------------------------------
def _erk_raw(shape):
    return sum(shape) / math.prod(shape)


@pytest.mark.parametrize("budget", [0.1, 0.5, 0.8, 0.9, 0.97, 0.99])
def test_erk_weighted_density_matches_budget(budget):
    shapes = shapes_of(resnet18())
    s = erk_allocation(shapes, budget)
    numel = {n: math.prod(sh) for n, sh in shapes.items()}
    mean_density = sum((1 - s[n]) * numel[n] for n in shapes) / sum(numel.values())
    assert abs(mean_density - (1 - budget)) < 1e-9
    assert all(0.0 <= v < 1.0 for v in s.values())  # no density > 1, nothing fully pruned
    # ERK shape: the lower a layer's (sum dims)/(prod dims), the sparser it is
    names = sorted(shapes, key=lambda n: _erk_raw(shapes[n]))
    for a, b in zip(names, names[1:]):
        assert s[a] >= s[b] - 1e-12
    assert s["layer4.1.conv2.weight"] > s["conv1.weight"]
    assert s["layer4.1.conv2.weight"] > s["fc.weight"]
    # dense layers only where needed: with the final scale eps (from any sparse layer),
    # a capped layer would have had density >= 1, a sparse one <= 1
    sparse = [n for n in shapes if s[n] > 0]
    eps = (1 - s[sparse[0]]) / _erk_raw(shapes[sparse[0]])
    for n in shapes:
        assert (1 - s[n]) == pytest.approx(min(1.0, eps * _erk_raw(shapes[n])), rel=1e-9)
        if s[n] == 0.0:
            assert eps * _erk_raw(shapes[n]) >= 1.0 - 1e-12


def test_erk_dense_layers_shrink_with_sparsity():
    shapes = shapes_of(resnet18())
    dense = {b: {n for n, v in erk_allocation(shapes, b).items() if v == 0.0} for b in (0.5, 0.9, 0.97, 0.99)}
    assert dense[0.99] <= dense[0.97] <= dense[0.9] <= dense[0.5]
    assert dense[0.5]  # the tiny classifier cannot absorb its share at 50 %
    assert "layer4.1.conv2.weight" not in dense[0.5]


def test_erk_two_layers_analytic():
    shapes = {"a": (64, 64, 3, 3), "b": (128, 128, 3, 3)}
    na, nb = 64 * 64 * 9, 128 * 128 * 9
    ra, rb = _erk_raw(shapes["a"]), _erk_raw(shapes["b"])
    # 60 %: neither capped, densities proportional to raw
    s = erk_allocation(shapes, 0.6)
    eps = 0.4 * (na + nb) / (ra * na + rb * nb)
    assert eps * ra < 1
    assert 1 - s["a"] == pytest.approx(eps * ra, rel=1e-12)
    assert 1 - s["b"] == pytest.approx(eps * rb, rel=1e-12)
    # 20 %: "a" would exceed density 1, so it is dense and "b" takes the whole budget
    s = erk_allocation(shapes, 0.2)
    assert s["a"] == 0.0
    assert 1 - s["b"] == pytest.approx((0.8 * (na + nb) - na) / nb, rel=1e-12)


def test_uniform_allocation():
    shapes = {"a": (3, 4), "b": (5,)}
    assert uniform_allocation(shapes, 0.7) == {"a": 0.7, "b": 0.7}


# -- importances ---------------------------------------------------------------------------------------
def test_magnitude_scores_are_abs_weights():
    model = small_cnn()
    params = prunable_weights(model)
    scores = Magnitude().weight_scores(params)
    for n, p in params.items():
        assert torch.equal(scores[n], p.detach().abs())
        assert not scores[n].requires_grad


def test_taylor_and_gradient_scores():
    model = small_cnn()
    params = prunable_weights(model)
    with pytest.raises((RuntimeError, PruneLabError)):
        Taylor().weight_scores(params)
    with pytest.raises((RuntimeError, PruneLabError)):
        Gradient().weight_scores(params)
    loss_step(model)
    t = Taylor().weight_scores(params)
    g = Gradient().weight_scores(params)
    for n, p in params.items():
        assert torch.allclose(t[n], (p.detach() * p.grad).abs())
        assert torch.equal(g[n], p.grad.abs())
    assert Taylor.needs_grad and Gradient.needs_grad and not Magnitude.needs_grad and not Random.needs_grad


def test_random_scores_follow_the_global_seed():
    params = prunable_weights(small_cnn())
    torch.manual_seed(123)
    a = Random().weight_scores(params)
    torch.manual_seed(123)
    b = Random().weight_scores(params)
    torch.manual_seed(124)
    c = Random().weight_scores(params)
    for n, p in params.items():
        assert a[n].shape == p.shape
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert bool((a[n] >= 0).all() and (a[n] < 1).all())


def test_bn_scale_cannot_score_weights_and_gradient_cannot_score_channels():
    params = prunable_weights(small_cnn())
    with pytest.raises(PruneLabError, match="bn_scale"):
        BNScale().weight_scores(params)
    with pytest.raises(PruneLabError, match="gradient"):
        Gradient().channel_scorer()


def test_build_importance():
    for name, cls in IMPORTANCES.items():
        imp = build_importance(name)
        assert isinstance(imp, cls) and imp.name == name
    obj = Magnitude(p=2)
    assert build_importance(obj) is obj
    assert isinstance(obj, Importance)
    with pytest.raises(PruneLabError) as e:
        build_importance("snip")
    msg = str(e.value)
    assert "snip" in msg
    for name in IMPORTANCES:
        assert name in msg


# -- schedules -----------------------------------------------------------------------------------------
def test_oneshot_schedule():
    s = OneShot(at=0.5)
    T = 100
    assert [i for i in range(T) if s.is_update(i, T)] == [50]
    assert all(s.fraction(i, T) == 0.0 for i in range(50))
    assert all(s.fraction(i, T) == 1.0 for i in range(50, T))
    s0 = OneShot()
    assert s0.is_update(0, T) and s0.fraction(0, T) == 1.0
    assert [i for i in range(T) if s0.is_update(i, T)] == [0]


CUBIC_CASES = [
    (Cubic(), 1000),
    (Cubic(0.0, 0.75, 10), 97),
    (Cubic(0.1, 0.6, 7), 250),
    (Cubic(0.0, 1.0, 10), 100),   # end at the very end: still updates within training
    (Cubic(0.2, 0.9, 1), 50),
    (Cubic(0.0, 0.75, 100), 30),  # every > span: first and last update only
    (Cubic(0.5, 0.5, 3), 10),     # start == end
    (Cubic(0.9, 1.0, 5), 10),     # start at the last step
    (Cubic(0.0, 0.75, 10), 2),
    (Cubic(0.0, 0.75, 10), 1),    # a one-step run must still reach the budget
]


@pytest.mark.parametrize("sched,T", CUBIC_CASES)
def test_cubic_schedule_properties(sched, T):
    fr = [sched.fraction(i, T) for i in range(T)]
    updates = [i for i in range(T) if sched.is_update(i, T)]
    assert updates, "no update step within training"
    assert all(b >= a for a, b in zip(fr, fr[1:]))  # monotone non-decreasing
    assert all(0.0 <= f <= 1.0 for f in fr)
    last = updates[-1]
    assert last < T
    # the final budget is reached at the last update, and the fraction stays there
    assert fr[last] == 1.0
    assert all(f == 1.0 for f in fr[last:])
    assert all(f < 1.0 for f in fr[:last])
    # updates are `every` steps apart from the first one, plus the end step
    first = updates[0]
    assert updates == sorted(set(range(first, last + 1, sched.every)) | {last})
    assert first == min(int(round(sched.start * T)), T - 1)
    assert all(f == 0.0 for f in fr[:first + 1]) or first == last


def test_cubic_follows_zhu_gupta():
    s = Cubic(start=0.0, end=0.5, every=5)
    T = 100  # updates from step 0 to step 50
    assert s.fraction(0, T) == 0.0
    assert s.fraction(25, T) == pytest.approx(1 - 0.5 ** 3)
    assert s.fraction(10, T) == pytest.approx(1 - 0.8 ** 3)
    assert s.fraction(50, T) == 1.0
    assert [i for i in range(T) if s.is_update(i, T)] == list(range(0, 51, 5))


# -- measure -------------------------------------------------------------------------------------------
def test_count_flops_single_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, torch.randn(1, 3, 16, 16)) == 8 * 3 * 9 * 16 * 16
    # one input, whatever the batch; and the training flag is restored
    conv.train()
    assert count_flops(conv, torch.randn(5, 3, 16, 16)) == 8 * 3 * 9 * 16 * 16
    assert conv.training
    lin = nn.Linear(20, 7)
    assert count_flops(lin, torch.randn(3, 20)) == 20 * 7


@pytest.mark.parametrize("size", [32, 64])
def test_layer_macs_sum_equals_count_flops_resnet18(size):
    model = resnet18()
    x = torch.randn(1, 3, size, size)
    macs = layer_macs(model, x)
    assert set(macs) == {n.rsplit(".", 1)[0] for n in prunable_weights(model)}
    assert macs["fc"] == 512 * 10
    assert macs["conv1"] == 64 * 3 * 49 * (size // 2) ** 2
    assert sum(macs.values()) == count_flops(model, x)


def test_sparse_flops():
    model = resnet18()
    x = torch.randn(1, 3, 32, 32)
    dense = count_flops(model, x)
    assert sparse_flops(model, x) == dense
    with torch.no_grad():
        for w in prunable_weights(model).values():
            flat = w.view(-1)
            idx = torch.randperm(flat.numel())[: flat.numel() // 2]
            flat[idx] = 0
    assert all(w.numel() % 2 == 0 for w in prunable_weights(model).values())
    assert abs(sparse_flops(model, x) - dense / 2) <= 1
    assert count_flops(model, x) == dense  # the dense counter ignores zeros


def test_count_params_and_nonzero():
    model = small_cnn()
    n = count_params(model)
    assert n == sum(p.numel() for p in model.parameters())
    nz = count_nonzero(model)
    assert nz == n - model[1].bias.numel() - model[4].bias.numel()  # BN biases start at zero
    with torch.no_grad():
        model[0].weight[0].zero_()
    assert count_nonzero(model) == nz - model[0].weight[0].numel()


def test_latency_ms_measures_copies_and_leaves_models_untouched():
    model = small_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    times, applied = latency_ms({"a": model, "b": small_cnn()}, torch.randn(1, 3, 16, 16), batch_size=4,
                                warmup=1, repeats=3, channels_last=True, fold_bn=True)
    assert set(times) == {"a", "b"} and all(t > 0 and math.isfinite(t) for t in times.values())
    assert set(applied.pop("min_ms")) == {"a", "b"}
    assert set(applied.pop("contention")) == {"runnable_others", "cores", "threads", "contended"}
    assert applied == {"bn_folded": True, "compiled": False}
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_inference_copy_folds_bn_without_changing_outputs():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    model.train()
    x = torch.randn(8, 3, 32, 32)
    model(x)  # non-trivial running statistics
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    served, folded = inference_copy(model, channels_last=True, fold_bn=True)
    assert folded and not any(isinstance(m, nn.BatchNorm2d) for m in served.modules())
    assert served.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = served(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original keeps its BN


def test_compiled_deployment_computes_what_the_model_computes():
    torch.manual_seed(0)
    model = small_cnn().train()
    model(torch.randn(8, 3, 16, 16))  # non-trivial BN statistics
    model.eval()
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    served = compile_for_inference(inference_copy(model)[0], x)
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), rtol=1e-4, atol=1e-4)
    times, applied = latency_ms({"m": model}, x[:1], batch_size=4, warmup=1, repeats=2, channels_last=True,
                                fold_bn=True, compile=True)
    assert applied.pop("min_ms")["m"] <= times["m"]
    applied.pop("contention")
    assert applied == {"bn_folded": True, "compiled": True} and times["m"] > 0


def test_inference_copy_keeps_bn_when_fx_cannot_trace(caplog):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on values: symbolic tracing fails
                x = -x
            return self.bn(self.conv(x))

    model = DataDependent().eval()
    served, folded = inference_copy(model, channels_last=False, fold_bn=True)
    assert not folded and isinstance(served.bn, nn.BatchNorm2d)
    assert "BN not folded" in caplog.text
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(served(x), model(x))
