"""Wanda and SparseGPT (post-training, no training): Wanda's score against hand computations, its
per-row masks and N:M; SparseGPT's OBS update against the closed form and least squares, its
layer error against magnitude and Wanda, N:M; the post-training steps' records; end-to-end runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from prune_lab.callbacks import LayerwiseReconstruction, OneShotMagnitude, RecalibrateBN, SparseGPT, Wanda
from prune_lab.data import DigitsDataModule
from prune_lab.errors import PruneLabError
from prune_lab.models import create_model
from prune_lab.module import PruneLabModule
from prune_lab.sparsity.nm import NMPattern
from prune_lab.sparsity.obs import InputStats, collect_inputs, hessian, sparsegpt_prune
from prune_lab.sparsity.wanda import row_mask, wanda_mask, wanda_scores
from test_pipeline import run_fast, zero_fraction

P24 = NMPattern(2, 4)
pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def stats_of(layer, *xs, gram=True):
    s = InputStats(layer, gram=gram, sq=True)
    for x in xs:
        s.update(x)
    return s


def explicit_groups(t: torch.Tensor, m: int):
    """(values, kept) of every run of m consecutive input channels, by explicit indexing."""
    for o in range(t.shape[0]):
        for g in range(t.shape[1] // m):
            block = t[o, g * m:(g + 1) * m]
            yield from block.reshape(m, -1).t()


# -- Wanda -------------------------------------------------------------------------------------
def test_wanda_score_of_a_linear_layer_is_weight_times_input_feature_norm():
    layer = nn.Linear(5, 3)
    x1, x2 = torch.randn(4, 2, 5, generator=gen(1)), torch.randn(3, 5, generator=gen(2))  # tokens over leading dims
    scores = wanda_scores(layer.weight, stats_of(layer, x1, x2).sq)
    tokens = [x1[b, t] for b in range(4) for t in range(2)] + [x2[b] for b in range(3)]
    for i in range(3):
        for j in range(5):
            norm = math.sqrt(sum(float(tok[j]) ** 2 for tok in tokens))
            assert float(scores[i, j]) == pytest.approx(abs(float(layer.weight[i, j])) * norm, rel=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_wanda_score_of_a_conv_uses_the_im2col_columns(groups):
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 4, 5, 5, generator=gen(3))
    scores = wanda_scores(layer.weight, stats_of(layer, x[:1], x[1:]).sq)
    xp = F.pad(x, (1, 1, 1, 1))
    cin = 4 // groups
    for o in range(6):
        g = o // (6 // groups)
        for c in range(cin):
            for i in range(3):
                for j in range(3):
                    # every input this weight multiplies: channel g·cin + c at offset (i, j) of each window
                    vals = [float(xp[n, g * cin + c, oy * 2 + i, ox * 2 + j]) for n in range(2)
                            for oy in range(3) for ox in range(3)]
                    want = abs(float(layer.weight[o, c, i, j])) * math.sqrt(sum(v * v for v in vals))
                    assert float(scores[o, c, i, j]) == pytest.approx(want, rel=1e-5, abs=1e-7)
    if groups == 1:  # and the same through F.unfold
        cols = F.unfold(x, 3, padding=1, stride=2)
        torch.testing.assert_close(scores, layer.weight.abs().detach() * cols.square().sum((0, 2)).sqrt().view(4, 3, 3))


@pytest.mark.parametrize("shape,sparsity", [((7, 10), 0.5), ((6, 4, 3, 3), 0.9), ((5, 9), 0.37)])
def test_wanda_keeps_the_top_scores_of_every_row_at_the_exact_layer_sparsity(shape, sparsity):
    scores = torch.rand(shape, generator=gen(4))
    keep = row_mask(scores, sparsity)
    rows, cols = shape[0], scores[0].numel()
    assert int((~keep).sum()) == round(sparsity * scores.numel())  # the layer is exact
    pruned_per_row = (~keep).reshape(rows, -1).sum(1)
    assert int(pruned_per_row.max() - pruned_per_row.min()) <= 1  # row-wise uniform
    for r in range(rows):
        kept = int(keep[r].sum())
        top = set(torch.topk(scores[r].flatten(), kept).indices.tolist())
        assert set(keep[r].flatten().nonzero().flatten().tolist()) == top
    assert set(pruned_per_row.tolist()) <= {math.floor(sparsity * cols), math.ceil(sparsity * cols)}


def test_the_rows_that_prune_one_more_are_those_whose_next_candidate_scores_lowest():
    scores = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.2, 0.9], [0.3, 0.4, 0.8]])
    keep = row_mask(scores, 5 / 9)  # 5 pruned: 1 per row, the 2 extra to rows 1 (0.2) and 2 (0.4), not 0 (0.6)
    assert keep.tolist() == [[False, True, True], [False, False, True], [False, False, True]]


def test_wanda_two_four_keeps_the_two_best_scores_of_every_group_of_four_input_channels():
    layer = nn.Conv2d(8, 6, 3)
    stats = stats_of(layer, torch.randn(3, 8, 6, 6, generator=gen(5)))
    keep = wanda_mask(layer.weight.detach(), stats.sq, pattern=P24)
    scores = wanda_scores(layer.weight, stats.sq)
    for s, k in zip(explicit_groups(scores, 4), explicit_groups(keep, 4)):
        assert int(k.sum()) == 2
        assert set(torch.topk(s, 2).indices.tolist()) == set(k.nonzero().flatten().tolist())
    assert bool(wanda_mask(torch.randn(4, 3, 3, 3), torch.ones(1, 27), pattern=P24).all())  # 3 inputs: dense


def test_wanda_prunes_without_changing_the_kept_weights():
    layer = nn.Linear(12, 4)
    before = layer.weight.detach().clone()
    _, _, keep = Wanda(budget=0.5).prune_layer(layer, stats_of(layer, torch.randn(20, 12, generator=gen(6))), 0.5)
    assert torch.equal(layer.weight.detach(), before * keep) and int((~keep).sum()) == 24


# -- SparseGPT ---------------------------------------------------------------------------------
def correlated_inputs(n, d, seed):
    g = gen(seed)
    x = torch.randn(n, d, generator=g) * (0.1 + 3 * torch.rand(d, generator=g))
    return x @ (torch.eye(d) + 0.2 * torch.randn(d, d, generator=g))


def output_error(layer_weight, dense, x):
    return float((x @ (dense - layer_weight).t()).square().sum())


def test_sparsegpt_layer_error_is_below_magnitude_and_wanda_at_the_same_sparsity():
    x = correlated_inputs(1024, 256, seed=7)
    dense = torch.randn(24, 256, generator=gen(8))
    errors = {}
    for name in ("sparsegpt", "wanda", "magnitude"):
        layer = nn.Linear(256, 24, bias=False)
        with torch.no_grad():
            layer.weight.copy_(dense)
        if name == "magnitude":
            keep = row_mask(dense.abs(), 0.5)
            with torch.no_grad():
                layer.weight.mul_(keep)
        else:
            step = SparseGPT(budget=0.5) if name == "sparsegpt" else Wanda(budget=0.5)
            _, _, keep = step.prune_layer(layer, stats_of(layer, x[:500], x[500:]), 0.5)
        assert int((layer.weight == 0).sum()) == int((~keep).sum()) == 24 * 128  # the same mask sparsity
        errors[name] = output_error(layer.weight.detach(), dense, x)
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"] and errors["sparsegpt"] < 0.8 * errors["wanda"]


def one_row_problem(d=6, q=0, seed=9):
    x = torch.randn(50, d, generator=gen(seed), dtype=torch.float64)
    w = 1.0 + torch.rand(1, d, generator=gen(seed + 1), dtype=torch.float64)
    w[0, q] = 0.1  # the smallest OBS error by far: the one weight pruned
    return x, w, hessian(x.t() @ x, len(x), dampening=0.0)


def test_pruning_the_first_column_is_the_obs_update_and_the_least_squares_optimum():
    x, w, h = one_row_problem(q=0)
    new, keep = sparsegpt_prune(w, h, sparsity=1 / 6, block_size=128)
    assert keep.tolist() == [[False, True, True, True, True, True]]
    h_inv = torch.linalg.inv(h)
    delta = -(w[0, 0] / h_inv[0, 0]) * h_inv[:, 0]  # OBS: δ = −(w_q / [H⁻¹]_qq) · H⁻¹[:, q]
    torch.testing.assert_close(new[0], w[0] + delta, rtol=0, atol=1e-10)
    rest = torch.linalg.lstsq(x[:, 1:], x @ w[0]).solution  # best remaining weights for the fixed mask
    torch.testing.assert_close(new[0, 1:], rest, rtol=0, atol=1e-4)
    assert float(new[0, 0]) == 0.0


def test_a_later_pruned_column_is_compensated_by_the_columns_after_it_only():
    """SparseGPT's order: columns before q are already processed (frozen), so the result is the
    least-squares optimum of the columns after q, the earlier ones fixed."""
    q = 3
    x, w, h = one_row_problem(d=7, q=q, seed=11)
    new, keep = sparsegpt_prune(w, h, sparsity=1 / 7, block_size=2)  # several blocks: the lazy updates too
    assert (~keep[0]).nonzero().flatten().tolist() == [q]
    torch.testing.assert_close(new[0, :q], w[0, :q], rtol=0, atol=0)
    residual = x @ w[0] - x[:, :q] @ w[0, :q]
    rest = torch.linalg.lstsq(x[:, q + 1:], residual).solution
    torch.testing.assert_close(new[0, q + 1:], rest, rtol=0, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 8), lambda: nn.Conv2d(8, 6, 3, padding=1)])
def test_sparsegpt_two_four_is_exact_along_the_input_dimension_and_independent_of_the_block_size(make):
    torch.manual_seed(12)
    layer = make()
    x = torch.randn(4, 16) if isinstance(layer, nn.Linear) else torch.randn(4, 8, 5, 5)
    dense = layer.weight.detach().clone()
    stats = stats_of(layer, x)
    results = []
    for block in (4, 128):  # the groups' selection reads the compensated weights: lazy batching is exact
        with torch.no_grad():
            layer.weight.copy_(dense)
        _, _, keep = SparseGPT(budget=0.5, pattern="2:4", block_size=block).prune_layer(layer, stats, 0.5)
        w = layer.weight.detach().clone()
        for vals, kept in zip(explicit_groups(w, 4), explicit_groups(keep, 4)):
            assert int(kept.sum()) == 2 and bool((vals[~kept] == 0).all()) and bool((vals[kept] != 0).all())
        assert bool((P24.group_counts(w) == 2).all())
        results.append(w)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(PruneLabError, match="block_size=6"):
        SparseGPT(budget=0.5, pattern="2:4", block_size=6)
    with pytest.raises(PruneLabError, match="budget=0.9"):
        SparseGPT(budget=0.9, pattern="2:4")


# -- capturing a layer's inputs -----------------------------------------------------------------
def test_captured_inputs_are_normalised_by_running_or_by_batch_statistics_and_leave_bn_as_it_was():
    bn, fc = nn.BatchNorm1d(3), nn.Linear(3, 2)
    model = nn.Sequential(bn, fc)
    with torch.no_grad():  # stale statistics, as after pruning the layers before
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(4.0)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(40, 3, generator=gen(13)) * 3 + 1
    batches = [(x[:20], None), (x[20:], None)]
    for mode in ("running", "batch"):
        s = collect_inputs(model, {"fc.weight": fc}, batches, gram=True, sq=True, stop_after=True, bn=mode)["fc.weight"]
        want = torch.cat([(b - 5.0) / math.sqrt(4.0 + bn.eps) if mode == "running"
                          else (b - b.mean(0)) / (b.var(0, unbiased=False) + bn.eps).sqrt() for b, _ in batches])
        torch.testing.assert_close(s.sq[0], want.square().sum(0).double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.gram[0], (want.t() @ want).double(), rtol=1e-5, atol=1e-5)
        assert s.tokens == 40 and model.training and bn.training  # the mode it had (train) is restored
        assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())  # running statistics untouched
    assert Wanda(0.5).capture_bn == "batch" and Wanda(0.5, recalibrate_bn=False).capture_bn == "running"


# -- the steps' records, end to end ------------------------------------------------------------
def test_every_post_training_step_records_its_wall_time_and_passes():
    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=8, batch_size=64, seed=0, calibration_size=128)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    module = PruneLabModule(model, 10, dm.example_input(1), torch.optim.SGD)
    n_layers = len(module.masks.prunable)
    steps = [OneShotMagnitude(0.5), RecalibrateBN(), LayerwiseReconstruction(0.5, steps=2, samples=64),
             Wanda(0.5), Wanda(0.5, inputs="pruned"), SparseGPT(0.5)]
    assert all(s.report() == {} for s in steps)  # not run (a resume): nothing to record
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    for step in steps:  # each from the same dense weights
        module.masks.reset()
        model.load_state_dict(dense)
        step(module, dm, None)
        (key, rec), = [(k, v) for k, v in step.report().items()]
        assert rec["pruning_wall_s"] > 0
        records.append((key, rec))
    passes = {k: r["calibration_passes"] for k, r in records}
    assert passes["oneshot_magnitude"] == 0 and passes["bn_recalibration"] == 1
    assert passes["reconstruction"] == 2 * n_layers
    assert [r["calibration_passes"] for k, r in records if k == "wanda"] == [2, n_layers + 1]
    assert passes["sparsegpt"] == n_layers + 1
    for key, rec in records[3:]:
        assert rec["calibration_samples"] == 128 and set(rec["layers"]) == set(module.masks.prunable)
        per_layer = [v["reconstruction_error"] for v in rec["layers"].values()]
        assert rec["reconstruction_error"] == pytest.approx(sum(per_layer))
        assert all(0 < v["reconstruction_error"] < 1 for v in rec["layers"].values())


@pytest.mark.parametrize("method,budget,extra", [("wanda", 0.9, []), ("sparsegpt", 0.9, []),
                                                 ("sparsegpt", 0.5, ["method.pattern=2:4"])])
def test_post_training_baselines_run_end_to_end(method, budget, extra, tmp_path, dense_dir):
    results, out = run_fast(tmp_path, dense_dir, f"method={method}", f"budget={budget}", *extra)
    on_disk = json.loads((out / "results.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    weights = {k: v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)}
    assert on_disk["budget_met"] is True and on_disk["train"]["steps"] == 0
    assert on_disk["pruned"]["sparsity"] == pytest.approx(zero_fraction(state), abs=1e-6)
    if extra:  # every layer that fits holds exactly 2 of every 4; the 1-channel stem stays dense
        assert on_disk["pattern"]["dense_layers"] == ["conv1.weight"]
        assert all(bool((P24.group_counts(v) == 2).all()) for k, v in weights.items() if k != "conv1.weight")
    else:  # every layer exactly at the budget
        for k, v in weights.items():
            assert v.numel() - int(v.count_nonzero()) == round(budget * v.numel()), k
    rec = on_disk[method]
    assert rec["pruning_wall_s"] > 0 and rec["calibration_passes"] >= 2
    assert rec["inputs"] == ("dense" if method == "wanda" else "pruned") and rec["capture_bn"] == "batch"
    assert rec["reconstruction_error"] > 0


@pytest.mark.parametrize("method", ["sparsegpt", pytest.param("wanda", marks=pytest.mark.slow)])
def test_fine_tuning_after_a_post_training_prune_keeps_its_masks(method, tmp_path, dense_dir):
    """`method.train=true`: the prune as without it, then fine-tuning that moves the kept weights only."""
    _, plain = run_fast(tmp_path, dense_dir, f"method={method}", "budget=0.9", name="plain")
    _, tuned = run_fast(tmp_path, dense_dir, f"method={method}", "budget=0.9", "method.train=true", name="tuned")
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    results = json.loads((tuned / "results.json").read_text())
    assert results["train"]["steps"] > 0 and results["budget_met"]
    assert results[method]["pruning_wall_s"] > 0  # the prune ran before the fine-tuning
    moved = 0
    for k, v in a.items():
        if k.endswith("weight") and v.dim() in (2, 4):
            assert torch.equal(v == 0, b[k] == 0), k  # the same entries pruned, none regrown
            moved += int((v != b[k]).sum())
    assert moved > 0


def test_a_resumed_fine_tuning_keeps_the_prune_record_and_equals_the_uninterrupted_run(tmp_path, dense_dir):
    common = ["method=sparsegpt", "budget=0.9", "method.train=true", "epochs=3",
              "callbacks.model_checkpoint.save_top_k=-1"]
    full, _ = run_fast(tmp_path, dense_dir, *common, name="full")
    ckpt = tmp_path / "full/checkpoints/epoch000.ckpt"
    resumed, out = run_fast(tmp_path, dense_dir, *common, f"ckpt_path={ckpt}", name="resumed")
    assert resumed["sparsegpt"] == full["sparsegpt"]  # the prune did not run again, its record stays
    assert (out / "prepare.json").is_file()
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
