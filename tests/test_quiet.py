"""The quiet lock: a latency measurement in one process pauses the batches of the others that
share the lock file, and waits for their current batches to end (prune_lab/quiet.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from prune_lab import quiet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lock(tmp_path):
    path = tmp_path / "quiet.lock"
    quiet.configure(path)
    yield path
    quiet.configure(None)


def _child(code: str, lock: Path, out: Path) -> subprocess.Popen:
    """A process that shares the lock file and writes time stamps to `out`."""
    src = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from prune_lab import quiet
        quiet.configure({str(lock)!r})
        out = open({str(out)!r}, "a", buffering=1)
    """) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", src])


def _wait_for(path: Path, text: str, timeout: float = 30.0) -> None:
    t0 = time.time()
    while text not in (path.read_text() if path.exists() else ""):
        assert time.time() - t0 < timeout, f"no {text!r} in {path}"
        time.sleep(0.01)


def _stamp(path: Path, key: str) -> float:
    return float(next(line.split()[1] for line in path.read_text().splitlines() if line.startswith(key)))


def test_a_batch_does_not_start_while_another_process_measures(lock, tmp_path):
    out = tmp_path / "child.txt"
    child = _child("""
        with quiet.measuring():
            out.write("in 0\\n")
            time.sleep(0.8)
            out.write(f"end {time.time()}\\n")
    """, lock, out)
    _wait_for(out, "in")
    quiet.begin_work()
    started = time.time()
    quiet.end_work()
    child.wait(timeout=30)
    assert started >= _stamp(out, "end")


def test_a_measurement_waits_for_another_process_s_batch(lock, tmp_path):
    out = tmp_path / "child.txt"
    quiet.begin_work()
    child = _child("""
        out.write("ready 0\\n")
        with quiet.measuring():
            out.write(f"measuring {time.time()}\\n")
    """, lock, out)
    _wait_for(out, "ready")
    time.sleep(0.8)
    ended = time.time()
    quiet.end_work()
    child.wait(timeout=30)
    assert _stamp(out, "measuring") >= ended


def test_a_waiting_measurement_is_not_starved_by_overlapping_batches(lock, tmp_path):
    """Two processes run back-to-back batches whose holds overlap, so the lock is never free;
    the gate stops new batches once a measurement waits (flock alone would starve it)."""
    outs = [tmp_path / f"worker{i}.txt" for i in range(2)]
    stop = tmp_path / "stop"
    workers = [_child(f"""
        import os
        time.sleep({0.025 * i})
        out.write("running 0\\n")
        end = time.time() + 20
        while time.time() < end and not os.path.exists({str(stop)!r}):
            with quiet.working():
                time.sleep(0.05)
    """, lock, out) for i, out in enumerate(outs)]
    try:
        for out in outs:
            _wait_for(out, "running")
        time.sleep(0.2)
        t0 = time.time()
        with quiet.measuring():
            waited = time.time() - t0
    finally:
        stop.touch()
        for w in workers:
            w.wait(timeout=30)
    assert waited < 1.0


def test_measuring_inside_the_process_s_own_batch_does_not_deadlock(lock):
    done = []

    def body():
        with quiet.working():
            with quiet.measuring():
                with quiet.measuring():  # nested measurements: one exclusive hold
                    pass
            done.append(quiet._s.working)  # the batch holds the lock again after the measurement

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout=20)
    assert done == [True]
    assert not quiet._s.working


def test_off_without_a_path():
    quiet.configure(None)
    with quiet.measuring(), quiet.working():
        assert not quiet.active()


def test_env_turns_it_on_except_under_ddp(tmp_path, monkeypatch):
    monkeypatch.setenv(quiet.ENV, str(tmp_path / "q.lock"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert quiet.configure_from_env() is None and not quiet.active()
    monkeypatch.setenv("WORLD_SIZE", "1")
    try:
        assert quiet.configure_from_env() == str(tmp_path / "q.lock") and quiet.active()
    finally:
        quiet.configure(None)


def test_latency_timing_waits_for_another_process_s_batch(lock, tmp_path):
    import torch

    from prune_lab.sparsity.measure import interleaved_latency_ms

    out = tmp_path / "child.txt"
    child = _child("""
        with quiet.working():
            out.write("working 0\\n")
            time.sleep(0.8)
            out.write(f"end {time.time()}\\n")
    """, lock, out)
    _wait_for(out, "working")
    interleaved_latency_ms({"m": torch.nn.Linear(4, 4)}, torch.zeros(2, 4), warmup=1, repeats=2)
    timed = time.time()
    child.wait(timeout=30)
    assert timed >= _stamp(out, "end")


def test_a_run_holds_the_lock_during_its_training_steps(tmp_path, dense_dir, monkeypatch):
    """train.py's runs take part: with the environment variable set, no other process can
    measure while a training step runs (probed from inside the step through a second descriptor)."""
    import fcntl
    import os

    from conftest import FAST, compose_cfg
    from prune_lab.module import PruneLabModule
    from prune_lab.pipeline import run

    path = tmp_path / "quiet.lock"
    monkeypatch.setenv(quiet.ENV, str(path))
    probes = []
    step = PruneLabModule.training_step

    def probed(self, *args, **kwargs):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            probes.append("free")
        except BlockingIOError:
            probes.append("held")
        finally:
            os.close(fd)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(PruneLabModule, "training_step", probed)
    out = tmp_path / "run"
    cfg = compose_cfg([*FAST, "method=magnitude", "budget=0.5", "epochs=1"], out, dense_dir)
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("# composed in-process by the test\n")
    try:
        run(cfg)
    finally:
        quiet.configure(None)
    assert probes and set(probes) == {"held"}


def test_the_study_runner_gives_its_jobs_one_lock_for_the_machine(tmp_path, monkeypatch):
    from prune_lab.study import Job
    from prune_lab.study_runner import run_jobs

    monkeypatch.delenv(quiet.ENV, raising=False)
    fake = tmp_path / "fake_python.py"  # stands in for the interpreter: records what train.py would see
    fake.write_text("import os, sys, pathlib\n"
                    "d = pathlib.Path(next(a.split('=', 1)[1] for a in sys.argv if a.startswith('hydra.run.dir=')))\n"
                    f"(d / 'lock.txt').write_text(os.environ[{quiet.ENV!r}])\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    wrapper.chmod(0o755)
    jobs = [Job("v", 0.5, s, (), tmp_path / f"job{s}") for s in (0, 1)]
    assert run_jobs(jobs, workers=2, threads=1, python=str(wrapper)) == []
    locks = {(j.directory / "lock.txt").read_text() for j in jobs}
    assert locks == {str(ROOT / "outputs" / "quiet.lock")}
