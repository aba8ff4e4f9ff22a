"""Sweeps: stable directories, resume by skipping finished jobs, summaries, W&B offline, DDP, submitit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from prune_lab import pipeline
from prune_lab.cli import sweep_id
from prune_lab.sweep import summarize

QUICK = ["experiment=quickstart", "data.image_size=8", "epochs=2", "dense.epochs=3", "latency.repeats=2"]


def train(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """train.py as a user runs it, from `cwd` (so outputs/ lands there), one thread per process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("PRUNE_LAB_SWEEP_ID", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_sweep_id_names_the_command_not_the_clock():
    a = sweep_id(["-m", "experiment=quickstart", "method=magnitude,random", "budget=0.5,0.9"])
    assert a == sweep_id(["experiment=quickstart", "budget=0.9,0.5", "method=random,magnitude", "--multirun"])
    assert a == sweep_id(["-m", "experiment=quickstart", "method=magnitude,random", "budget=0.5,0.9",
                          "hydra/launcher=parallel", "hydra.launcher.n_jobs=4", "logger=wandb"])
    assert a != sweep_id(["-m", "experiment=quickstart", "method=magnitude,random", "budget=0.5,0.8"])
    assert a.startswith("quickstart-")


@pytest.mark.slow  # trimmed from the default suite (make test-slow runs it)
def test_rerunning_a_sweep_completes_only_missing_jobs(tmp_path):
    cmd = ["-m", *QUICK, "method=magnitude,random", "budget=0.5,0.8"]
    first = train(cmd, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    [sweep] = list((tmp_path / "outputs/sweeps").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and all((j / "results.json").is_file() for j in jobs)
    stamps = {j.name: ((j / "results.json").stat().st_mtime_ns, (j / "model.safetensors").read_bytes()) for j in jobs}
    # one job lost its results (killed before the end), another never got past its start
    (jobs[1] / "results.json").unlink()
    for f in jobs[2].iterdir():
        if f.name != ".hydra":
            subprocess.run(["rm", "-rf", str(f)], check=True)
    second = train(cmd, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs/sweeps").iterdir()] == [sweep.name]  # same directory
    log = second.stdout + second.stderr
    assert log.count("skipping") == 2 and "resuming the unfinished job" in log
    for j in jobs:
        assert (j / "results.json").is_file()
    for j in (jobs[0], jobs[3]):  # untouched
        assert (j / "results.json").stat().st_mtime_ns == stamps[j.name][0]
    # the resumed and the re-run jobs end where the first sweep ended (deterministic on CPU)
    for j in (jobs[1], jobs[2]):
        assert (j / "model.safetensors").read_bytes() == stamps[j.name][1]


def _fake_result(method, budget, seed, top1, flops_red):
    return {"schema": 1, "method": method, "budget": budget, "target": "params", "model": "resnet8", "data": "digits",
            "seed": seed, "dense": {"top1": 0.99, "top5": 1.0, "params": 100, "flops": 1000},
            "pruned": {"top1": top1, "top5": 1.0, "params": 100, "nonzero_params": 50, "flops": 1000,
                       "sparse_flops": 500, "sparsity": budget, "params_reduction": budget - 0.01,
                       "flops_reduction": flops_red, "compression_ratio": 2.0, "theoretical_speedup": 2.0},
            "latency": {"device": "cpu", "batch_size": 16, "dense_ms": 1.0, "pruned_ms": 1.0, "speedup": 1.0}}


def test_summarize_means_stds_and_unfinished_jobs(tmp_path):
    tops = {0: 0.90, 1: 0.92, 2: 0.97}
    for seed, top1 in tops.items():
        for method, shift in (("magnitude", 0.0), ("random", -0.1)):
            job = tmp_path / f"{method}_s{seed}"
            job.mkdir()
            (job / "results.json").write_text(json.dumps(_fake_result(method, 0.8, seed, top1 + shift, 0.8)))
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "failed.json").write_text(json.dumps({"error": "RuntimeError: boom"}))
    (tmp_path / "running").mkdir()
    rows, missing, text = summarize(tmp_path)
    by_method = {r["method"]: r for r in rows}
    assert by_method["magnitude"]["seeds"] == 3
    assert by_method["magnitude"]["top1"] == pytest.approx(0.93)
    assert by_method["magnitude"]["top1_std"] == pytest.approx(0.036055512754639, rel=1e-9)  # sample std
    assert by_method["random"]["top1"] == pytest.approx(0.83)
    assert dict(missing) == {"crashed": "failed: RuntimeError: boom", "running": "unfinished"}
    assert "93.00 ± 3.61" in text and "`crashed`: failed" in text
    csv_lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "top1_std" in csv_lines[0]
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "summary.md").read_text() == text


def test_summarize_cli_on_missing_dir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/summarize.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr


def test_a_failing_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN)))
    monkeypatch.setattr(pipeline, "run", lambda cfg: (_ for _ in ()).throw(RuntimeError("diverged")))
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "ckpt_path": None})
    assert pipeline.run_job(cfg) is None
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["error"] == "RuntimeError: diverged" and "Traceback" in failed["traceback"]
    # a finished job is never run again
    (tmp_path / "results.json").write_text(json.dumps({"done": True}))
    assert pipeline.run_job(cfg) == {"done": True}


