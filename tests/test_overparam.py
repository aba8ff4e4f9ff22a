"""Linear over-parameterization + SP-KD (METHODS.md §4): exact expansion and merge, live extra
parameters, the SP-KD loss, and the `overparam` method end to end through the real config."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import FAST, compose_cfg
from prune_lab.callbacks.distillation import (Outputs, SimilarityPreserving, residual_blocks,
                                              similarity_preserving_loss)
from prune_lab.export import load_model
from prune_lab.models import create_model
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
        trap.a.weight[:4, :, 0, 0] = torch.eye(4)
        trap.b.weight[:, :6, 0, 0] = torch.eye(6)
        trap.k.weight[:6, :4] = conv.weight
        assert rel(trap(x), conv(x)) < 1e-6
    trap(x).square().sum().backward()
    assert torch.count_nonzero(trap.k.weight.grad[6:]) == 0 and torch.count_nonzero(trap.k.weight.grad[:, 4:]) == 0


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
    loss = SimilarityPreserving()(Outputs(torch.zeros(8, 10), [narrow, f]), Outputs(torch.zeros(8, 10), [f, wide]))
    assert float(loss) == pytest.approx(float(similarity_preserving_loss(narrow, f)), rel=1e-5)


def test_default_pairing_is_every_residual_block():
    assert residual_blocks(create_model("resnet8")) == ["layer1.0", "layer2.0", "layer3.0"]
    assert len(residual_blocks(create_model("resnet20"))) == 9


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
    for expand in (True, False):
        for spkd in (True, False):
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
