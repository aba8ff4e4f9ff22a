"""target=latency: the per-layer latency table, the allocations solved on it, the measured
correction, and the checks before training. Timing is replaced by a deterministic cost model
wherever an exact assertion is made (real timings are noisy); one test times for real and only
checks what timing cannot break (shapes, cache, keys)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.models import classifier_of, create_model
from prune_lab.sparsity import ChannelGroups, FlopsModel, shrink
from prune_lab.sparsity import latency as latency_mod
from prune_lab.sparsity.importance import Magnitude
from prune_lab.sparsity.latency import LatencyTable
from prune_lab.sparsity.latency_allocation import max_reduction, meet_latency, solve_latency_target
from prune_lab.sparsity.measure import layer_macs

pytestmark = pytest.mark.usefixtures("one_thread")


def mac_cost(sig, cin, cout, batch, channels_last, bias, device, repeats=7):
    """A deterministic 'timing': proportional to the layer's MACs (bilinear in cin, cout)."""
    if sig["kind"] == "conv":
        h, w = sig["hw"]
        oh = (h + 2 * sig["padding"][0] - sig["k"][0]) // sig["stride"][0] + 1
        ow = (w + 2 * sig["padding"][1] - sig["k"][1]) // sig["stride"][1] + 1
        per_out = (1 if sig["dw"] else cin // sig.get("groups", 1)) * sig["k"][0] * sig["k"][1] * oh * ow
        return 1e-6 * batch * cout * per_out
    return 1e-6 * batch * cin * cout * math.prod(sig["extra"] or [1])


@pytest.fixture
def fake_timing(monkeypatch):
    calls = []

    def timed(*args, **kw):
        calls.append(args[1:3])
        return mac_cost(*args, **kw)
    monkeypatch.setattr(latency_mod, "time_layer", timed)
    return calls


def model_and_groups(name="resnet14", channels=1, size=16):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=channels).eval()
    x = torch.randn(1, channels, size, size)
    return model, x, ChannelGroups(model, x, ignored=[classifier_of(model)[1]])


def test_table_predicts_the_shrunk_models_layer_cost_exactly(fake_timing, tmp_path):
    model, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    g = torch.Generator().manual_seed(1)
    for trial in range(3):  # arbitrary plans, also off the grid: bilinear interpolation of a bilinear cost is exact
        plan = {}
        for root, size in zip(groups.roots, groups.sizes):
            keep = torch.zeros(size, dtype=torch.bool)
            keep[torch.randperm(size, generator=g)[:int(torch.randint(1, size + 1, (1,), generator=g))]] = True
            plan[root] = keep
        small = shrink(model, plan, x)
        want = 1e-6 * 4 * sum(layer_macs(small, x).values())
        assert table.predict_layers(plan) == pytest.approx(want, rel=1e-9)
    assert scores  # groups exist


def test_table_is_cached_per_signature_and_reread(fake_timing, tmp_path):
    _, x, groups = model_and_groups()
    LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    first = len(fake_timing)
    signatures = {json.dumps(json.loads(p.read_text())["sig"], sort_keys=True) for p in tmp_path.rglob("*.json")}
    # layers of equal shape share one grid: fewer timings than layers × grid points
    assert 0 < len(signatures) < 16 and first > 0
    LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    assert len(fake_timing) == first  # nothing measured the second time
    LatencyTable(groups, x, batch_size=8, points=4, cache_dir=tmp_path)
    assert len(fake_timing) > first   # another batch size is another table


