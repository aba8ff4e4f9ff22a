"""Fault injection: train.py is SIGKILLed at seeded random moments and started again with the same
command until it finishes; the results and masks must equal those of an uninterrupted run.

One test per method family, on the quick start shrunk to 8 px digits and a few epochs. Kill
moments are drawn uniformly over the uninterrupted run's working time (from its first line of output,
i.e. after the imports), so they land in the dense reference's
training, the method's training, a search, BN re-estimation or export. Where the dense reference
is shared with the uninterrupted run (a copy of its cache), the kills land in the method's phases.

Wall time per family (`pytest -m slow tests/test_crash.py --durations=0`, this 2-core box shared
with other jobs, load average 7-11): magnitude 418 s, gmp 268 s, rigl 525 s, iee 243 s,
unipts 297 s, stp 172 s, overparam 162 s; most of it is train.py's start-up (about 20 s a process
under that load), five to eight processes per test. The fast tests at the end take about 25 s together.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

BASE = ["experiment=quickstart", "data.image_size=8", "dense.epochs=3", "latency.repeats=2", "latency.warmup=1",
        "callbacks.progress_bar.leave=false"]
METRICS = [("pruned", "top1"), ("pruned", "top5"), ("pruned", "sparsity"), ("pruned", "flops"),
           ("pruned", "nonzero_params"), ("pruned", "params"), ("dense", "top1"), ("train", "steps"),
           ("train", "epochs")]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("PRUNE_LAB_SWEEP_ID", None)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait_for_output(log: Path, size: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Seconds until the process wrote its first line past `size` bytes of `log`: the pipeline
    has started (imports, which take most of a short run's time on a loaded machine, are done)."""
    t0 = time.monotonic()
    while (not log.exists() or log.stat().st_size <= size) and proc.poll() is None:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(log)
        time.sleep(0.05)
    return time.monotonic() - t0


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "[prune_lab]" in ln or "lightning" in ln]
    return lines[-1][:160] if lines else "(before any log line)"


def uninterrupted(args: list[str], run: Path, dense: Path) -> tuple[dict, float]:
    """The reference run; returns its results and working time (after the imports)."""
    log = run.with_suffix(".log")
    t0 = time.monotonic()
    proc = _start([*args, f"hydra.run.dir={run}", f"paths.dense_dir={dense}"], log)
    startup = _wait_for_output(log, 0, proc)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return json.loads((run / "results.json").read_text()), time.monotonic() - t0 - startup


def killed_and_resumed(args: list[str], run: Path, dense: Path, work_s: float, kills: int, seed: int) -> list[str]:
    """Kill the run `kills` times, then let it finish; returns where each kill landed (the last
    log line before it). The moments are `kills` seeded uniform points on the uninterrupted run's
    working time, sorted; each attempt runs for the gap to the next (at least 1 s), so the kills
    spread over the run as it progresses from checkpoint to checkpoint."""
    rng, log, landed = random.Random(seed), run.with_suffix(".log"), []
    moments = sorted(rng.uniform(0.0, 0.9 * work_s) for _ in range(kills))
    cmd = [*args, f"hydra.run.dir={run}", f"paths.dense_dir={dense}"]
    for delay in (max(b - a, 1.0) for a, b in zip([0.0, *moments], moments)):
        if (run / "results.json").is_file():
            break
        size = log.stat().st_size if log.exists() else 0
        proc = _start(cmd, log)
        _wait_for_output(log, size, proc)
        try:
            rc = proc.wait(timeout=delay)
            assert rc == 0, log.read_text()[-3000:]
            break  # finished before the kill: what is left is shorter than the moment drawn
        except subprocess.TimeoutExpired:
            saved = (run / "checkpoints" / "last.ckpt").is_file() or any(dense.glob(".*.partial/last.ckpt"))
            finished = (run / "results.json").is_file()  # killed while exiting: nothing left to resume
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            state = " (finished)" if finished else " (checkpoint on disk)" if saved else ""
            landed.append(f"{delay:.1f}s{state}: {_last_line(log)}")
    if not (run / "results.json").is_file():
        proc = _start(cmd, log)
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    return landed


def masks_of(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("masks.")}


