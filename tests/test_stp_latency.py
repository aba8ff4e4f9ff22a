"""STP with `method.target=latency`: every subnet is costed by the latency table's prediction.

Timings are noisy, so the device is replaced by a deterministic one: a layer costs its MACs plus a
fixed per-layer overhead (so depth costs more than its FLOPs say and the two measures part ways),
and a whole model costs the same sum plus a constant. What is asserted is then exact.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch_pruning as tp
from torch import nn

import prune_lab.sparsity.latency as latency_mod
from prune_lab.errors import PruneLabError
from prune_lab.methods.stp import StimulativeTraining
from prune_lab.methods.stp_budget import latency_record, uniform_width_plan
from prune_lab.models import create_model
from prune_lab.sparsity import count_flops

pytestmark = pytest.mark.usefixtures("one_thread")

MS_PER_MAC, MS_PER_LAYER, MS_OTHER = 1e-5, 0.3, 0.5


def fake_time_layer(sig, cin, cout, batch, channels_last, bias, device, repeats=7):
    if sig["kind"] == "conv":
        positions = sig["hw"][0] * sig["hw"][1] / (sig["stride"][0] * sig["stride"][1])
        macs = (cout if sig["dw"] else cin * cout) * sig["k"][0] * sig["k"][1] * positions
    else:
        macs = cin * cout
    return MS_PER_MAC * macs + MS_PER_LAYER


def fake_model_ms(model, x) -> float:
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    return MS_PER_MAC * count_flops(model, x[:1]) + MS_PER_LAYER * layers + MS_OTHER


@pytest.fixture
def fake_device(monkeypatch):
    """Deterministic layer and whole-model timings; counts the layer timings taken."""
    calls = {"layers": 0}

    def time_layer(*args, **kwargs):
        calls["layers"] += 1
        return fake_time_layer(*args, **kwargs)

    monkeypatch.setattr(latency_mod, "time_layer", time_layer)
    monkeypatch.setattr(latency_mod, "served_ms",
                        lambda models, x, latency: {k: fake_model_ms(m.cpu(), x.cpu()) for k, m in models.items()})
    return calls


def latency_stp(tmp_path, budget, model, x, **kwargs):
    stp = StimulativeTraining(budget=budget, target="latency", pool_size=300,
                              latency={"table_cache": str(tmp_path / "tables"), "table_points": 4}, **kwargs)
    stp.check(model, x[:1])
    stp.bind(model, x[:1])
    stp.space.order(stp.space.groups.scores(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)))
    return stp


def predicted(stp, arch) -> float:
    """The table's own prediction (LatencyTable.reduction), not the callback's cached value."""
    return stp.table.reduction(stp.space.channel_plan(arch), stp.space.skipped_blocks(arch))


def test_band_pool_and_search_use_the_tables_predicted_latency(tmp_path, fake_device):
    model, x = create_model("resnet14", num_classes=10, in_channels=1), torch.randn(2, 1, 8, 8)
    budget = 0.5
    stp = latency_stp(tmp_path, budget, model, x, num_subnets=3, search_population=20, search_generations=5)
    lo, hi = stp.band
    assert (lo, hi) == (budget, budget + stp.tolerance)
    for arch, cached in stp.pool.reduction.items():  # the pool is binned by predicted latency
        assert cached == pytest.approx(predicted(stp, arch), rel=1e-12, abs=1e-12)
    # the measure matters here: some subnets in the latency band are outside the FLOPs band
    assert any(not lo <= stp.space.flops_reduction(a) <= hi for a in stp.pool.in_band())
    sampler, steps, elites, counted = stp.sampler, 100, [stp.space.largest()], 0
    for step in range(steps):
        if step % 10 == 0:
            elites = sampler.select_elites(elites, (step + 10) / steps, lambda a: -stp.space.macs(a),
                                           random.Random(step), k=5)
        archs = sampler.sample(step / steps, random.Random(f"0-{step}"), elites)
        assert lo <= predicted(stp, archs[0]) <= hi, step  # the budget is trained from the first step
        for arch in archs:
            if sampler.in_band(arch):
                counted += 1
                assert lo <= predicted(stp, arch) <= hi
    assert counted >= steps
    stp.elites = [stp.space.largest()]  # infeasible: must not leak through
    arch, _ = stp.evolve(lambda a: -stp.space.macs(a), random.Random(0))  # pushes towards big subnets
    assert budget <= predicted(stp, arch) <= hi


def test_the_chosen_subnet_is_recorded_predicted_and_measured(tmp_path, fake_device):
    from prune_lab.export import remove_modules
    from prune_lab.sparsity import shrink

    model, x = create_model("resnet14", num_classes=10, in_channels=1), torch.randn(2, 1, 8, 8)
    stp = latency_stp(tmp_path, 0.4, model, x)
    arch = stp.pool.in_band()[0]
    plan, skipped = stp.space.channel_plan(arch), stp.space.skipped_blocks(arch)
    record = latency_record(stp.table, model, x[:1], stp.latency, plan, skipped)
    assert record["estimated_latency_reduction"] == pytest.approx(predicted(stp, arch), rel=1e-12)
    small = shrink(model, plan, x[:1])
    remove_modules(small, skipped)
    dense_ms, pruned_ms = fake_model_ms(model, x), fake_model_ms(small, x)
    assert record["latency_ms"] == pytest.approx({"dense": dense_ms, "pruned": pruned_ms})
    assert record["measured_latency_reduction"] == pytest.approx(1 - pruned_ms / dense_ms)
    assert record["latency_table"]["predicted_dense_ms"] == pytest.approx(dense_ms)  # calibrated on the dense forward


def test_the_table_is_timed_once_and_reread_from_its_cache(tmp_path, fake_device):
    model, x = create_model("resnet14", num_classes=10, in_channels=1), torch.randn(2, 1, 8, 8)
    first = latency_stp(tmp_path, 0.5, model, x)
    assert fake_device["layers"] > 0
    taken = fake_device["layers"]
    second = latency_stp(tmp_path, 0.5, model, x)  # a resumed run: the same cache directory
    assert fake_device["layers"] == taken
    assert second.pool.reduction == first.pool.reduction


def test_uniform_width_ablation_meets_the_latency_budget(tmp_path, fake_device):
    model, x = create_model("resnet14", num_classes=10, in_channels=1), torch.randn(2, 1, 8, 8)
    budget = 0.6
    stp = latency_stp(tmp_path, budget, model, x, search=False)  # check() solves it once by shapes
    scores = stp.space.groups.scores(tp.importance.GroupMagnitudeImportance(p=1, normalizer=None))
    plan = uniform_width_plan(stp.space, scores, budget, stp.tolerance, stp.table)
    assert abs(stp.table.reduction(plan) - budget) <= stp.tolerance
    kept = [float(keep.float().mean()) for keep in plan.values()]
    assert max(kept) - min(kept) <= 0.07  # the same fraction of every group (up to rounding)
    # a layer's fixed cost does not shrink with its channels: meeting the latency budget takes more
    # than the same FLOPs budget would, which the FLOPs-target plan falls short of
    assert 1 - stp.space.flops.macs(plan) / stp.space.dense_macs > budget + stp.tolerance
    flops_plan = uniform_width_plan(stp.space, scores, budget, stp.tolerance)
    assert stp.table.reduction(flops_plan) < budget - stp.tolerance


def test_an_unreachable_latency_budget_stops_before_training(tmp_path, fake_device):
    model, x = create_model("resnet14", num_classes=10, in_channels=1), torch.zeros(1, 1, 8, 8)
    stp = StimulativeTraining(budget=0.95, target="latency", widths=(0.5, 1.0), pool_size=100,
                              latency={"table_cache": str(tmp_path / "tables"), "table_points": 4})
    with pytest.raises(PruneLabError, match=r"budget=0.95 \(latency\) is not reachable by stp") as err:
        stp.check(model, x)
    assert "\n" not in str(err.value)
    with pytest.raises(PruneLabError, match=r"method.target=params is not one of: flops, latency"):
        StimulativeTraining(budget=0.5, target="params")


def test_flops_target_times_nothing_and_costs_subnets_by_flops(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("target=flops must not time anything")

    monkeypatch.setattr(latency_mod, "time_layer", no_timing)
    monkeypatch.setattr(latency_mod, "served_ms", no_timing)
    model, x = create_model("resnet14", num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8)
    stp = StimulativeTraining(budget=0.5, pool_size=100)
    stp.check(model, x)
    stp.bind(model, x)
    assert stp.table is None and stp.space.table is None
    assert all(r == stp.space.flops_reduction(a) for a, r in stp.pool.reduction.items())


@pytest.mark.slow
def test_stp_latency_quickstart_records_the_exported_subnets_latency(tmp_path, dense_dir, fake_device):
    import json

    import prune_lab.pipeline as pipeline
    from conftest import FAST, compose_cfg
    from prune_lab.export import load_model

    out = tmp_path / "run"
    cfg = compose_cfg([*FAST, "method=stp", "method.target=latency", "budget=0.4",
                       "method.callbacks.stp.search_population=12", "method.callbacks.stp.search_generations=3",
                       "method.callbacks.stp.pool_size=300", "method.search_images=100",
                       "method.callbacks.stp.elite_updates=3", f"++latency.table_cache={tmp_path / 'tables'}"],
                      out, dense_dir)
    pipeline.validate(cfg)  # STP accepts target=latency like the other structured methods
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("# composed in-process by the test\n")
    stp = pipeline.run(cfg)["stp"]
    assert stp["budget_band"] == pytest.approx([0.4, 0.42])
    assert stp["budget_band"][0] <= stp["estimated_latency_reduction"] <= stp["budget_band"][1]
    assert stp["subnet_counts"]["steps_without_band"] == 0
    x = torch.zeros(1, 1, 8, 8)
    dense_ms, pruned_ms = fake_model_ms(create_model("resnet8", num_classes=10, in_channels=1), x), \
        fake_model_ms(load_model(out), x)
    assert stp["measured_latency_reduction"] == pytest.approx(1 - pruned_ms / dense_ms)  # the exported subnet
    on_disk = json.loads((out / "search.json").read_text())
    assert on_disk["measured_latency_reduction"] == stp["measured_latency_reduction"]
    assert on_disk["estimated_latency_reduction"] == stp["estimated_latency_reduction"]