def test_other_time_scales_with_kept_activations(fake_timing, tmp_path):
    _, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    table.calibrate_total(table.layers_dense_ms + 1.0)
    assert table.predict_ms(None) == pytest.approx(table.layers_dense_ms + 1.0)
    half = {r: torch.arange(s) < s // 2 for r, s in zip(groups.roots, groups.sizes)}
    kept = table.kept(half)
    act = sum(cout * table.flops.layers[n]["pos"] for n, (_, cout) in kept.items())
    assert table.predict_ms(half) == pytest.approx(table.predict_layers(half) + act / table.dense_act)


@pytest.mark.parametrize("round_to", [1, 4])
def test_halp_plan_meets_the_predicted_budget_with_the_last_step_needed(fake_timing, tmp_path, round_to):
    model, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    table.calibrate_total(table.layers_dense_ms * 1.5)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    for target in (0.3, 0.6):
        plan, predicted = solve_latency_target(groups, table, scores, target, "halp", round_to=round_to)
        assert predicted >= target and predicted == pytest.approx(table.reduction(plan))
        assert predicted < target + 0.1  # stops at the first plan that meets it
        for root, keep in plan.items():
            k = int(keep.sum())
            assert k >= 1 and (round_to == 1 or k == keep.numel() or k % round_to == 0)
            # the lowest-scored channels go first within a group
            s = scores[groups.roots.index(root)]
            if 0 < k < keep.numel():
                assert s[keep].min() >= s[~keep].max()


def test_halp_keeps_more_flops_than_the_flops_plan_at_equal_predicted_latency(fake_timing, tmp_path):
    """With a cost that is not FLOPs (here: layer MACs + activation volume), trading by latency
    keeps more of the model than uniform FLOPs ratios that reach the same predicted latency."""
    model, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    table.calibrate_total(table.layers_dense_ms * 2.0)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    flops = FlopsModel(groups, x)
    halp, p_halp = solve_latency_target(groups, table, scores, 0.5, "halp")
    by_flops, p_flops = solve_latency_target(groups, table, scores, 0.5, "flops", distribution="uniform")
    assert abs(p_flops - 0.5) < 0.02 and p_halp >= 0.5
    assert flops.macs(halp) > flops.macs(by_flops)


def test_unreachable_latency_budget_is_refused(fake_timing, tmp_path):
    _, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    table.calibrate_total(table.layers_dense_ms * 3.0)
    top = max_reduction(groups, table)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    with pytest.raises(PruneLabError, match="not reachable"):
        solve_latency_target(groups, table, scores, min(top + 0.05, 0.99), "halp")
    with pytest.raises(PruneLabError, match="unknown latency allocation 'fast'"):
        solve_latency_target(groups, table, scores, 0.3, "fast")


def test_meet_latency_corrects_a_biased_prediction():
    """measured = predicted − 0.1: the second round asks for the miss more, aimed at the middle of
    the accepted window [0.4, 0.41], and lands in it."""
    def solve(asked):
        return {"asked": asked}, asked

    def measure(plan):
        return plan["asked"] - 0.1

    plan, history = meet_latency(solve, measure, 0.4, tolerance=0.02, rounds=3)
    assert [round(h["asked"], 6) for h in history] == [0.4, 0.505]
    assert plan["asked"] == pytest.approx(0.505) and history[-1]["measured"] == pytest.approx(0.405)


def test_meet_latency_treats_the_budget_as_a_ceiling_on_latency():
    """A plan just short of the budget is not accepted though it is closer than one just past it;
    without a round in the window, a shortfall counts four times an overshoot; the kept round is
    flagged `chosen` (results.json's measured_reduction is its measurement)."""
    def run(measured_values, rounds=3):
        values = iter(measured_values)
        return meet_latency(lambda asked: ({"asked": asked}, asked), lambda plan: next(values), 0.4,
                            tolerance=0.02, rounds=rounds)

    plan, history = run([0.397, 0.404])
    assert len(history) == 2 and history[-1]["measured"] == 0.404 and plan["asked"] == pytest.approx(0.408)
    plan, history = run([0.396, 0.418, 0.39])  # misses 0.016, 0.018, 0.04: the first is kept
    assert len(history) == 3 and plan["asked"] == 0.4
    assert [h["chosen"] for h in history] == [True, False, False]
    plan, history = run([0.397, 0.415, 0.38])  # misses 0.012, 0.015, 0.08
    assert plan["asked"] == 0.4
    plan, history = run([0.392, 0.413], rounds=2)  # misses 0.032 vs 0.013: the overshoot is kept
    assert plan["asked"] == pytest.approx(0.413)
    # 0.01 short against 0.03 over: counted twice (the old rule) the short plan was kept; a ResNet-20
    # plan accepted 0.014 short re-timed 0.061 short in an independent check (README)
    plan, history = run([0.39, 0.43], rounds=2)
    assert plan["asked"] == pytest.approx(0.415) and [h["chosen"] for h in history] == [False, True]


def test_meet_latency_confirms_a_landing_with_a_second_reading():
    """confirm: a plan read inside the window is read again; the mean of the two decides, so a
    reading that sat high (0.405, then 0.385: mean 0.395, short) is corrected, not accepted."""
    values = iter([0.405, 0.385, 0.42, 0.404, 0.41])
    plan, history = meet_latency(lambda asked: ({"asked": asked}, asked), lambda plan: next(values), 0.4,
                                 tolerance=0.04, rounds=3, confirm=True)
    assert history[0]["readings"] == [0.405, 0.385] and history[0]["measured"] == pytest.approx(0.395)
    assert history[1]["asked"] == pytest.approx(0.4 + 0.41 - 0.395)  # corrected from the mean
    assert history[1]["readings"] == [0.42, 0.404] and history[1]["chosen"] and len(history) == 2
    assert plan["asked"] == pytest.approx(0.415) and next(values) == 0.41  # no third round, no third reading
    # outside the window a round is read once
    values = iter([0.3, 0.405, 0.405])
    _, history = meet_latency(lambda asked: ({"asked": asked}, asked), lambda plan: next(values), 0.4,
                              tolerance=0.04, rounds=3, confirm=True)
    assert "readings" not in history[0] and history[1]["readings"] == [0.405, 0.405]


def test_meet_latency_keeps_the_best_when_a_correction_is_out_of_reach():
    def solve(asked):
        if asked > 0.45:
            raise PruneLabError("not reachable")
        return {"asked": asked}, asked

    plan, history = meet_latency(solve, lambda p: p["asked"] - 0.1, 0.4, tolerance=0.02, rounds=3)
    assert plan == {"asked": 0.4} and len(history) == 1
    with pytest.raises(PruneLabError):
        meet_latency(solve, lambda p: 0.0, 0.5, tolerance=0.02)


def test_a_plans_measured_reduction_is_the_median_paired_call(monkeypatch):
    """measured_reduction repeats the paired dense/pruned call latency.plan_measurements times and
    reports the call with the median reduction (one call on a shared VM can be off by 0.1)."""
    from prune_lab.sparsity.latency import measured_reduction

    calls = iter([{"dense": 10.0, "pruned": 9.0}, {"dense": 10.0, "pruned": 5.0}, {"dense": 12.0, "pruned": 8.4},
                  {"dense": 1.0, "pruned": 1.0}])
    monkeypatch.setattr(latency_mod, "served_ms", lambda models, x, lat: next(calls))
    model, x, groups = model_and_groups()
    plan = {root: torch.ones(size, dtype=torch.bool) for root, size in zip(groups.roots, groups.sizes)}
    out = measured_reduction(model, plan, x, {"plan_measurements": 3})
    assert out["reductions"] == pytest.approx([0.1, 0.3, 0.5])
    assert out["reduction"] == pytest.approx(0.3) and (out["dense_ms"], out["pruned_ms"]) == (12.0, 8.4)
    assert next(calls) == {"dense": 1.0, "pruned": 1.0}  # exactly three calls


def test_mask_update_check_refuses_an_out_of_reach_budget_before_training(fake_timing, tmp_path, monkeypatch):
    from prune_lab.callbacks import MaskUpdate

    # the whole forward 'measures' far more than the layers: the activations' share caps the reduction
    monkeypatch.setattr(latency_mod, "served_ms", lambda models, x, lat: {k: 1e6 for k in models})
    model, x, _ = model_and_groups()
    lat = dict(batch_size=4, table_points=4, table_cache=str(tmp_path))
    with pytest.raises(PruneLabError, match=r"budget=0.99 \(latency\) is out of reach"):
        MaskUpdate(budget=0.99, target="latency", latency=lat).check(model, x)
    MaskUpdate(budget=0.2, target="latency", latency=lat).check(model, x)  # reachable: no error
    with pytest.raises(PruneLabError, match="allocation=fast is not one of: halp, flops"):
        MaskUpdate(budget=0.2, target="latency", allocation="fast", latency=lat)


def test_latency_plan_is_reused_on_resume_and_broadcast_free_on_one_process(fake_timing, tmp_path, monkeypatch):
    """The solved plan is written to the run directory; a second solve (a resumed run re-pruning in
    setup) reads it instead of measuring again, so its shapes match the checkpoint's."""
    from types import SimpleNamespace

    from prune_lab.callbacks import MaskUpdate
    from prune_lab.sparsity import MaskSet

    measured = []

    def fake_measure(model, plan, x, lat, skip=()):
        measured.append(1)
        return {"dense_ms": 1.0, "pruned_ms": 0.7, "reduction": 0.3}
    monkeypatch.setattr(latency_mod, "served_ms", lambda models, x, lat: {k: 1.0 for k in models})
    monkeypatch.setattr(latency_mod, "measured_reduction", fake_measure)
    model, x, groups = model_and_groups()
    module = SimpleNamespace(model=model, classifier=classifier_of(model)[1], example_input=x,
                             device=torch.device("cpu"), masks=MaskSet(model),
                             _trainer=SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True))
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    cb = MaskUpdate(budget=0.3, target="latency", latency_importance="criterion",
                    latency=dict(batch_size=4, table_points=4, table_cache=str(tmp_path / "t")))
    first = cb._latency_plan(module, groups, scores, 0.3)
    # landed in the window: read twice (latency.confirm, default true)
    assert len(measured) == 2 and (tmp_path / "latency_plan.json").exists()
    again = MaskUpdate(budget=0.3, target="latency", latency_importance="criterion",
                       latency=dict(batch_size=4, table_points=4, table_cache=str(tmp_path / "t")))
    second = again._latency_plan(module, groups, scores, 0.3)
    assert len(measured) == 2  # not measured again
    assert all(torch.equal(first[r], second[r]) for r in first)
    assert again.report()["latency_plan"]["measured_reduction"] == 0.3