def assert_same_run(ref: Path, other: Path) -> None:
    a, b = (json.loads((r / "results.json").read_text()) for r in (ref, other))
    assert a.keys() == b.keys()  # a resumed run reports what its method did before the kill (e.g. its search)
    if "search" in a:
        untimed = [{k: v for k, v in r["search"].items() if not k.endswith("wall_s")} for r in (a, b)]
        assert untimed[0] == untimed[1]
    for group, key in METRICS:
        assert a[group][key] == b[group][key], f"{group}.{key}: {a[group][key]} != {b[group][key]}"
    wa, wb = load_file(str(ref / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = masks_of(ref), masks_of(other)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert json.loads((ref / "model.json").read_text()) == json.loads((other / "model.json").read_text())


# (family, overrides, whether the kills may also land in the dense reference's training)
FAMILIES = {
    "magnitude": (["method=magnitude", "budget=0.8", "epochs=3"], True),
    "gmp": (["method=gmp", "budget=0.8", "epochs=3", "method.every=3"], False),
    "rigl": (["method=rigl", "budget=0.9", "epochs=3", "method.every=5"], False),
    "iee": (["method=iee", "budget=0.9", "epochs=3", "method.estimate_steps=3", "method.improve_steps=3",
             "method.explore_steps=3"], False),
    "unipts": (["method=unipts", "method.search_cache=null", "budget=0.8", "epochs=2", "method.population=6",
                "method.generations=4", "method.parents=3"], False),
    "stp": (["method=stp", "budget=0.5", "epochs=3", *(f"method.callbacks.stp.{k}" for k in (
        "pool_size=200", "search_population=12", "search_generations=4", "search_parents=4", "bn_images=256"))],
        False),
    "overparam": (["method=overparam", "budget=0.5", "epochs=3", "method.ratio=2"], False),
}
CI: set[str] = set()  # too slow for CI (several train.py starts each); make test-slow runs them all


def _crash_test(family: str, tmp_path: Path, kills: int = 3, seed: int = 0) -> None:
    overrides, own_dense = FAMILIES[family]
    args = [*BASE, *overrides, "checkpoint.every_n_steps=10"]
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    _, work_s = uninterrupted(args, ref, tmp_path / "dense_ref")
    dense = tmp_path / "dense_crash"
    if not own_dense:  # the kills land in the method's own work: the dense reference is cached
        shutil.copytree(tmp_path / "dense_ref", dense)
        [meta] = dense.glob("*/dense.json")
        work_s -= json.loads(meta.read_text())["train_wall_s"]
    # on a loaded machine a run may go faster than its reference: draw again on a shorter time
    # scale until a kill lands before the run finished
    for attempt in range(3):
        shutil.rmtree(crash, ignore_errors=True)
        crash.with_suffix(".log").unlink(missing_ok=True)
        if own_dense:
            shutil.rmtree(dense, ignore_errors=True)
        landed = killed_and_resumed(args, crash, dense, work_s / 2 ** attempt, kills, seed + attempt)
        if any("(finished)" not in ln for ln in landed):
            break
    print(f"\n{family}: uninterrupted {work_s:.1f}s of work; killed at " + " | ".join(landed))
    assert any("(finished)" not in ln for ln in landed), "no kill landed before the run finished"
    assert_same_run(ref, crash)
    if any("checkpoint on disk" in ln for ln in landed):  # it resumed, not started over
        assert "resuming" in crash.with_suffix(".log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.ci] if f in CI else []) for f in FAMILIES])
def test_killed_run_resumes_to_the_uninterrupted_result(family, tmp_path):
    _crash_test(family, tmp_path)


# -- fast: the pieces the fault-injection tests rely on -------------------------------------------
import lightning as L  # noqa: E402
from functools import partial  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from conftest import FAST, compose_cfg  # noqa: E402
from prune_lab import pipeline  # noqa: E402
from prune_lab.callbacks import ResumableCheckpoint  # noqa: E402
from prune_lab.callbacks.checkpoint import remove_stale_temporaries, save_checkpoint_atomic  # noqa: E402
from prune_lab.cli import unfinished_run_dir  # noqa: E402
from prune_lab.data import DigitsDataModule  # noqa: E402
from prune_lab.errors import PruneLabError  # noqa: E402
from prune_lab.models import create_model  # noqa: E402
from prune_lab.module import PruneLabModule  # noqa: E402


class CheckpointProbe(L.Callback):
    """Before every optimizer step: the global step recorded in last.ckpt (None: no file yet)."""

    def __init__(self, path: Path):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        saved = torch.load(self.path, weights_only=True)["global_step"] if self.path.is_file() else None
        self.seen.append((trainer.global_step, saved))


def test_last_ckpt_is_written_every_epoch_and_every_n_steps_keeping_only_the_latest(tmp_path):
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=8, batch_size=128)
    module = PruneLabModule(create_model("resnet8", num_classes=10, in_channels=1), 10, dm.example_input(1),
                            partial(torch.optim.SGD, lr=0.05))
    probe = CheckpointProbe(tmp_path / "last.ckpt")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        limit_val_batches=1, callbacks=[ResumableCheckpoint(tmp_path, every_n_steps=4), probe])
    trainer.fit(module, datamodule=dm)
    per_epoch = 9  # 1078 training digits, batch 128
    for step, saved in probe.seen:
        # the newest of: a multiple of 4 steps, the end of epoch 1 (step 9); nothing before step 4
        expected = max([s for s in range(4, step + 1, 4)] + ([per_epoch] if step >= per_epoch else []), default=None)
        assert saved == expected, (step, saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2 * per_epoch  # training's end


def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path):
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"previous")

    def dies_half_way(path, weights_only=False):
        Path(path).write_bytes(b"half a chec")
        raise SystemExit("killed")

    trainer = SimpleNamespace(save_checkpoint=dies_half_way, is_global_zero=True,
                              strategy=SimpleNamespace(barrier=lambda *a: None))
    with pytest.raises(SystemExit):
        save_checkpoint_atomic(trainer, last)
    assert last.read_bytes() == b"previous"
    [half] = [p for p in tmp_path.iterdir() if p != last]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = half.rename(tmp_path / f".last.ckpt.tmp{dead.stdout.strip()}")
    live = tmp_path / f".last.ckpt.tmp{os.getpid()}"
    live.write_bytes(b"being written")
    remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists() and last.exists()


