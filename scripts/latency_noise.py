"""How noisy is a latency reduction on this machine? The basis of `latency.tolerance`.

    python scripts/latency_noise.py <run dir> [--batch 16] [--processes 5] [--rounds 3]
    python scripts/latency_noise.py <run dir> --exported     # model.pt2 vs dense.pt2 via torch.export.load

Re-times one finished run's deployed model against a dense model of the same architecture (random
weights: latency does not depend on them) as results.json measures (`served_ms`: channels-last,
BN folded, fastest of interleaved rounds), `--rounds` times in each of `--processes` fresh
processes, one thread each, and prints every reduction, their range and standard deviation. Fresh
processes matter: on a shared VM the spread between processes is larger than within one.
`--exported` times the saved programs instead (a latency-target run saves `dense.pt2` beside
`model.pt2`), loaded with `torch.export.load` and called on a plain NCHW tensor: the deliverable as
an independent check times it; the run's budget is printed beside the reductions. Holds the quiet
lock (PRUNE_LAB_QUIET_LOCK) while it measures, as a study's jobs do.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(run: Path, batch: int, rounds: int, exported: bool = False) -> list[float]:
    sys.path.insert(0, str(ROOT))
    import torch

    from prune_lab import quiet

    quiet.configure_from_env()  # with PRUNE_LAB_QUIET_LOCK set, jobs sharing it pause while this measures
    if exported:
        from prune_lab.sparsity.measure import interleaved_latency_ms

        torch.set_num_threads(1)
        programs = {k: torch.export.load(str(run / f"{k}.pt2")).module() for k in ("dense", "model")}
        shape = json.loads((run / "model.json").read_text())["input_shape"]
        x = torch.randn(batch, *shape)
        out = []
        for _ in range(rounds):
            times = interleaved_latency_ms(programs, x, 3, 10)
            out.append(1.0 - min(times["model"]) / min(times["dense"]))
        return out

    from prune_lab.export import load_model
    from prune_lab.models import build_from_spec
    from prune_lab.sparsity.latency import served_ms

    torch.set_num_threads(1)
    meta = json.loads((run / "model.json").read_text())
    dense, pruned = build_from_spec(meta["arch"]).eval(), load_model(run)
    x = torch.randn(1, *meta["input_shape"])
    latency = dict(batch_size=batch, channels_last=True, fold_bn=True, warmup=3, repeats=10)
    out = []
    for _ in range(rounds):
        ms = served_ms({"dense": dense, "pruned": pruned}, x, latency)
        out.append(1.0 - ms["pruned"] / ms["dense"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run's directory (model.json + model.safetensors)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exported", action="store_true", help="time model.pt2 against dense.pt2 (torch.export.load)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (args.run / "model.json").is_file():
        print(f"error: {args.run} has no model.json; pass a finished run's directory", file=sys.stderr)
        return 2
    if args.exported and not (args.run / "dense.pt2").is_file():
        print(f"error: {args.run} has no dense.pt2; --exported needs a run with method.target=latency", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(measure(args.run, args.batch, args.rounds, args.exported)))
        return 0
    values = []
    # a clean environment (one thread), but the quiet lock passes through: the children measure
    child_env = {"OMP_NUM_THREADS": "1", "PATH": "",
                 **{k: v for k, v in os.environ.items() if k == "PRUNE_LAB_QUIET_LOCK"}}
    for p in range(args.processes):
        done = subprocess.run([sys.executable, __file__, str(args.run), "--batch", str(args.batch), "--rounds",
                               str(args.rounds), "--child", *(["--exported"] if args.exported else [])],
                              capture_output=True, text=True, check=True, env=child_env)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        values += got
        print(f"process {p}: " + " ".join(f"{v:.3f}" for v in got))
    print(f"batch {args.batch}: {len(values)} reductions, {min(values):.3f}–{max(values):.3f}, "
          f"mean {statistics.fmean(values):.3f}, median {statistics.median(values):.3f}, std {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}")
    results = args.run / "results.json"
    if results.is_file():
        r = json.loads(results.read_text())
        print(f"the run's budget: {r.get('budget')} ({r.get('target')}); tolerance "
              f"{r.get('latency_plan', {}).get('tolerance', 'n/a')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
