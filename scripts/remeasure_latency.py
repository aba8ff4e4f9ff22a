"""Re-measure the latency of a study's finished jobs, one model at a time, on a quiet machine.

    python scripts/remeasure_latency.py latency [--repeats 30]      # then: scripts/study.py latency --report-only

A study runs two jobs on two cores, and a latency measured while the other core trains shares
caches and memory bandwidth with it (measured: the same plan's reduction 0.29 at the start of a
job, 0.19 at its end). This re-times every job's deployed model (rebuilt from model.json +
model.safetensors) against a dense model of the same architecture (latency does not depend on the
weights), as results.json measures (the settings its `latency` record names, fastest of
interleaved rounds),
one process, nothing else running, and adds `latency_remeasured` to each results.json (keys may be
added, never changed): {"dense_ms", "pruned_ms", "reduction", "repeats", "cpu"}. A study config
can then show it as a column (conf/study/latency.yaml does).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prune_lab import quiet  # noqa: E402
from prune_lab.export import load_model  # noqa: E402
from prune_lab.models import build_from_spec  # noqa: E402
from prune_lab.report import write_json_atomic  # noqa: E402
from prune_lab.sparsity.latency import cpu_name, served_ms  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a study name (outputs/studies/<name>) or a study directory")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--force", action="store_true", help="re-measure jobs that already have latency_remeasured")
    args = ap.parse_args()
    root = Path(args.study) if Path(args.study).is_dir() else ROOT / "outputs" / "studies" / args.study
    jobs = sorted(p.parent for p in root.glob("jobs/*/*/results.json"))
    if not jobs:
        print(f"error: no finished jobs under {root}/jobs", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    quiet.configure_from_env()  # with PRUNE_LAB_QUIET_LOCK set, jobs sharing it pause while this measures
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        if "latency_remeasured" in results and not args.force:
            continue
        meta = json.loads((job / "model.json").read_text())
        example = torch.zeros(1, *meta["input_shape"])
        dense = build_from_spec(meta["arch"])  # random init: latency does not depend on the weights
        lat = results["latency"]  # how the run measured: the record, not the config
        latency = {"batch_size": lat["batch_size"], "channels_last": lat["channels_last"],
                   "fold_bn": lat.get("bn_folded", True), "compile": lat.get("compiled", False), "warmup": 3,
                   "repeats": args.repeats}
        ms = served_ms({"dense": dense.eval(), "pruned": load_model(job)}, example, latency)
        results["latency_remeasured"] = {"dense_ms": ms["dense"], "pruned_ms": ms["pruned"],
                                         "reduction": 1.0 - ms["pruned"] / ms["dense"], "repeats": args.repeats,
                                         "threads": 1, "cpu": cpu_name()}
        write_json_atomic(job / "results.json", results)
        print(f"{job.relative_to(root)}: {results['latency_remeasured']['reduction']:.3f} "
              f"(run: {1 - results['latency']['pruned_min_ms'] / results['latency']['dense_min_ms']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
