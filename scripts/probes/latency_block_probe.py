"""Do channel counts off the CPU's 8-channel blocks cost more than the latency table predicts?

    python scripts/probes/latency_block_probe.py <run dir> [--budget 0.5] [--batch 128] [--calls 5]

Solves four plans for the run's architecture on the cached per-layer latency table (random dense
weights, L1-magnitude scores: speed does not depend on the weights): the latency plan (HALP greedy,
min_keep 0.25) and the FLOPs plan (uniform ratios), each with any kept count (round_to 1) and with
counts in blocks of 8; prints each plan's kept widths and the table's predicted reduction, then
times all four against the dense model interleaved in one call (`served_ms`: channels-last, BN
folded, fastest of rounds), `--calls` times, and prints each plan's median measured reduction.
If the block-of-8 plans measure well above their prediction and the any-count plans do not, the
table's interpolation between grid points misses the kernels' channel blocking
(`latency.channel_block`). One thread; holds the quiet lock when PRUNE_LAB_QUIET_LOCK is set.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from prune_lab import quiet
    from prune_lab.models import build_from_spec, classifier_of
    from prune_lab.sparsity import ChannelGroups, shrink
    from prune_lab.sparsity.importance import Magnitude
    from prune_lab.sparsity.latency import served_ms, table_for_run
    from prune_lab.sparsity.latency_allocation import solve_latency_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="any run of the architecture (its model.json)")
    ap.add_argument("--budget", type=float, default=0.5, help="the predicted latency reduction to solve for")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--cache", default=str(ROOT / "outputs" / "latency_tables"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet.configure_from_env()
    meta = json.loads((args.run / "model.json").read_text())
    torch.manual_seed(0)
    dense = build_from_spec(meta["arch"]).eval()
    x = torch.zeros(1, *meta["input_shape"])
    latency = dict(batch_size=args.batch, channels_last=True, fold_bn=True, warmup=3, repeats=10,
                   table_cache=args.cache)
    groups = ChannelGroups(dense, x, ignored=[classifier_of(dense)[1]])
    table = table_for_run(groups, x, latency)  # `other` calibrated on the dense model's forward now
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    models = {"dense": dense}
    for name, kw in (("latency plan, any count", dict(allocation="halp", round_to=1, min_keep=0.25)),
                     ("latency plan, blocks of 8", dict(allocation="halp", round_to=8, min_keep=0.25)),
                     ("FLOPs plan, any count", dict(allocation="flops", round_to=1)),
                     ("FLOPs plan, blocks of 8", dict(allocation="flops", round_to=8))):
        plan, predicted = solve_latency_target(groups, table, scores, args.budget, **kw)
        models[name] = shrink(copy.deepcopy(dense), plan, x).eval()
        print(f"{name:28s} predicted {predicted:.3f}  kept {[int(k.sum()) for k in plan.values()]}", flush=True)
    reductions = {k: [] for k in models if k != "dense"}
    for _ in range(args.calls):
        ms = served_ms(models, x, latency)
        for k in reductions:
            reductions[k].append(1.0 - ms[k] / ms["dense"])
    for k, v in reductions.items():
        print(f"{k:28s} measured median {statistics.median(v):.3f}  ({' '.join(f'{r:.3f}' for r in v)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