def test_training_loader_resumes_mid_epoch_with_the_same_batches_and_rng(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=64)
    dm.setup("fit")
    full = dm.train_dataloader()
    full.sampler.set_epoch(2)
    epoch = [y for _, y in full]
    first = dm.train_dataloader()
    first.sampler.set_epoch(2)
    it = iter(first)
    head = [next(it)[1] for _ in range(5)]
    state = first.state_dict()
    assert state == {"epoch": 2, "served": 5}
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    it = iter(resumed)  # as Lightning does: the iterator exists before the epoch is set
    resumed.sampler.set_epoch(2)
    rng = torch.get_rng_state()
    tail = [y for _, y in it]
    assert torch.equal(rng, torch.get_rng_state())  # the uninterrupted run drew its base seed at epoch start
    assert len(tail) == len(epoch) - 5 and all(torch.equal(a, b) for a, b in zip(head + tail, epoch))
    assert resumed.state_dict() == {"epoch": 2, "served": len(epoch)}
    again = dm.train_dataloader()
    again.load_state_dict(resumed.state_dict())  # an epoch-end state: the next epoch is a whole one
    again.sampler.set_epoch(3)
    assert len(list(again)) == len(epoch)


@pytest.mark.slow
@pytest.mark.ci  # the fault-injection representative CI runs (the per-family ones: make test-slow)
def test_killed_dense_reference_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    # 1078 training digits in batches of 128: 9 steps per epoch; killed at step 13, mid-epoch 2
    overrides = [*FAST, "dense.epochs=2", "data.batch_size=128", "checkpoint.every_n_steps=4", "method=magnitude"]
    ref_cfg = compose_cfg(overrides, tmp_path / "a", tmp_path / "dense_a")
    crash_cfg = compose_cfg(overrides, tmp_path / "b", tmp_path / "dense_b")

    def dense(cfg):
        L.seed_everything(cfg.seed, verbose=False)
        dm = pipeline.build(cfg.data)
        model = pipeline.build(cfg.model, num_classes=dm.num_classes, in_channels=dm.channels, weights=None)
        return pipeline.dense_reference(cfg, dm, model, dm.example_input(1))

    reference = dense(ref_cfg)
    step = PruneLabModule.training_step

    def killed_at_step_13(self, batch, batch_idx):
        if self.trainer.global_step == 13:
            raise KeyboardInterrupt  # what Lightning sees of a kill: training stops, no clean-up
        return step(self, batch, batch_idx)

    monkeypatch.setattr(PruneLabModule, "training_step", killed_at_step_13)
    with pytest.raises(BaseException):
        dense(crash_cfg)
    [partial_dir] = (tmp_path / "dense_b").glob(".*.partial")
    assert torch.load(partial_dir / "last.ckpt", weights_only=True)["global_step"] == 12  # every 4 steps
    monkeypatch.setattr(PruneLabModule, "training_step", step)
    resumed = dense(crash_cfg)
    assert resumed["top1"] == reference["top1"]
    assert all(torch.equal(reference["state_dict"][k], resumed["state_dict"][k]) for k in reference["state_dict"])
    assert not partial_dir.exists()  # the cache is complete: its checkpoint is gone


