"""The issue-18 latency-target benchmark (prune_lab/bench/latency_target.py): it must compare
prune_lab's latency plan with torch-pruning's uniform pruning on real shrunk models and report
its ratios as documented. Per-layer timings of the table are replaced by a deterministic cost
(proportional to MACs); whole-model timings stay real, and no timing value is asserted."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import prune_lab.bench.latency_target as lt
import prune_lab.sparsity.latency as latency_mod
from prune_lab.errors import PruneLabError
from prune_lab.models import create_model
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH_KEYS = {"table", "meet_latency", "dense", "ours", "tp", "rounds_ms", "noise", "goal_fraction", "wall_s"}
PRUNED_KEYS = {"latency_ms", "measured_speedup", "measured_reduction", "fraction_of_target", "flops",
               "flops_reduction", "params", "params_reduction"}


def macs_cost(sig, cin, cout, batch, channels_last, bias, device, repeats=7):
    """A layer's 'latency': 1 ms per 10⁶ MACs, so tables and plans are deterministic."""
    if sig["kind"] == "linear":
        return batch * cin * cout * math.prod(sig["extra"]) * 1e-6
    h, w = (math.ceil(s / st) for s, st in zip(sig["hw"], sig["stride"]))
    per_out = (1 if sig["dw"] else cin) * sig["k"][0] * sig["k"][1]
    return batch * per_out * cout * h * w * 1e-6


@pytest.fixture
def served_models(monkeypatch):
    """Deterministic table timings; records the served copies and input the final comparison times."""
    monkeypatch.setattr(latency_mod, "time_layer", macs_cost)
    seen = []
    real = lt.interleaved_latency_ms

    def spy(models, x, warmup=3, repeats=10):
        seen.append((models, x))
        return real(models, x, warmup, repeats)

    monkeypatch.setattr(lt, "interleaved_latency_ms", spy)
    return seen


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def check_report(out, target, batches):
    assert out["target_speedup"] == pytest.approx(1 / (1 - target))
    for b in batches:
        r = out[f"batch{b}"]
        assert BATCH_KEYS <= set(r)
        assert r["goal_fraction"] == {1: 0.85, 16: 0.95}.get(b)
        assert PRUNED_KEYS <= set(r["ours"]) and PRUNED_KEYS <= set(r["tp"])
        times = r["rounds_ms"]
        assert r["dense"]["latency_ms"] == statistics.median(times["dense"])
        for who in ("ours", "tp"):
            p = r[who]
            speedup = statistics.median(d / q for d, q in zip(times["dense"], times[who]))
            assert p["latency_ms"] == statistics.median(times[who])
            assert p["measured_speedup"] == pytest.approx(speedup, rel=1e-12)
            assert p["fraction_of_target"] == pytest.approx(speedup * (1 - target), rel=1e-12)
            assert p["measured_reduction"] == pytest.approx(1 - 1 / speedup, rel=1e-12)
            # a physically smaller model: fewer MACs and parameters than the dense one
            assert p["flops"] < r["dense"]["flops"] and p["params"] < r["dense"]["params"]
            assert p["flops_reduction"] == pytest.approx(1 - p["flops"] / r["dense"]["flops"])
        # the HALP greedy meets the budget it is asked for on the table; the loop starts at the target
        hist = r["meet_latency"]
        assert hist[0]["asked"] == target
        assert all(h["predicted"] >= h["asked"] - 1e-9 for h in hist)
        chosen = min(hist, key=lambda h: abs(h["measured"] - target))
        assert r["ours"]["measured_reduction_in_loop"] == chosen["measured"]
        assert r["table"]["predicted_reduction"] == pytest.approx(chosen["predicted"])
        # torch-pruning's ratio is the bisection try measured closest to our measured reduction
        tries = r["tp"]["bisection"]
        best = min(tries, key=lambda t: abs(t["measured"] - chosen["measured"]))
        assert (r["tp"]["pruning_ratio"], r["tp"]["measured_reduction_in_bisection"]) == (best["ratio"], best["measured"])
        n = r["noise"]
        assert len(n["reductions"]) == n["k"]
        assert n["mean"] == pytest.approx(statistics.fmean(n["reductions"]))
        assert n["std"] == pytest.approx(statistics.stdev(n["reductions"]))


