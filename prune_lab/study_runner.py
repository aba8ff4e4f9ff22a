"""Running a study's jobs: `train.py` processes, a few at a time, on CPU threads or pinned GPUs.

`prune_lab.study` says which jobs a study has and judges their results; this module only runs them
(scripts/study.py calls both).
"""
from __future__ import annotations

from pathlib import Path

from prune_lab.study import ROOT, Job, compose_train


def dense_cached(job: Job) -> bool:
    """Whether the dense reference `job` compares with is already in the cache (`paths.dense_dir`)."""
    from prune_lab.pipeline import dense_key

    try:  # train.py runs in ROOT, so `${hydra:runtime.cwd}` is ROOT; the job's own paths override it
        cfg = compose_train([f"paths.root_dir={ROOT}", *job.overrides])
        return any(Path(cfg.paths.dense_dir).glob(f"*_{dense_key(cfg)}/dense.json"))
    except Exception:  # unsure: the seed's first job trains it while the others wait, as without a cache
        return False


def run_jobs(jobs: list[Job], workers: int, threads: int, python: str, progress=None,
             devices: list[str] | None = None) -> list[tuple[Job, int]]:
    """Run the unfinished jobs, `workers` at a time, each `train.py` process with `threads` threads.

    With `devices` (GPU indices), `workers` is per device: each device holds that many jobs at once,
    each job pinned to one device by CUDA_VISIBLE_DEVICES (a freed slot takes the next job, so the
    devices fill round-robin and stay full). Unless the seed's dense reference is cached already,
    the first job of each seed runs before that seed's others start: it trains the dense reference,
    which the others then read from the cache instead of training it again in parallel. Returns
    (job, exit code) for the jobs that failed.
    """
    import os
    import queue
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from prune_lab import quiet

    todo = [j for j in jobs if not j.done]
    leaders: dict[int, Job] = {}
    for j in todo:
        leaders.setdefault(j.seed, j)
    # a seed whose dense reference is already cached needs no leader: its jobs start at once
    leaders = {s: j for s, j in leaders.items() if not dense_cached(j)}
    ready = {s: threading.Event() for s in leaders}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    # one lock for every study on this machine: a job measuring latency pauses the others' batches
    env.setdefault(quiet.ENV, str(ROOT / "outputs" / "quiet.lock"))
    failed: list[tuple[Job, int]] = []
    slots: queue.Queue = queue.Queue()  # the device of each free slot (None: no pinning)
    # indices count the GPUs this process sees: under an outer CUDA_VISIBLE_DEVICES (SLURM) index i is
    # its i-th entry, not physical GPU i
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    physical = [visible[int(d)] if visible else str(d) for d in devices or []]
    for i in range(max(1, workers) * len(physical or [None])):
        slots.put(None if not physical else physical[i % len(physical)])

    def one(job: Job) -> None:
        if job.seed in leaders and leaders[job.seed] is not job:
            ready[job.seed].wait()
        device = slots.get()
        try:
            job.directory.mkdir(parents=True, exist_ok=True)
            with open(job.directory / "run.log", "a") as log:
                cmd = [python, str(ROOT / "train.py"), *job.overrides, f"hydra.run.dir={job.directory}",
                       "callbacks.progress_bar.leave=false"]
                job_env = env if device is None else {**env, "CUDA_VISIBLE_DEVICES": str(device)}
                rc = subprocess.run(cmd, cwd=ROOT, env=job_env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc:
                failed.append((job, rc))
        finally:
            slots.put(device)
            if leaders.get(job.seed) is job:
                ready[job.seed].set()
            if progress is not None:
                progress(job)

    # leaders are queued first, so a worker never waits for a leader that no worker has taken
    order = list(leaders.values()) + [j for j in todo if leaders.get(j.seed) is not j]
    with ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
        list(pool.map(one, order))
    return failed
