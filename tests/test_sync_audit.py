"""Every method family trains as it would on a GPU (trainer=gpu: bf16 autocast), checked on the CPU:

- no host reads of tensor values in prune_lab's training step (each would stall a GPU), except on the
  steps where a method updates its masks or structure, and there a bounded number (tests/sync_audit.py
  counts them: `.item()`, float/int/bool of a tensor, `.tolist()`, `.numpy()`, `.cpu()`, `nonzero`,
  whenever the caller is prune_lab code);
- under `trainer.precision=bf16-mixed` the masks stay exact: the sparsity and the N:M pattern counted
  from the saved weights, the FLOPs and latency budgets met, the exported (shrunk, merged) model equal
  to the masked one. One run per family checks both."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import sync_audit
from conftest import FAMILIES, FAST, compose_cfg
from prune_lab.export import load_model
from prune_lab.pipeline import run
from prune_lab.sparsity import prunable_weights

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 34  # FAST: 2 epochs of 17 steps
LAYERS = 10  # resnet8's conv/linear layers: a bound on reads per update step is a few per layer

# family → (the steps on which it may read, at most how many reads on such a step); overrides: FAMILIES
BOUNDS = {
    "magnitude (one-shot)": (set(), 0),
    # GMP: every 20 steps from 0 to 0.75 of training (step 25), and at its end
    "GMP (gradual)": ({0, 20, 25, 26}, 2 * LAYERS),
    "L1-filter (channels)": (set(), 0),
    "N:M (SR-STE)": (set(), 0),
    "over-parameterization + SP-KD": (set(), 0),
    # RigL/SET: the drop/grow counts per layer, at every `every`-th step before `stop`
    "RigL": ({5, 10, 15, 20, 25}, 4 * LAYERS),
    # IEE: prune, explore start and grow of each of the 3 cycles of 4 + 2 + 2 steps before step 25
    "IEE": ({4, 6, 8, 12, 14, 16, 20, 22, 24}, 6 * LAYERS),
    # STP: the KD fitness of candidate subnets when the elites are re-ranked (one float each)
    "STP": (None, 16),
    # UniPTS: base-decayed distillation + dynamic sparse training after the search
    "UniPTS": (set(), 0),
    # the latency plan is measured before training; fine-tuning the shrunk model reads nothing
    "latency target (channels)": (set(), 0),
}
# how each family's budget is checked on the saved model
UNSTRUCTURED = {"magnitude (one-shot)", "GMP (gradual)", "RigL", "IEE", "UniPTS"}


# one family of each kind the accelerator issue names runs in CI (the default suite: schedules, phases,
# per-step masks, distillation + search; `slow and ci`: subnet training, expansion + merge, a latency
# plan); `make test-slow` also runs one-shot magnitude, RigL and plain L1-filter
DEFAULT = ("GMP (gradual)", "IEE", "N:M (SR-STE)", "UniPTS")
CI = ("STP", "over-parameterization + SP-KD", "latency target (channels)")


def _marks(family):
    if family in DEFAULT:
        return family
    return pytest.param(family, marks=[pytest.mark.slow, pytest.mark.ci] if family in CI else pytest.mark.slow)


@pytest.mark.parametrize("family", [_marks(f) for f in BOUNDS])
def test_bf16_training_reads_nothing_back_and_keeps_masks_exact(family, tmp_path, dense_dir):
    overrides, (update_steps, bound) = FAMILIES[family], BOUNDS[family]
    audit = sync_audit.SyncAudit(start=2)  # steps 0-1: one-off set-up (first masks, optimizer state)
    sync_audit.THE = audit
    cfg = compose_cfg([*FAST, *overrides, "trainer.precision=bf16-mixed"], tmp_path / "run", dense_dir)
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

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["precision"] == "bf16-mixed" and results["train"]["steps"] == STEPS
    assert results["pruned"]["top1"] > 0.3, "bf16 training diverged"  # 10 classes: chance is 0.1
    deployed = load_model(tmp_path / "run")
    weights = prunable_weights(deployed)
    dense_count = sum(math.prod(L["dense_shape"]) for L in results["layers"])
    nonzero = sum(int(w.count_nonzero()) for w in weights.values())
    if family in UNSTRUCTURED:  # the params budget, exact to the rounding of per-layer counts
        assert abs(1 - nonzero / dense_count - cfg.budget) <= 0.005, (nonzero, dense_count)
    elif family.startswith("N:M"):  # at most N of every M consecutive inputs, in every non-exempt layer
        n, m = results["pattern"]["n"], results["pattern"]["m"]
        for name, w in weights.items():
            if name in results["pattern"]["dense_layers"]:
                continue
            groups = w.detach().movedim(1, -1).reshape(-1, m)
            assert int((groups != 0).sum(1).max()) <= n, name
    if family.startswith("latency"):  # a latency budget met or not depends on the machine's load
        assert results["latency"]["reduction"] > 0
    else:
        assert results["budget_met"]
    # the deployed model (shrunk, merged) computes what the masked training model computes
    assert results["export"]["max_abs_diff_masked_vs_deployed"] <= 1e-4
    if "expansion" in results:
        assert results["expansion"]["merge_max_rel_logit_change"] <= 1e-4
