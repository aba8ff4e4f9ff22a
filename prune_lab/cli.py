"""Command-line checks and sweep identity, settled before Hydra composes anything.

- Hydra reports an unknown config-group option as a multi-line listing; a user typing
  `method=magnitdue` gets one line naming the value and the accepted ones instead.
- A sweep's directory is named after its command, not the clock, so re-running the same
  command after a crash finds the jobs it already finished (`outputs/sweeps/<id>/`). The id
  travels in an environment variable, which DDP children, submitit and SLURM jobs inherit.
- A single run's directory is named after the clock; re-running the same command while its
  newest run is unfinished (a checkpoint, no results.json) continues that run in its directory.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
SWEEP_ENV = "PRUNE_LAB_SWEEP_ID"
# overrides that say where or how jobs run, not what they compute
_NOT_IDENTITY = ("hydra/launcher", "hydra.launcher", "hydra.sweep", "hydra.run", "hydra.job.name",
                 "hydra.output_subdir", "logger", "trainer.devices", "trainer.num_nodes")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def unknown_option(arg: str) -> str | None:
    """The one-line complaint about `group=value` naming no config in that group, or None."""
    if arg.startswith("-") or "=" not in arg:
        return None
    key, value = arg.split("=", 1)
    key = key.lstrip("+~")
    if "." in key or "/" in key or key == "hydra" or not (CONF / key).is_dir():
        return None
    options = group_options(key)
    for v in value.split(","):  # multirun lists: method=a,b
        if v and v != "null" and v not in options:
            return f"unknown {key} '{v}'; choose one of: {', '.join(options)}"
    return None


def check_overrides(argv: list[str]) -> None:
    for arg in argv:
        problem = unknown_option(arg)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)


def sweep_id(argv: list[str]) -> str:
    """A short stable name for the sweep a command line describes (order of values ignored)."""
    parts = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.lstrip("+~").startswith(_NOT_IDENTITY):
            continue
        key, value = arg.split("=", 1)
        parts.append(f"{key}={','.join(sorted(value.split(',')))}")
    parts.sort()
    prefix = next((p.split("=", 1)[1] for p in parts if p.startswith("experiment=")), "sweep")
    return f"{prefix.replace(',', '+')}-{hashlib.sha1(' '.join(parts).encode()).hexdigest()[:8]}"


def set_sweep_id(argv: list[str]) -> None:
    os.environ.setdefault(SWEEP_ENV, sweep_id(argv))


def unfinished_run_dir(argv: list[str], runs: Path = Path("outputs/runs")) -> Path | None:
    """The newest run directory of this same command (same overrides, any order) that left a
    checkpoint but no results.json; None for sweeps and runs given their own `hydra.run.dir`."""
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return None
    import yaml

    me, found = sweep_id(argv), []
    for overrides in runs.glob("*/*/.hydra/overrides.yaml"):
        run = overrides.parent.parent
        if (run / "results.json").exists() or not (run / "checkpoints" / "last.ckpt").is_file():
            continue
        try:
            if sweep_id(list(yaml.safe_load(overrides.read_text()) or [])) == me:
                found.append(run)
        except (OSError, yaml.YAMLError, TypeError):
            continue
    return max(found, key=lambda r: (r / "checkpoints" / "last.ckpt").stat().st_mtime) if found else None


def continue_unfinished_run(argv: list[str]) -> None:
    """Point Hydra at the unfinished run of this command, if any (appends `hydra.run.dir=`)."""
    run = unfinished_run_dir(argv)
    if run is not None:
        sys.argv.append(f"hydra.run.dir={run}")
