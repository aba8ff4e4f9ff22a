"""Hub classifiers prune or refuse in one line (issue 33): `prune_lab.bench.zoo` runs a model
through the steps of `method=l1_filter budget=0.5` and `method=magnitude budget=0.9` (two
training steps, random data). Fast: one model per family whose structure needs its own handling;
slow (`-m slow`): every torchvision classifier and the timm families of docs/guides/model-zoo.md,
so a torchvision or timm release that breaks one shows up."""
from __future__ import annotations

import pytest
import torchvision

from prune_lab.bench.zoo import FLOPS_BUDGET, FLOPS_TOL, PARAMS_BUDGET, TIMM_MODELS, check_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {
    "regnet_x_400mf": "grouped convolutions (RegNet/ResNeXt): the same positions go in every group",
    "mobilenet_v3_small": "depthwise convolutions and squeeze-excitation",
    "googlenet": "auxiliary classifiers (removed) and inception concatenations",
    "squeezenet1_0": "a convolutional classifier",
    "shufflenet_v2_x0_5": "a channel shuffle: the groups through it stay whole, the branches prune",
}


def assert_pruned(row: dict) -> None:
    l1, mag = row["l1_filter"], row["magnitude"]
    assert l1["status"] == "ok", l1
    assert abs(l1["flops_reduction"] - FLOPS_BUDGET) <= FLOPS_TOL
    assert l1["max_abs_diff"] <= 1e-4  # the exported model computes what the masked one computed
    assert l1["params_deployed"] < l1["params_dense"]
    assert mag["status"] == "ok", mag
    assert abs(mag["sparsity"] - PARAMS_BUDGET) < 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_representative_torchvision_families_prune(name):
    row = check_model("torchvision", name, sizes=(32,))
    assert row["input_px"] == 32
    assert_pruned(row)
    if name == "regnet_x_400mf":
        assert row["l1_filter"]["grouped_conv_groups"] > 0  # grouped convs are pruned, not left out


def test_a_fixed_input_size_is_refused_in_one_line_naming_it():
    row = check_model("torchvision", "vit_b_32", sizes=(32,))
    for method in ("l1_filter", "magnitude"):
        assert row[method]["status"] == "refused"
        assert "224" in row[method]["reason"] and "\n" not in row[method]["reason"]


def check_or_refuse(row: dict) -> None:
    """ok, or a one-line refusal (a PruneLabError before training); never a traceback or a miss."""
    for method in ("l1_filter", "magnitude"):
        result = row[method]
        assert result["status"] in ("ok", "refused"), (row["model"], method, result)
        if result["status"] == "refused":
            assert result["reason"] and "\n" not in result["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_torchvision_zoo(name):
    check_or_refuse(check_model("torchvision", name))


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_families(name):
    pytest.importorskip("timm")
    check_or_refuse(check_model("timm", name))


def test_a_grouped_conv_model_runs_through_train_py(tmp_path, dense_dir):
    """The pipeline itself (not the zoo check): RegNet's grouped convs pruned to the FLOPs budget,
    the exported model physically smaller and computing what the masked one did."""
    from test_pipeline import run_fast

    results, _ = run_fast(tmp_path, dense_dir, "model=torchvision", "model.name=regnet_x_400mf", "data=synthetic",
                          "data.num_samples=48", "data.image_size=32", "data.batch_size=16", "method=l1_filter",
                          "budget=0.5", "dense.epochs=1", "epochs=1",
                          "lr=0.001", "dense.lr=0.001")  # random labels at a high rate blow the logits up to 1e8
    assert results["budget_met"], results["pruned"]["flops_reduction"]
    assert results["pruned"]["params"] < results["dense"]["params"]
    assert results["export"]["max_abs_diff_masked_vs_deployed"] <= 1e-4