@pytest.mark.slow  # trimmed from the default suite (make test-slow runs it)
def test_resumed_post_training_run_keeps_its_pruned_weights(tmp_path, dense_dir):
    cfg = compose_cfg([*FAST, "method=oneshot_bnrecal", "budget=0.8"], tmp_path / "run", dense_dir)
    first = pipeline.run(cfg)
    (tmp_path / "run" / "results.json").unlink()
    again = pipeline.run_job(compose_cfg([*FAST, "method=oneshot_bnrecal", "budget=0.8"], tmp_path / "run", dense_dir))
    for key in ("top1", "sparsity", "nonzero_params"):
        assert again["pruned"][key] == first["pruned"][key]
    assert abs(again["pruned"]["sparsity"] - 0.8) <= 0.005  # the checkpoint's masks, not the dense model


def test_the_same_command_finds_its_unfinished_run(tmp_path):
    def run_dir(name, overrides, checkpoint=True, finished=False):
        run = tmp_path / "2026-12-02" / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if checkpoint:
            (run / "checkpoints").mkdir()
            (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        if finished:
            (run / "results.json").write_text("{}")
        return run

    cmd = ["experiment=quickstart", "method=gmp", "budget=0.8"]
    run_dir("10-00-00_gmp_0.8", cmd, finished=True)
    run_dir("10-05-00_gmp_0.8", ["budget=0.8", "experiment=quickstart", "method=gmp", "seed=1"])
    run_dir("10-06-00_gmp_0.8", cmd, checkpoint=False)  # killed before its first checkpoint
    wanted = run_dir("10-07-00_gmp_0.8", list(reversed(cmd)))
    assert unfinished_run_dir(cmd, tmp_path) == wanted
    assert unfinished_run_dir([*cmd, "seed=2"], tmp_path) is None
    assert unfinished_run_dir(["-m", *cmd], tmp_path) is None
    assert unfinished_run_dir([*cmd, "hydra.run.dir=elsewhere"], tmp_path) is None


BAD_BEFORE_TRAINING = [
    (["seed=-1"], ["seed=-1", "non-negative integer"]),
    (["seed=abc"], ["seed=abc", "non-negative integer"]),
    (["data.image_size=16", "model=timm", "model.name=convnext_atto"],
     ["convnext_atto", "1x16x16", "data.image_size"]),
    (["method=gmp", "method.start=0.8", "method.end=0.5"], ["start=0.8", "end=0.5", "0 <= start < end <= 1"]),
    (["method=gmp", "epochs=1", "method.start=0.45", "method.end=0.48"], ["start=0.45", "17 optimizer steps", "empty"]),
    (["method=rigl", "epochs=2"], ["every 100", "stop=0.75", "step 25", "method.every below 25"]),
    (["method=set", "method.every=30", "method.stop=0.5", "epochs=3"], ["every 30", "stop=0.5", "step 25"]),
    (["epochs=-3"], ["epochs=-3", "non-negative integer"]),
    (["dense.epochs=2.5"], ["dense.epochs=2.5", "non-negative integer"]),
]


def test_asking_for_a_gpu_without_one_is_one_line_and_wins_over_the_recipe(tmp_path):
    """`trainer=gpu` after a recipe that trains on the CPU: the user's choice wins (it is not silently
    replaced by the recipe's CPU trainer), and without a GPU it is refused in one line naming trainer=cpu."""
    import torch

    cfg = compose_cfg([*FAST, "method=magnitude", "trainer=gpu"], tmp_path / "run", tmp_path / "dense")
    assert cfg.trainer.accelerator == "gpu"
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is for machines without one")
    with pytest.raises(PruneLabError, match=r"^trainer.accelerator=gpu, but no GPU is available here .*use trainer=cpu$"):
        pipeline.run(cfg)
    assert not (tmp_path / "dense").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,words", BAD_BEFORE_TRAINING, ids=[" ".join(b[0]) for b in BAD_BEFORE_TRAINING])
def test_bad_input_is_refused_before_anything_is_written(overrides, words, tmp_path):
    if "model=timm" in overrides:
        pytest.importorskip("timm")
    cfg = compose_cfg([*FAST, "method=magnitude", *overrides], tmp_path / "run", tmp_path / "dense")
    with pytest.raises(PruneLabError) as err:
        pipeline.run(cfg)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    assert not (tmp_path / "dense").exists() and not (tmp_path / "run").exists()
