"""Quiet latency measurements beside other jobs: processes that share a lock file pause their
batches while one of them measures latency.

A study runs two jobs on two cores, and a latency measured while the other core trains shares
caches and memory bandwidth with it: the latency study's plans measured 0.49 of the dense latency
removed in-run and 0.62-0.71 when the same models were re-timed alone. With
`PRUNE_LAB_QUIET_LOCK=<file>` in the environment (`scripts/study.py` sets it for its jobs), every
latency measurement (`measuring()`: the per-layer latency table, the plan's correction rounds,
results.json's latency) holds the file exclusively, and every training / validation / test batch
and every UniPTS / STP search evaluation (`working()`; `prune_lab.callbacks.QuietSteps` in the
runs) holds it shared: a measurement waits for the other jobs' current batches to end, and their
next batches wait for it.

Two flock(2) locks: a gate and the lock. A measurer takes the gate exclusively, then the lock
exclusively; a worker passes the gate (shared, released at once) before it takes the lock shared,
so a waiting measurer stops new batches from starting (with flock alone, shared holders that
overlap could keep an exclusive waiter out for ever). A process that measures inside one of its
own batches gives its shared hold up for the measurement. Not used under DDP (ranks wait on each
other inside a batch). Hand-written: a few lines of fcntl; no library does this.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

ENV = "PRUNE_LAB_QUIET_LOCK"


class _State:
    path: str | None = None
    gate: int | None = None
    lock: int | None = None
    working = False    # this process holds the lock shared (inside a batch)
    measuring = 0      # nesting depth of measuring()


_s = _State()


def configure(path: str | os.PathLike | None) -> None:
    """Use `path` as the shared lock file (None: off, every call below is a no-op)."""
    for fd in (_s.gate, _s.lock):
        if fd is not None:
            os.close(fd)  # closing releases whatever this process held
    _s.gate = _s.lock = None
    _s.working, _s.measuring = False, 0
    _s.path = str(path) if path else None
    if _s.path:
        os.makedirs(os.path.dirname(os.path.abspath(_s.path)), exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        _s.gate = os.open(_s.path + ".gate", flags, 0o644)
        _s.lock = os.open(_s.path, flags, 0o644)


def configure_from_env() -> str | None:
    """`configure` from PRUNE_LAB_QUIET_LOCK, off when the process is one of several DDP ranks."""
    path = os.environ.get(ENV) or None
    if path and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        path = None
    configure(path)
    return path


def active() -> bool:
    return _s.path is not None


def begin_work() -> None:
    if _s.path is None or _s.working or _s.measuring:
        return
    fcntl.flock(_s.gate, fcntl.LOCK_SH)  # blocks while a measurer waits or measures
    fcntl.flock(_s.gate, fcntl.LOCK_UN)
    fcntl.flock(_s.lock, fcntl.LOCK_SH)
    _s.working = True


def end_work() -> None:
    if _s.path is None or not _s.working:
        return
    fcntl.flock(_s.lock, fcntl.LOCK_UN)
    _s.working = False


@contextlib.contextmanager
def working():
    """Hold the lock shared (a batch, a fitness pass); nested use is a no-op."""
    if _s.path is None or _s.working or _s.measuring:
        yield
        return
    begin_work()
    try:
        yield
    finally:
        end_work()


@contextlib.contextmanager
def measuring():
    """Hold the lock exclusively: no other process's batch runs until the block ends (nested: once)."""
    if _s.path is None:
        yield
        return
    outermost, resume = _s.measuring == 0, _s.working
    if outermost:
        end_work()  # our own shared hold would block our exclusive request
        fcntl.flock(_s.gate, fcntl.LOCK_EX)
        fcntl.flock(_s.lock, fcntl.LOCK_EX)
    _s.measuring += 1
    try:
        yield
    finally:
        _s.measuring -= 1
        if outermost:
            fcntl.flock(_s.lock, fcntl.LOCK_UN)
            fcntl.flock(_s.gate, fcntl.LOCK_UN)
            if resume:
                begin_work()
