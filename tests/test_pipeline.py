"""End-to-end: the real config composed, run on digits, artefacts re-read independently."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from conftest import FAST, compose_cfg, run_cli
from prune_lab.export import load_model
from prune_lab.pipeline import run

ARTEFACTS = ["results.json", "checkpoints/last.ckpt", "model.safetensors", "model.json", "model.pt2", "layers.png",
             ".hydra/config.yaml"]


def zero_fraction(state: dict[str, torch.Tensor]) -> float:
    """Independent re-count: zeros among conv (4-D) and linear (2-D) weights."""
    ws = [v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    return 1.0 - sum(int(w.count_nonzero()) for w in ws) / sum(w.numel() for w in ws)


def macs(model, x) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def run_fast(tmp_path, dense_dir, *overrides, name="run"):
    out = tmp_path / name
    cfg = compose_cfg([*FAST, *overrides], out, dense_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".hydra").mkdir(exist_ok=True)
    (out / ".hydra" / "config.yaml").write_text("# composed in-process by the test\n")
    return run(cfg), out


@pytest.mark.parametrize("method,budget", [("dense", 0.0), ("magnitude", 0.9), ("gmp", 0.8), ("random", 0.9),
                                           ("l1_filter", 0.5), ("static_erk", 0.9)])
def test_each_method_writes_a_complete_run_directory(method, budget, tmp_path, dense_dir):
    results, out = run_fast(tmp_path, dense_dir, f"method={method}", f"budget={budget}")
    for name in ARTEFACTS:
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == 1 and on_disk["method"] == method and on_disk["budget"] == budget
    assert set(on_disk) >= {"dense", "pruned", "latency", "layers", "train", "env"}
    assert on_disk["pruned"]["top1"] == pytest.approx(results["pruned"]["top1"])
    # the dense reference's training time is the cached record's, whether this run trained it or not
    records = [json.loads(f.read_text()) for f in dense_dir.glob("*/dense.json")]
    cached = [r for r in records if (r["top1"], r["flops"]) == (on_disk["dense"]["top1"], on_disk["dense"]["flops"])]
    assert cached and on_disk["dense"]["train_wall_s"] == cached[0]["train_wall_s"] > 0
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"

    state = load_file(str(out / "model.safetensors"))
    x = torch.randn(3, 1, 8, 8)
    program = torch.export.load(str(out / "model.pt2")).module()
    rebuilt = load_model(out)
    torch.testing.assert_close(program(x), rebuilt(x), rtol=1e-5, atol=1e-5)  # dynamic batch of 3
    dense_macs = on_disk["dense"]["flops"]
    if on_disk["target"] == "params":
        assert abs(zero_fraction(state) - budget) <= 0.005
        assert on_disk["pruned"]["sparsity"] == pytest.approx(zero_fraction(state), abs=1e-4)
    else:
        reduction = 1 - macs(program, x[:1]) / dense_macs
        assert abs(reduction - budget) <= 0.02
        assert on_disk["pruned"]["params"] < on_disk["dense"]["params"]  # physically smaller
    assert on_disk["pruned"]["flops"] == macs(program, x[:1])
    assert on_disk["budget_met"] is True
    # a learned model, not chance (10 classes): the tiny 8x8 recipe still reaches far above 0.1
    assert on_disk["dense"]["top1"] > 0.6
    # training cost in dense epochs: the run's steps at their measured cost, + the dense reference's
    # 4 epochs (FAST) for every method that starts from it (static_erk starts from scratch)
    train = on_disk["train"]
    own = (train["flops_ratio"] or 0) * train["epochs"]  # no calibration subset: an epoch is a dense epoch's steps
    assert train["cost_dense_epochs"] == pytest.approx(own + (0 if method == "static_erk" else 4))
    # and in seconds: the run's own wall time, + the dense reference's recorded training time
    pre = 0 if method == "static_erk" else on_disk["dense"]["train_wall_s"]
    assert train["cost_wall_s"] == pytest.approx(train["wall_s"] + pre)


def test_same_seed_gives_identical_results(tmp_path, dense_dir):
    a, _ = run_fast(tmp_path, dense_dir, "method=magnitude", "budget=0.8", name="a")
    b, _ = run_fast(tmp_path, dense_dir, "method=magnitude", "budget=0.8", name="b")
    assert a["pruned"]["top1"] == b["pruned"]["top1"] and a["pruned"]["top5"] == b["pruned"]["top5"]
    assert a["pruned"]["nonzero_params"] == b["pruned"]["nonzero_params"]
    sa, sb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = run_fast(tmp_path, dense_dir, "method=magnitude", "budget=0.8", "seed=1", name="c")
    sc = load_file(str(tmp_path / "c/model.safetensors"))
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # the seed matters


@pytest.mark.parametrize("layout", [[], ["module.channels_last=true"]], ids=["nchw", "channels_last"])
def test_resume_mid_run_equals_uninterrupted(layout, tmp_path, dense_dir):
    common = ["method=gmp", "budget=0.8", "epochs=4", "method.every=3", "callbacks.model_checkpoint.save_top_k=-1",
              *layout]
    full, _ = run_fast(tmp_path, dense_dir, *common, name="full")
    ckpt = tmp_path / "full/checkpoints/epoch001.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    mask_keys = [k for k in saved["state_dict"] if k.startswith("masks.m__")]
    assert mask_keys and any(not bool(saved["state_dict"][k].all()) for k in mask_keys)  # masks are in it
    resumed, _ = run_fast(tmp_path, dense_dir, *common, f"ckpt_path={ckpt}", name="resumed")
    sa, sb = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "resumed/model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full["pruned"]["top1"] == resumed["pruned"]["top1"]
    assert resumed["train"]["steps"] == full["train"]["steps"]
    assert abs(zero_fraction(sa) - 0.8) <= 0.005


_SLOW = pytest.mark.slow  # each case starts train.py (seconds of imports): two stay in the default suite
BAD = [
    (["budget=1.2"], ["budget=1.2", "[0, 1)"]),
    (["method=magnitdue"], ["magnitdue", "magnitude", "l1_filter"]),
    pytest.param(["model.name=resnt20", "model=resnet20"], ["resnt20", "resnet20"], marks=_SLOW),
    pytest.param(["method=l1_filter", "model=logreg"], ["l1_filter", "logreg"], marks=_SLOW),
    pytest.param(["model.weights=/nonexistent/dense.safetensors"], ["/nonexistent/dense.safetensors"], marks=_SLOW),
    (["method.distribution=gaussian"], ["gaussian", "uniform", "erk"]),
    pytest.param(["method=stp", "model=vgg16"], ["not supported by stp", "ResNet"], marks=_SLOW),
    pytest.param(["method=l1_filter", "method.prune_steps=50"], ["prune steps", "50", "method.prune_steps"],
                 marks=_SLOW),
]


@pytest.mark.parametrize("args,words", BAD, ids=[(b.values if hasattr(b, "values") else b)[0][0] for b in BAD])
def test_bad_input_is_one_clear_line(args, words, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["experiment=quickstart", "method=magnitude", f"hydra.run.dir={run_dir}",
                    f"paths.dense_dir={tmp_path / 'dense'}", *args])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for w in words:
        assert w in lines[0]
    written = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    assert written <= {".hydra", "train.log"}
    assert not (tmp_path / "dense").exists()


@pytest.mark.slow  # trimmed from the default suite (make test-slow runs it)
def test_corrupt_checkpoint_is_refused_before_training(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_cli(["experiment=quickstart", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={bad}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # trimmed from the default suite (make test-slow runs it)
def test_cifar_offline_names_folder_and_archive(tmp_path):
    root = tmp_path / "cifar"
    proc = run_cli(["method=l1_filter", "budget=0.5", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and str(root) in line and "cifar-10-python.tar.gz" in line


@pytest.mark.slow
def test_quickstart_as_documented_learns(tmp_path):
    """The README's quick-start command, unchanged: the dense ResNet learns digits (> 0.95)."""
    proc = run_cli(["experiment=quickstart", "method=magnitude", "budget=0.9", f"hydra.run.dir={tmp_path / 'run'}",
                    f"paths.dense_dir={tmp_path / 'dense'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "run/results.json").read_text())
    assert r["dense"]["top1"] > 0.95
    assert r["pruned"]["top1"] > 0.9
    assert abs(r["pruned"]["sparsity"] - 0.9) <= 0.005