def test_table_times_real_layers(tmp_path):
    """Real timings: positive, one grid per signature, cached; values are not asserted."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model[7]])
    table = LatencyTable(groups, x, batch_size=2, points=2, repeats=2, cache_dir=tmp_path)
    assert table.layers_dense_ms > 0 and len(list(tmp_path.rglob("*.json"))) == len(table.grids)


def test_latency_target_is_refused_for_weight_pruning_methods(tmp_path, dense_dir):
    from conftest import FAST, compose_cfg
    from prune_lab.checks import validate

    cfg = compose_cfg([*FAST, "method=magnitude", "method.target=latency", "budget=0.3"], tmp_path, dense_dir)
    with pytest.raises(PruneLabError, match="method.target=latency is not available for method magnitude; "
                                            "choose one of: l1_filter, halp, slimming, depgraph, iee_channels, stp"):
        validate(cfg)


def test_latency_run_records_table_measurement_and_exported_model(tmp_path, dense_dir):
    """A real l1_filter run with a latency budget: results.json holds the plan's rounds (asked,
    table-predicted, measured), the served and the exported model's measurement, and budget_met
    is the measured reduction (fastest rounds) against the budget within latency.tolerance."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_pipeline import run_fast

    # 0.1, not more: on this 8x8 model fixed overhead caps the reachable reduction near 0.19 when
    # the machine is loaded (a clean-clone run beside another test process measured 0.189)
    res, out = run_fast(tmp_path, dense_dir, "method=l1_filter", "method.target=latency", "budget=0.1",
                        f"latency.table_cache={tmp_path / 'tables'}", "latency.repeats=5")
    assert res["target"] == "latency" and (out / "latency_plan.json").exists()
    plan = res["latency_plan"]
    assert 1 <= len(plan["rounds"]) <= 3 and plan["rounds"][0]["asked"] == 0.1
    assert plan["predicted_reduction"] >= 0.0 and plan["table"]["signatures"] > 0
    assert plan["measured_reduction"] == next(h["measured"] for h in plan["rounds"] if h["chosen"])
    # kept counts are whole blocks of latency.channel_block (8) channels: off-block counts run nearly
    # as slow as the next block on CPU kernels
    meta = json.loads((out / "model.json").read_text())
    assert plan["round_to"] == 8 and meta["channel_plan"]
    assert all(len(kept) % 8 == 0 for kept in meta["channel_plan"].values())
    assert any(len(kept) < meta["channel_sizes"][root] for root, kept in meta["channel_plan"].items())
    lat = res["latency"]
    # budget_met reads the median of latency.plan_measurements (3) paired calls' fastest rounds
    assert len(lat["reductions"]) == 3 and lat["reductions"][0] == 1 - lat["pruned_min_ms"] / lat["dense_min_ms"]
    assert lat["reduction"] == sorted(lat["reductions"])[1]
    assert res["budget_met"] == (lat["reduction"] >= 0.1 - 0.04)  # a ceiling on latency: removing more meets it
    assert set(lat["exported"]) >= {"dense_ms", "pruned_ms", "reduction"}
    # model.pt2 and dense.pt2 are served as measured: conv weights stay channels-last through
    # export and load (latency.channels_last=true), so a plain NCHW call runs the measured kernels
    import torch

    for name in ("model.pt2", "dense.pt2"):
        program = torch.export.load(str(out / name)).module()
        convs = [p for p in program.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in convs), name
    assert lat["exported"]["weights"] == "channels_last" and lat["exported"]["input"] == "nchw"
    assert res["pruned"]["flops_reduction"] > 0  # channels were removed to meet it

    # the study helpers read such a run: re-timed alone (a key added to results.json, nothing else
    # changed), and the noise probe in fresh processes
    import shutil
    import subprocess

    job = tmp_path / "study" / "jobs" / "v-0" / "b0.2_s0"
    shutil.copytree(out, job)
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "scripts" / "remeasure_latency.py"), str(tmp_path / "study"),
                           "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = json.loads((job / "results.json").read_text())
    again = after.pop("latency_remeasured")
    assert after == json.loads((out / "results.json").read_text())
    assert again["reduction"] == pytest.approx(1 - again["pruned_ms"] / again["dense_ms"]) and again["repeats"] == 2
    probe = subprocess.run([sys.executable, str(root / "scripts" / "latency_noise.py"), str(job), "--processes", "1",
                            "--rounds", "2"], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "2 reductions" in probe.stdout, probe.stderr
    probe = subprocess.run([sys.executable, str(root / "scripts" / "latency_noise.py"), str(job), "--processes", "1",
                            "--rounds", "2", "--exported"], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0 and "2 reductions" in probe.stdout and "budget: 0.1 (latency)" in probe.stdout, \
        probe.stderr
    bad = subprocess.run([sys.executable, str(root / "scripts" / "latency_noise.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no model.json" in bad.stderr


def test_min_keep_floor_and_values_decide_the_allocation(fake_timing, tmp_path):
    """min_keep: no group under ⌈min_keep·size⌉ channels. values: while a group whose channels are
    worth nothing can still be cut, no channel of worth goes (ratio greedy on the values)."""
    _, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    plan, _ = solve_latency_target(groups, table, scores, 0.5, "halp", min_keep=0.25)
    for root, size in zip(groups.roots, groups.sizes):
        assert int(plan[root].sum()) >= math.ceil(0.25 * size)
    free = max(range(len(groups.sizes)), key=lambda g: groups.sizes[g])
    values = [torch.zeros(s) if g == free else torch.ones(s) for g, s in enumerate(groups.sizes)]
    plan, _ = solve_latency_target(groups, table, scores, 0.05, "halp", values=values, min_keep=0.25)
    assert int(plan[groups.roots[free]].sum()) < groups.sizes[free]  # the budget is met from the free group
    assert all(bool(plan[r].all()) for g, r in enumerate(groups.roots) if g != free)


def test_removable_blocks_are_the_identity_shortcut_blocks():
    from prune_lab.sparsity.latency_allocation import removable_blocks

    model, x, _ = model_and_groups()
    assert removable_blocks(model, x) == ["layer1.1", "layer2.1", "layer3.1"]
    assert removable_blocks(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), x) == []  # no ResNet stages


def test_depth_removes_a_block_worth_nothing_first(fake_timing, tmp_path):
    """With method.depth the greedy may drop a whole block; a block whose inner channels carry no
    value goes before any channel of worth, and the prediction skips its layers."""
    from prune_lab.sparsity.latency_allocation import removable_blocks

    model, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    inner = groups.roots.index("layer2.1.conv1")
    values = [torch.zeros(s) if g == inner else torch.ones(s) for g, s in enumerate(groups.sizes)]
    # the worthless group can only halve (min_keep); the rest of the budget is the block itself
    plan, predicted = solve_latency_target(groups, table, scores, 0.1, "halp", values=values, min_keep=0.5,
                                           blocks=removable_blocks(model, x))
    assert plan.removed == ["layer2.1"]
    assert predicted == pytest.approx(table.reduction(plan, ["layer2.1"])) and predicted >= 0.1
    assert all(bool(plan[r].all()) for r in groups.roots if r != "layer2.1.conv1")


def test_a_removed_block_is_masked_to_exactly_the_deployed_model(monkeypatch, tmp_path):
    """Masks of a plan that removes a block zero all its parameters; the masked model (trained on
    with those masks) computes what the exported model without the block computes."""
    from types import SimpleNamespace

    from prune_lab.callbacks import MaskUpdate
    from prune_lab.export import deployable
    from prune_lab.sparsity import MaskSet
    from prune_lab.sparsity.latency_allocation import ChannelPlan

    model, x, groups = model_and_groups()
    masks = MaskSet(model)
    keep = {r: torch.arange(s) < max(1, s // 2) for r, s in zip(groups.roots, groups.sizes)}
    monkeypatch.setattr(MaskUpdate, "_latency_plan", lambda self, m, g, s, b: ChannelPlan(keep, ["layer2.1"]))
    module = SimpleNamespace(model=model, masks=masks, example_input=x, classifier=classifier_of(model)[1],
                             device=torch.device("cpu"))
    cb = MaskUpdate(budget=0.3, target="latency", latency={})
    cb._update_channels(module, 0.3)
    masks.apply()
    assert masks.removed == ["layer2.1"]
    assert all(not bool(masks[n].any()) for n, _ in model.named_parameters() if n.startswith("layer2.1."))
    final = deployable(model, masks, x)
    assert isinstance(final.layer2[1], nn.Identity)
    xb = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(model.eval()(xb), final(xb), rtol=1e-5, atol=1e-5)


def test_lookahead_sees_past_a_latency_staircase(monkeypatch, tmp_path):
    """A conv whose time steps every 16 output channels (as on an AVX-512 CPU): removing one
    block of 8 saves nothing, two save a step. Looking 2 levels ahead the greedy keeps more value
    than looking one level ahead at most targets; where it keeps less, it removed more latency
    (a two-level move can overshoot a target: the greedy is a heuristic either way)."""
    def stair(sig, cin, cout, batch, channels_last, bias, device, repeats=7):
        return mac_cost(sig, cin, 16 * math.ceil(cout / 16), batch, channels_last, bias, device)
    monkeypatch.setattr(latency_mod, "time_layer", stair)
    _, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=8, cache_dir=tmp_path)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    g = torch.Generator().manual_seed(0)
    values = [torch.rand(s, generator=g) for s in groups.sizes]

    def kept_value(plan):
        return sum(float(values[i][plan[r]].sum()) for i, r in enumerate(groups.roots))
    gains = []
    for target in (0.2, 0.3, 0.4, 0.5):
        one, p1 = solve_latency_target(groups, table, scores, target, "halp", round_to=8, values=values)
        two, p2 = solve_latency_target(groups, table, scores, target, "halp", round_to=8, values=values, lookahead=2)
        assert p1 >= target and p2 >= target
        gains.append(kept_value(two) - kept_value(one))
        assert gains[-1] > 0 or p2 > p1, (target, gains[-1], p1, p2)
    assert sum(g > 0 for g in gains) >= 3


def test_a_latency_measured_beside_other_work_says_so(monkeypatch):
    """The machine's runnable count is read before and after the timing; more runnable work than cores
    marks the measurement contended (and says so in one warning)."""
    from prune_lab.sparsity import measure

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 1, 8, 8))
    for others, contended in ((0, False), (8, True)):
        monkeypatch.setattr(measure, "runnable_others", lambda n=others: n)
        _, applied = measure.latency_ms({"m": model}, torch.zeros(1, 1, 8, 8), batch_size=2, warmup=1, repeats=2)
        assert applied["contention"]["runnable_others"] == others
        assert applied["contention"]["contended"] is contended
    assert measure.contention([None, None])["contended"] is False  # unknown: not claimed either way


def test_grouped_conv_table_and_halp_plan_keep_the_groups(fake_timing, tmp_path):
    """A grouped conv is timed at widths its groups allow, and a HALP plan drops the same positions
    in each of its groups, so the table predicts the shrunk model exactly and the shrunk conv is valid."""
    from test_structure import MiniResNeXt

    torch.manual_seed(0)
    model = MiniResNeXt().eval()
    x = torch.randn(1, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model.head])
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    sig = table.sigs["b.0"]
    assert sig["groups"] == 4 and all(k % 4 == 0 for k in sig["ins"] + sig["outs"])
    assert "groups" not in table.sigs["a.0"]  # other layers' cache keys are unchanged
    table.calibrate_total(table.layers_dense_ms * 1.2)
    plan, predicted = solve_latency_target(groups, table, groups.scores(Magnitude(p=1).channel_scorer()), 0.4, "halp")
    assert predicted >= 0.4
    small = shrink(model, plan, x)
    assert small.b[0].groups == 4 and small.b[0].in_channels < 64
    assert table.predict_layers(plan) == pytest.approx(1e-6 * 4 * sum(layer_macs(small, x).values()), rel=1e-9)
    assert 0 < max_reduction(groups, table) < 1


def test_table_times_a_real_grouped_conv(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    groups = ChannelGroups(model, x, ignored=[model[6]])
    table = LatencyTable(groups, x, batch_size=2, points=2, repeats=2, cache_dir=tmp_path)
    assert table.layers_dense_ms > 0 and table.sigs["2"]["groups"] == 2
