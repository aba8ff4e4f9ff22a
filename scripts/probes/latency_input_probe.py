"""Does a latency reduction depend on the input values or the dense model's weights?

    python scripts/probes/latency_input_probe.py <run dir> <dense reference dir> [--flush-denormal]

Times one run's deployed model against its dense model in one process, as results.json measures
(`served_ms`: channels-last, BN folded, fastest of interleaved rounds, batch 128, one thread),
with a zero input (what runs measure with) and a random one, against the trained dense reference
and a randomly initialised dense model of the same architecture: if the four agree within their
rounds, differences between a run's own measurement and a later re-timing are the machine's, not
the data's. Holds the quiet lock when PRUNE_LAB_QUIET_LOCK is set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file

    from prune_lab import quiet
    from prune_lab.export import load_model
    from prune_lab.models import build_from_spec
    from prune_lab.sparsity.latency import served_ms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("dense", type=Path, help="the dense reference's cache folder (outputs/dense/...)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flush-denormal", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(args.flush_denormal)
    quiet.configure_from_env()
    meta = json.loads((args.run / "model.json").read_text())
    pruned = load_model(args.run).eval()
    trained = build_from_spec(meta["arch"]).eval()
    trained.load_state_dict(load_file(str(args.dense / "model.safetensors")))
    denses = {"trained": trained, "random": build_from_spec(meta["arch"]).eval()}
    shape = meta["input_shape"]
    inputs = {"zeros": torch.zeros(1, *shape), "randn": torch.randn(1, *shape)}
    latency = dict(batch_size=args.batch, channels_last=True, fold_bn=True, warmup=3, repeats=20)
    for xname, x in inputs.items():
        for dname, dense in denses.items():
            reductions, ms = [], {}
            for _ in range(args.rounds):
                ms = served_ms({"dense": dense, "pruned": pruned}, x, latency)
                reductions.append(1 - ms["pruned"] / ms["dense"])
            print(f"input={xname} dense={dname}: " + " ".join(f"{r:.3f}" for r in reductions)
                  + f"  (last round: dense {ms['dense']:.1f} ms, pruned {ms['pruned']:.1f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
