"""Linear over-parameterization + SP-KD (METHODS.md §4): exact expansion and merge, live extra
parameters, the SP-KD loss, and the `overparam` method end to end through the real config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import FAST, compose_cfg
from prune_lab.callbacks import Distillation, LinearExpansion
from prune_lab.callbacks.distillation import (Outputs, SimilarityPreserving, grad_norm_ratio, residual_blocks,
                                              similarity_preserving_loss, stage_outputs)
from prune_lab.errors import PruneLabError
from prune_lab.export import load_model
from prune_lab.models import create_model
from prune_lab.module import PruneLabModule
from prune_lab.pipeline import run
from prune_lab.sparsity.reparam import ExpandedConv2d, ExpandedLinear, expand_layers, merge_layers


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def sgd_steps(module: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    target = torch.randn_like(module(x))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(x), target).backward()
        opt.step()


LAYERS = {
    "conv3x3_s1_pad1": (lambda: nn.Conv2d(6, 8, 3, stride=1, padding=1), (4, 6, 9, 9)),
    "conv3x3_s2_pad1_bias": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True), (4, 6, 9, 9)),
    "conv5x5_s2_pad2_dilated": (lambda: nn.Conv2d(6, 4, 5, stride=2, padding=2, dilation=2, bias=False), (4, 6, 13, 13)),
    "conv_grouped": (lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (4, 6, 9, 9)),
    "conv_depthwise": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), (4, 8, 9, 9)),
    "conv1x1_s2": (lambda: nn.Conv2d(6, 8, 1, stride=2, bias=False), (4, 6, 9, 9)),
    "linear": (lambda: nn.Linear(10, 5), (4, 10)),
}


@pytest.mark.parametrize("compute", ["chain", "collapsed"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_expansion_is_exact_and_merge_is_exact_after_training(name, compute):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer, x = make(), torch.randn(*shape)
    chain_type = ExpandedLinear if isinstance(layer, nn.Linear) else ExpandedConv2d
    chain = chain_type(layer, ratio=4, generator=torch.Generator().manual_seed(1), compute=compute)
    with torch.no_grad():
        assert rel(chain(x), layer(x)) < 1e-5  # exact at initialisation
    assert sum(p.numel() for p in chain.parameters()) > 4 * sum(p.numel() for p in layer.parameters())
    sgd_steps(chain, x)
    with torch.no_grad():
        trained = chain(x)
        assert rel(trained, layer(x)) > 1e-3  # training moved it
        merged = chain.merge()
        assert rel(merged(x), trained) < 1e-5  # exact after training
    assert type(merged) is type(layer)
    assert [p.shape for p in merged.parameters()] == [p.shape for p in layer.parameters()]


def test_chain_and_collapsed_forward_give_the_same_gradients():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), torch.randn(4, 6, 9, 9)
    grads = []
    for compute in ("chain", "collapsed"):
        chain = ExpandedConv2d(conv, 4, torch.Generator().manual_seed(1), compute)
        chain(x).square().sum().backward()
        grads.append([p.grad for p in chain.parameters()])
    for g_chain, g_collapsed in zip(*grads):
        assert rel(g_collapsed, g_chain) < 1e-5


def test_whole_cifar_resnet_expands_and_merges_exactly():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    n_params = sum(p.numel() for p in model.parameters())
    expanded = expand_layers(model, ratio=4, generator=torch.Generator().manual_seed(0))
    assert len(expanded) == 19 + 2 + 1  # 19 3x3 convs, 2 shortcut 1x1 convs, the classifier
    assert all(isinstance(model.get_submodule(n), (ExpandedConv2d, ExpandedLinear)) for n in expanded)
    with torch.no_grad():
        assert rel(model(x), before) < 1e-5
    model.train()
    sgd_steps(model, x, steps=2)
    model.eval()
    with torch.no_grad():
        trained = model(x)
        assert rel(trained, before) > 1e-3
        assert sorted(merge_layers(model)) == sorted(expanded)
        assert rel(model(x), trained) < 1e-5
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert {type(m) for m in model.modules()} == {type(m) for m in create_model("resnet20").modules()}


def test_extra_parameters_receive_gradients_unlike_identity_plus_zeros():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(4, 6, 3, padding=1, bias=False), torch.randn(2, 4, 8, 8)
    chain = ExpandedConv2d(conv, ratio=4, generator=torch.Generator().manual_seed(0))
    chain(x).square().sum().backward()
    for p in chain.parameters():
        assert (p.grad != 0).float().mean() > 0.99  # every factor, every entry is live
    # the trap the random init avoids: A = [I; 0], B = [I, 0], K = W in the corner
    trap = ExpandedConv2d(conv, ratio=4)
    with torch.no_grad():
        for p in trap.parameters():
            p.zero_()
        trap.scale.fill_(1.0)
        trap.a.weight[:4, :, 0, 0] = torch.eye(4)
        trap.b.weight[:, :6, 0, 0] = torch.eye(6)
        trap.k.weight[:6, :4] = conv.weight
        assert rel(trap(x), conv(x)) < 1e-6
    trap(x).square().sum().backward()
    assert torch.count_nonzero(trap.k.weight.grad[6:]) == 0 and torch.count_nonzero(trap.k.weight.grad[:, 4:]) == 0


# -- the same first step as vanilla fine-tuning --------------------------------------------
def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The conv/linear weights of a plain model, or of an expanded one once merged (a merged copy)."""
    import copy
    merged = copy.deepcopy(model)
    merge_layers(merged)
    return {n: m.weight.detach().clone() for n, m in merged.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def one_step(model: nn.Module, x, y, lr: float = 1e-3, weight_decay: float = 0.0, zero_grad: bool = False):
    """One step of the recipe's optimizer (SGD, momentum 0.9, Nesterov), parameter groups as in training."""
    module = PruneLabModule(model, 10, x[:1], None)
    opt = torch.optim.SGD(module.parameter_groups(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if zero_grad:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    else:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def step_ratios(model_factory, ratio: int, x, y, **step) -> tuple[float, list[float]]:
    """‖ΔW expanded‖ / ‖ΔW vanilla‖ after one step from the same weights on the same batch:
    over all conv/linear weights together, and per layer."""
    vanilla = model_factory()
    expanded = model_factory()
    expand_layers(expanded, ratio, torch.Generator().manual_seed(ratio))
    w0 = weights(vanilla)
    one_step(vanilla, x, y, **step)
    one_step(expanded, x, y, **step)
    dv = {n: w - w0[n] for n, w in weights(vanilla).items()}
    de = {n: w - w0[n] for n, w in weights(expanded).items()}
    whole = (sum(float(d.pow(2).sum()) for d in de.values()) / sum(float(d.pow(2).sum()) for d in dv.values())) ** 0.5
    return whole, [float(de[n].norm() / dv[n].norm()) for n in dv]


def resnet8(dtype=torch.float32):
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_channels=1).to(dtype).train()


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 1, 16, 16, generator=g, dtype=dtype), torch.randint(0, 10, (32,), generator=g)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_one_sgd_step_moves_the_merged_weight_as_far_as_vanilla(ratio):
    whole, per_layer = step_ratios(resnet8, ratio, *batch())
    assert 0.67 <= whole <= 1.5, whole
    assert all(0.5 <= r <= 2.0 for r in per_layer), per_layer


@pytest.mark.usefixtures("one_thread")
def test_the_step_test_catches_random_outer_factors():
    """The former initialisation (Gaussian A, B; K = B⁺WA⁺; no scale) is exact too, but one step moves
    W several times as far as vanilla's."""
    x, y = batch()
    vanilla, chained = resnet8(), resnet8()
    expand_layers(chained, 4, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in chained.modules():
            if isinstance(m, (ExpandedConv2d, ExpandedLinear)):
                w = m.merge().weight.double()
                out_c, in_c = w.shape[:2]
                a = torch.randn(4 * in_c, in_c, generator=g, dtype=torch.float64) / in_c ** 0.5
                b = torch.randn(out_c, 4 * out_c, generator=g, dtype=torch.float64) / (4 * out_c) ** 0.5
                k = torch.einsum("po,oi...,iq->pq...", torch.linalg.pinv(b), w, torch.linalg.pinv(a))
                m.a.weight.copy_(a.view_as(m.a.weight)), m.k.weight.copy_(k), m.b.weight.copy_(b.view_as(m.b.weight))
                m.scale.fill_(1.0)
    w0 = weights(vanilla)
    assert all(rel(weights(chained)[n], w) < 1e-5 for n, w in w0.items())  # still exact
    one_step(vanilla, x, y)
    one_step(chained, x, y)
    dv = sum(float((w - w0[n]).pow(2).sum()) for n, w in weights(vanilla).items()) ** 0.5
    de = sum(float((w - w0[n]).pow(2).sum()) for n, w in weights(chained).items()) ** 0.5
    assert de / dv > 3


@pytest.mark.usefixtures("one_thread")
def test_weight_decay_shrinks_the_merged_weight_as_plain_sgd_does():
    """Zero loss gradient, wd > 0: the merged W moves exactly as vanilla SGD's W (decay on K only)."""
    x, y = batch(torch.float64)
    whole, per_layer = step_ratios(lambda: resnet8(torch.float64), 4, x, y, lr=0.1, weight_decay=0.01, zero_grad=True)
    assert abs(whole - 1) < 1e-6 and all(abs(r - 1) < 1e-6 for r in per_layer)
    # and it is the direction of plain decay: ΔW = -lr·(1 + momentum)·wd·W on the first step
    model = resnet8(torch.float64)
    expand_layers(model, 4, torch.Generator().manual_seed(0))
    w0 = weights(model)
    one_step(model, x, y, lr=0.1, weight_decay=0.01, zero_grad=True)
    for n, w in weights(model).items():
        torch.testing.assert_close(w, w0[n] * (1 - 0.1 * 1.9 * 0.01), rtol=1e-9, atol=1e-12)
    # decaying all three factors (one parameter group) would shrink W about 3× as fast
    model = resnet8(torch.float64)
    expand_layers(model, 4, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    shrink = [float(1 - w.norm() / w0[n].norm()) / (0.1 * 1.9 * 0.01) for n, w in weights(model).items()]
    assert all(2.5 < s < 3.1 for s in shrink), shrink


@pytest.mark.parametrize("kwargs", [dict(ratio=2.5), dict(ratio=0), dict(ratio=True), dict(step_share=0.0),
                                    dict(step_share=1.5), dict(compute="fast")])
def test_settings_that_cannot_train_well_are_refused(kwargs):
    with pytest.raises(PruneLabError, match=next(iter(kwargs))):
        LinearExpansion(**kwargs)


def test_spkd_is_zero_for_identical_features_and_invariant_to_channel_count():
    torch.manual_seed(0)
    f = torch.randn(8, 4, 5, 5)
    assert float(similarity_preserving_loss(f, f.clone())) < 1e-12
    wide = torch.cat([f, f], dim=1) / 2 ** 0.5  # 8 channels, the same Gram matrix Q·Qᵀ
    narrow = torch.randn(8, 3, 5, 5)  # a student with yet another channel count
    assert float(similarity_preserving_loss(f, wide)) < 1e-10
    assert float(similarity_preserving_loss(narrow, f)) == pytest.approx(float(similarity_preserving_loss(narrow, wide)),
                                                                         rel=1e-5)
    assert float(similarity_preserving_loss(narrow, f)) > 1e-3
    student, teacher = Outputs(torch.zeros(8, 10), [narrow, f]), Outputs(torch.zeros(8, 10), [f, wide])
    one_pair = float(similarity_preserving_loss(narrow, f))  # the second pair contributes 0
    assert float(SimilarityPreserving("sum")(student, teacher)) == pytest.approx(one_pair, rel=1e-5)
    # per pair (the default): γ keeps its one-pair meaning however many pairs are matched
    assert float(SimilarityPreserving()(student, teacher)) == pytest.approx(one_pair / 2, rel=1e-5)
    with pytest.raises(PruneLabError, match="reduction"):
        SimilarityPreserving("max")


def test_grad_norm_ratio_is_the_ratio_of_gradient_norms():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    v = torch.tensor([1.0], requires_grad=True)
    term, reference = (w * w).sum() / 2 + 0 * v.sum(), (w.sum() + 2 * v.sum())  # ∇: (3, 4, 0) and (1, 1, 2)
    assert grad_norm_ratio(term, reference, [w, v]) == pytest.approx(5 / 6 ** 0.5)
    term.backward()  # the graph is kept for the training step's own backward


def test_default_pairing_is_every_residual_block_and_stages_the_last_of_each_stage():
    assert residual_blocks(create_model("resnet8")) == ["layer1.0", "layer2.0", "layer3.0"]
    assert len(residual_blocks(create_model("resnet20"))) == 9
    assert stage_outputs(create_model("resnet20")) == ["layer1.2", "layer2.2", "layer3.2"]
    with pytest.raises(PruneLabError, match="layers='last'"):
        Distillation(SimilarityPreserving(), student_layers="last")


# -- the method end to end ------------------------------------------------------------------
def run_overparam(tmp_path, dense_dir, name, *overrides):
    out = tmp_path / name
    cfg = compose_cfg([*FAST, "method=overparam", "budget=0.7", *overrides], out, dense_dir)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    return run(cfg), out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_overparam_switches_end_to_end(tmp_path, dense_dir):
    l1, l1_out = run_overparam(tmp_path, dense_dir, "l1", "method=l1_filter")  # masks during training, shrink at export
    runs = {}
    # the method's default (both on), expansion alone and both off: each switch is flipped alone
    # once (both on vs expansion alone: SP-KD; expansion alone vs both off: expansion), trimmed
    # from all four pairs
    for expand, spkd in ((True, True), (True, False), (False, False)):
        runs[expand, spkd] = run_overparam(tmp_path, dense_dir, f"e{int(expand)}_s{int(spkd)}",
                                           f"method.expand={str(expand).lower()}", f"method.spkd={str(spkd).lower()}")
    plan = json.loads((l1_out / "model.json").read_text())["channel_plan"]
    x = torch.randn(3, 1, 8, 8)
    for (expand, spkd), (r, out) in runs.items():
        assert r["budget_met"] and abs(r["pruned"]["flops_reduction"] - 0.7) <= 0.02
        # the exported model has exactly the pruned architecture: same plan, same count as L1 filter's
        assert json.loads((out / "model.json").read_text())["channel_plan"] == plan
        rebuilt = load_model(out)
        assert n_params(rebuilt) == r["pruned"]["params"] == l1["pruned"]["params"] < r["dense"]["params"]
        assert [layer["shape"] for layer in r["layers"]] == [layer["shape"] for layer in l1["layers"]]
        program = torch.export.load(str(out / "model.pt2")).module()
        torch.testing.assert_close(program(x), rebuilt(x), rtol=1e-5, atol=1e-5)
        assert r["export"]["max_abs_diff_masked_vs_deployed"] == 0.0
        # training checkpoints hold the expanded factors; the exported weights never do
        ckpt = torch.load(out / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        assert any(k.endswith(".k.weight") for k in ckpt) == expand
        assert not any(k.endswith(".k.weight") for k in load_file(str(out / "model.safetensors")))
        assert not any(k.startswith("teacher") for k in ckpt)  # the teacher slot stays out of checkpoints
        metrics = (out / "csv/metrics.csv").read_text().splitlines()[0]
        assert ("train/distill" in metrics) == spkd
        assert ("distill" in r) == spkd and ("expansion" in r) == expand
        if spkd:  # SP-KD's pull against the labels at the first step, over the pairs it names
            assert r["distill"]["grad_ratio_first_step"] > 0 and r["distill"]["reduction"] == "mean"
            assert [s for s, _ in r["distill"]["pairs"]] == ["layer1.0", "layer2.0", "layer3.0"]
        if expand:
            assert r["expansion"]["merge_max_rel_logit_change"] < 1e-5
    weights = {k: load_file(str(out / "model.safetensors")) for k, (_, out) in runs.items()}
    for a in weights:
        for b in weights:
            if a != b:  # each switch changes the fine-tuning
                assert not all(torch.equal(weights[a][n], weights[b][n]) for n in weights[a])
    # both off = vanilla fine-tuning: the shrunk network trains like L1 filter's masked one
    assert abs(runs[False, False][0]["pruned"]["top1"] - l1["pruned"]["top1"]) <= 0.02


def test_overparam_resume_mid_run_equals_uninterrupted(tmp_path, dense_dir):
    common = ["epochs=4", "callbacks.model_checkpoint.save_top_k=-1"]
    full, full_out = run_overparam(tmp_path, dense_dir, "full", *common)
    ckpt = full_out / "checkpoints/epoch001.ckpt"
    resumed, out = run_overparam(tmp_path, dense_dir, "resumed", *common, f"ckpt_path={ckpt}")
    sa, sb = load_file(str(full_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full["pruned"]["top1"] == resumed["pruned"]["top1"]
    assert resumed["train"]["steps"] == full["train"]["steps"]
