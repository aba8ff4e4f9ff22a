"""No host reads of tensor values in prune_lab's training step (each would stall a GPU), except on the
steps where a method updates its masks or structure, and there a bounded number (tests/sync_audit.py
counts them on the CPU: `.item()`, float/int/bool of a tensor, `.tolist()`, `.numpy()`, `.cpu()`,
`nonzero`, whenever the caller is prune_lab code)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import sync_audit
from conftest import FAST, compose_cfg
from prune_lab.pipeline import run

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 34  # FAST: 2 epochs of 17 steps
LAYERS = 10  # resnet8's conv/linear layers: a bound on reads per update step is a few per layer

# family → (overrides, the steps on which it may read, at most how many reads on such a step)
FAMILIES = {
    "magnitude (one-shot)": (["method=magnitude", "budget=0.9"], set(), 0),
    # GMP: every 20 steps from 0 to 0.75 of training (step 25), and at its end
    "GMP (gradual)": (["method=gmp", "budget=0.8"], {0, 20, 25, 26}, 2 * LAYERS),
    "L1-filter (channels)": (["method=l1_filter", "budget=0.5"], set(), 0),
    "N:M (SR-STE)": (["method=sr_ste", "budget=0.5", "method.pattern=2:4"], set(), 0),
    "over-parameterization + SP-KD": (["method=overparam", "budget=0.5"], set(), 0),
    # RigL/SET: the drop/grow counts per layer, at every `every`-th step before `stop`
    "RigL": (["method=rigl", "budget=0.9", "method.every=5"], {5, 10, 15, 20, 25}, 4 * LAYERS),
    # IEE: prune, explore start and grow of each of the 3 cycles of 4 + 2 + 2 steps before step 25
    "IEE": (["method=iee", "budget=0.9", "method.cycles=3"], {4, 6, 8, 12, 14, 16, 20, 22, 24}, 6 * LAYERS),
    # STP: the KD fitness of candidate subnets when the elites are re-ranked (one float each)
    "STP": (["method=stp", "budget=0.5", "method.callbacks.stp.search_population=8",
             "method.callbacks.stp.search_generations=2"], None, 16),
    # UniPTS: base-decayed distillation + dynamic sparse training after the search
    "UniPTS": (["method=unipts", "budget=0.9", "method.generations=1", "method.population=4", "method.parents=2"],
               set(), 0),
}


# the default suite audits a representative four (mask updates on a schedule, phases, per-step masks,
# distillation + search); `make test-slow` audits every family
DEFAULT = ("RigL", "IEE", "N:M (SR-STE)", "UniPTS")


@pytest.mark.parametrize("family", [f if f in DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_training_steps_read_nothing_back_but_on_update_steps(family, tmp_path, dense_dir):
    overrides, update_steps, bound = FAMILIES[family]
    audit = sync_audit.SyncAudit(start=2)  # steps 0-1: one-off set-up (first masks, optimizer state)
    sync_audit.THE = audit
    cfg = compose_cfg([*FAST, *overrides], tmp_path / "run", dense_dir)
    # first in the list: its batch-start hook marks the step before any other callback runs
    cfg.method.callbacks = {"audit": {"_target_": "sync_audit.instance"},
                            **OmegaConf.to_container(cfg.method.callbacks)}
    run(cfg)
    where = {step: sorted({w for _, w in events}) for step, events in audit.events.items()}
    if update_steps is not None:
        assert set(where) <= update_steps, f"reads on ordinary steps: { {s: where[s] for s in set(where) - update_steps} }"
    else:  # STP re-ranks its elites on a schedule of its own: few steps, and only the fitness reads
        assert len(where) <= STEPS // 2 and all(w[0].startswith("methods/stp.py") for w in where.values()), where
    assert all(len(events) <= bound for events in audit.events.values()), \
        {s: len(e) for s, e in audit.events.items()}
