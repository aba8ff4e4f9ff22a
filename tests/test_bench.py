"""The benchmark pieces (prune_lab/bench, scripts/bench.py): they must time real work, compare
like with like, and write the contract keys. Timings themselves are never asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prune_lab.bench.deployment import realized_speedup
from prune_lab.bench.training import StepDriver, update_cost
from prune_lab.models import create_model
from prune_lab.sparsity import DropGrow
from prune_lab.sparsity.schedules import CosineDecay
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_update_cost_times_updates_that_change_the_masks():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = update_cost(x, y, sync=lambda: None)
    # GMP: step 0 of the cubic ramp prunes nothing, every later step prunes more
    assert out["gmp"]["changed_steps"] == [1, 2, 3, 4, 5]
    assert out["rigl"]["changed_steps"] == [2, 4, 6]
    # IEE with 3-step phases: prune, start exploring and grow each change the masks
    assert out["iee"]["changed_steps"] == list(range(3, 28, 3))
    assert set(out["iee"]["hook_ms_by_kind"]) == {"estimate", "prune", "improve", "start_explore", "explore", "grow"}
    # the exploration steps restore the frozen weights: more per-step work than a plain estimate step
    kinds = out["iee"]["hook_ms_by_kind"]
    assert kinds["explore"] > kinds["estimate"]
    assert out["worst"] == max(("gmp", "rigl", "iee"), key=lambda k: out[k]["fraction"])
    assert all(0 < out[k]["fraction"] < 1 for k in ("gmp", "rigl", "iee"))


def test_step_driver_keeps_exact_sparsity_through_rigl_updates():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    driver = StepDriver(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), lambda: None)
    before = {n: int(driver.masks[n].sum()) for n in driver.masks.prunable}
    driver.run(6, total=8, policy=DropGrow(grow="gradient", schedule=CosineDecay(init=0.3, every=2, end=1.0)))
    assert driver.changed_steps  # the masks moved ...
    assert {n: int(driver.masks[n].sum()) for n in driver.masks.prunable} == before  # ... at constant counts
    params = dict(model.named_parameters())
    for n in driver.masks.active:
        assert int(params[n].count_nonzero()) <= before[n]


@pytest.mark.slow  # trimmed from the default suite (make test-slow runs it)
def test_realized_speedup_compares_equal_flops_and_reports_consistent_ratios():
    torch.manual_seed(0)
    out = realized_speedup(0.85, batches=(2,), size=64, repeats=1, round_to=32, device="cpu")
    assert {"nchw", "channels_last", "served", "frozen", "compiled"} <= set(out)
    for layout in ("nchw", "channels_last", "served", "frozen", "compiled"):
        r = out[layout]["batch2"]
        for who in ("ours", "tp"):
            assert abs(r[who]["flops_reduction"] - 0.85) <= 0.02
            assert r[who]["fraction_of_ideal"] == pytest.approx(r[who]["measured_speedup"] / r[who]["ideal_speedup"])
    # the per-layer profile sees every conv and linear layer: its MACs add up to the FLOPs ratio
    layers = out["layers"]
    macs = {k: sum(v["macs"] for v in layers[k].values()) for k in ("dense", "ours")}
    assert macs["dense"] / macs["ours"] == pytest.approx(out["served"]["batch2"]["ours"]["ideal_speedup"], rel=1e-9)
    assert layers["ours"]["maxpool"]["macs"] == 0 and layers["ours"]["conv1"]["gmacs_per_s"] > 0


@pytest.mark.slow
def test_bench_quick_writes_the_contract_keys(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("train_overhead_ratio", "update_cost_fraction", "speedup_fraction_of_ideal",
                "torch_pruning_speedup_fraction_of_ideal", "peak_memory_ratio"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["speedup_fraction_of_ideal"] == res["speedup"]["compiled"]["batch16"]["ours"]["fraction_of_ideal"]
    assert res["update_cost_fraction"] == res["update_cost"][res["update_cost"]["worst"]]["fraction"]
    assert res["wall_s"] < 300
    assert "ResNet-50" in proc.stdout
    u = res["unipts_search"]  # the search's scoring paths agree, and the GEMM ceiling is reported
    assert u["fitness_identical"] is True and u["macs_per_fitness_eval"] > 0
    assert u["max_exact_speedup_at_gemm_rate"] == pytest.approx(u["gemm_gmacs_per_s"] / u["gmacs_per_s"])


def test_nm_section_says_plainly_that_cpu_has_no_2_4_kernel(tmp_path):
    """`--only nm` on CPU times nothing and records why (the GPU path runs only when a GPU is lent)."""
    out = tmp_path / "nm.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--only", "nm", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    nm = json.loads(out.read_text())["semi_structured_2_4"]
    assert nm["supported"] is False and "CUDA" in nm["reason"] and "no speed-up" in nm["reason"]
    assert "not timed" in proc.stdout
