"""`module.compile=true`: the training forward and backward through torch.compile, masks enforced outside
the graph. Against eager training of the same run: the same masks, weights and accuracy within float
rounding, and results.json says it compiled."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, compose_cfg
from prune_lab.pipeline import run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.ci]  # Inductor compiles for ~20 s


def test_compiled_training_keeps_the_masks_and_results_of_eager(tmp_path, dense_dir):
    out = {}
    for mode in ("eager", "compiled"):  # eager first: it trains the dense reference both share
        cfg = compose_cfg([*FAST, "method=gmp", "budget=0.8", f"module.compile={mode == 'compiled'}"],
                          tmp_path / mode, dense_dir)
        run(cfg)
        out[mode] = json.loads((tmp_path / mode / "results.json").read_text())
    eager, compiled = out["eager"], out["compiled"]
    assert (eager["train"]["compiled"], compiled["train"]["compiled"]) == (False, True)
    assert eager["dense"] == compiled["dense"]  # one dense reference: compile is not part of its key
    # GMP's masks follow the training trajectory: identical masks mean identical magnitude rankings
    assert compiled["train"]["mask_digest_per_rank"] == eager["train"]["mask_digest_per_rank"]
    assert compiled["pruned"]["sparsity"] == eager["pruned"]["sparsity"]
    assert abs(compiled["pruned"]["top1"] - eager["pruned"]["top1"]) <= 0.02
    a, b = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("eager", "compiled"))
    for name in a:
        if a[name].is_floating_point():
            scale = a[name].abs().max().clamp_min(1e-6)
            assert float((a[name] - b[name]).abs().max() / scale) < 1e-2, name
            assert torch.equal(a[name] == 0, b[name] == 0), name