def test_latency_target_report_on_a_small_resnet(served_models, tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10)
    dense_widths = [c.out_channels for c in convs(model)]
    target = 0.4
    out = lt.latency_target_speedup(target, batches=(1, 4), size=16, model=model, points=3, cache_dir=tmp_path,
                                    round_to=2, rounds=2, tp_steps=3, repeats=3, noise_k=3,
                                    latency={"warmup": 1, "repeats": 3})
    check_report(out, target, (1, 4))
    assert out["batch1"]["table"]["grids_measured"] > 0  # a fresh cache: the table measured its grids
    assert [c.out_channels for c in convs(model)] == dense_widths  # the dense model is left as it was
    # the comparison timed the served (BN-folded, channels-last) copies of three distinct models
    assert len(served_models) == 2
    for models, x in served_models:
        assert list(models) == ["dense", "ours", "tp"]
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in models["ours"].modules())
        widths = {k: [c.out_channels for c in convs(m)] for k, m in models.items()}
        assert widths["dense"] == dense_widths
        for who in ("ours", "tp"):
            assert sum(widths[who]) < sum(dense_widths)
            with torch.no_grad():
                assert models[who](x).shape == (len(x), 10)


@pytest.mark.slow  # ResNet-50: tracing, shrinking and torch-pruning take 10–20 s on one core
def test_latency_target_report_on_resnet50_shapes(served_models):
    torch.manual_seed(0)
    target = 0.5
    out = lt.latency_target_speedup(target, batches=(1, 2), size=32, points=2, rounds=1, tp_steps=2, repeats=2,
                                    noise_k=2, latency={"warmup": 1, "repeats": 2})
    check_report(out, target, (1, 2))
    assert out["model"] == "ResNet" and out["batch1"]["table"]["grids_measured"] is None  # not cached
    dense_width = sum(c.out_channels for c in convs(torchvision.models.resnet50()))
    for models, x in served_models:
        for who in ("ours", "tp"):
            assert sum(c.out_channels for c in convs(models[who])) < dense_width
            with torch.no_grad():
                assert models[who](x).shape == (len(x), 1000)


def test_tp_at_measured_reduction_bisects_the_ratio_towards_the_goal(monkeypatch):
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    # a stand-in for timing: the pruned model's time is its MAC count, so the bisection is deterministic
    from prune_lab.sparsity import count_flops

    monkeypatch.setattr(lt, "served_ms", lambda models, x_, latency: {k: float(count_flops(m, x_))
                                                                     for k, m in models.items()})
    pruned, reduction, ratio, tries = lt.tp_at_measured_reduction(model, x, {}, goal=0.5, steps=6)
    assert [t["ratio"] for t in tries[:3]] == pytest.approx([0.45, 0.225, 0.3375])  # halving [0, 0.9]
    assert reduction == pytest.approx(1 - count_flops(pruned, x) / count_flops(model, x))
    assert abs(reduction - 0.5) == min(abs(t["measured"] - 0.5) for t in tries) and abs(reduction - 0.5) < 0.05
    assert pruned.fc.out_features == 10 and sum(c.out_channels for c in convs(pruned)) < sum(
        c.out_channels for c in convs(model))
    assert pruned(x).shape == (1, 10)


@pytest.mark.parametrize("target", [0.0, 1.0, 1.5])
def test_latency_target_outside_0_1_is_one_clear_error(target):
    with pytest.raises(PruneLabError, match=r"latency target=.*in \(0, 1\)"):
        lt.latency_target_speedup(target, model=nn.Linear(2, 2))


@pytest.mark.slow  # real per-layer timings of ResNet-50 at 32², both batch sizes: about a minute
def test_bench_only_latency_writes_the_latency_section(tmp_path):
    out = tmp_path / "bench_latency.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--only", "latency", "--latency-target", "0.4",
                           "--size", "32", "--quick", "--table-cache", str(tmp_path / "tables"), "--noise-k", "2",
                           "--latency-rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) == {"env", "latency_target", "wall_s"}  # --only: nothing else was run
    lt_ = res["latency_target"]
    assert (lt_["target"], lt_["input"], lt_["round_to"]) == (0.4, 32, 8)
    assert lt_["latency"] == {**lt.SERVED}
    assert {"batch1", "batch16"} <= set(lt_)
    for b in (1, 16):
        r = lt_[f"batch{b}"]
        assert BATCH_KEYS <= set(r) and len(r["meet_latency"]) == 1 and r["noise"]["k"] == 2
        assert r["table"]["grids_measured"] > 0 and r["table"]["batch_size"] == b
    assert "prune_lab" in proc.stdout and "torch-pruning" in proc.stdout


def test_bench_rejects_a_latency_target_outside_0_1(monkeypatch, capsys):
    import runpy

    bench = runpy.run_path(str(ROOT / "scripts" / "bench.py"))  # its functions, without running main
    monkeypatch.setattr(sys, "argv", ["bench.py", "--only", "latency", "--latency-target", "1.2"])
    with pytest.raises(SystemExit) as exit_:
        bench["main"]()
    assert exit_.value.code == 2 and "--latency-target 1.2: expected a fraction" in capsys.readouterr().err
