"""Shared test helpers: compose the real Hydra config, run train.py as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent

# A fast variant of the quick start: 8x8 digits, 2 epochs; everything else is the real config.
FAST = ["experiment=quickstart", "data.image_size=8", "epochs=2", "dense.epochs=4", "latency.repeats=2",
        "latency.warmup=1", "callbacks.progress_bar.leave=false"]

# One representative configuration per method family on the FAST quick start (the sync audit and
# the bf16 tests run each of them)
FAMILIES = {
    "magnitude (one-shot)": ["method=magnitude", "budget=0.9"],
    "GMP (gradual)": ["method=gmp", "budget=0.8"],
    "L1-filter (channels)": ["method=l1_filter", "budget=0.5"],
    "N:M (SR-STE)": ["method=sr_ste", "budget=0.5", "method.pattern=2:4"],
    "over-parameterization + SP-KD": ["method=overparam", "budget=0.5"],
    "RigL": ["method=rigl", "budget=0.9", "method.every=5"],
    "IEE": ["method=iee", "budget=0.9", "method.cycles=3"],
    "STP": ["method=stp", "budget=0.5", "method.callbacks.stp.search_population=8",
            "method.callbacks.stp.search_generations=2"],
    "UniPTS": ["method=unipts", "budget=0.9", "method.generations=1", "method.population=4", "method.parents=2"],
    "latency target (channels)": ["method=l1_filter", "method.target=latency", "budget=0.2"],
}


def compose_cfg(overrides: list[str], out_dir: Path, dense_dir: Path):
    if "method=unipts" in overrides and not any(o.startswith("method.search_cache=") for o in overrides):
        overrides = [*overrides, "method.search_cache=null"]  # the default lives in the repo's outputs/
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"paths.output_dir={out_dir}",
                                                        f"paths.root_dir={ROOT}", f"paths.dense_dir={dense_dir}"])


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory) -> Path:
    """One dense-reference cache for the whole session, as a sweep would share it."""
    return tmp_path_factory.mktemp("dense")


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box, OpenMP barriers of oversubscribed threads make
    big-tensor tests many times slower; restored afterwards. Use with `pytest.mark.usefixtures`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