@pytest.mark.slow  # trimmed from the default suite (make test-slow runs it)
def test_wandb_offline_run_holds_the_summary(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "WANDB_API_KEY": ""}
    proc = train([*QUICK, "logger=csv_wandb", "method=magnitude", "budget=0.8", f"hydra.run.dir={tmp_path / 'run'}"],
                 tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run/results.json").read_text())
    [offline] = list((tmp_path / "run/wandb").glob("offline-run-*"))
    copied = json.loads((offline / "files/results.json").read_text())
    assert copied["pruned"]["top1"] == results["pruned"]["top1"]
    binary = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"pruned/top1" in binary and b"method=magnitude" in binary  # summary and tags in the run log
    assert list((offline / "files/media/images/layers").glob("*.png"))


@pytest.mark.slow
def test_two_process_ddp_masks_identical(tmp_path):
    proc = train([*QUICK, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "method=gmp", "budget=0.8",
                  "method.every=3", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run/results.json").read_text())
    assert r["train"]["world_size"] == 2
    digests = r["train"]["mask_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert abs(r["pruned"]["sparsity"] - 0.8) <= 0.005
    # data.batch_size=64 is the global batch (32 per rank): as many steps as on one device,
    # ceil(1077 training digits / 64) per epoch
    assert r["train"]["steps"] == 2 * 17


@pytest.mark.slow
def test_two_process_ddp_progressive_latency_plan_is_rank_0s(tmp_path):
    """A progressive latency plan under DDP: rank 0 solves every step (the last one measured) and
    broadcasts it, so both ranks hold the same masks and the record lists the earlier steps."""
    proc = train([*QUICK, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "method=l1_filter",
                  "method.target=latency", "budget=0.1", "method.prune_steps=3", "method.prune_every=4",
                  f"latency.table_cache={tmp_path / 'tables'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "run/results.json").read_text())
    digests = r["train"]["mask_digest_per_rank"]
    assert r["train"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    plan = r["latency_plan"]
    assert plan["steps"] == 3 and len(plan["earlier_steps"]) == 2 and plan["monotone"] is True


@pytest.mark.slow
def test_submitit_local_runs_a_job_end_to_end(tmp_path):
    proc = train(["-m", "hydra/launcher=local", *QUICK, "method=magnitude", "budget=0.5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [job] = [p for p in next((tmp_path / "outputs/sweeps").iterdir()).iterdir() if p.is_dir() and p.name[0] != "."]
    r = json.loads((job / "results.json").read_text())
    assert r["method"] == "magnitude" and abs(r["pruned"]["sparsity"] - 0.5) <= 0.005
