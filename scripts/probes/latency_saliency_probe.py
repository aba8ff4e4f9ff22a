"""How noisy is the one-shot latency plan's saliency? Plans from different Taylor estimates.

    python scripts/probes/latency_saliency_probe.py [--seed 0] [--budgets 0.3 0.5] [--out docs/latency_saliency_probe.json]

The one-shot latency plan (`method.allocation=halp`, `latency_importance=taylor`) reads HALP's BN
Taylor saliency from `latency.taylor_batches` (8) training batches once, at the start. HALP
re-estimates it between many prune steps. This probe asks whether 8 batches are enough: on the
benchmark's cached dense model (experiment=fashion_mnist, the seed's dense reference; trained here
if not cached), it computes the saliency from batches 0-7 (A), from batches 8-15 (B, another draw)
and from batches 0-63 (C), solves the latency plan (blocks of 8, min_keep 0.25, L1 order within a
group, on the cached latency table at batch 128) for each, and prints per group the kept counts
and how many channels A's plan keeps that B's or C's does not; plus the Spearman correlation of the
saliency vectors (scipy). Training data only. One thread.
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
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from scipy.stats import spearmanr

    from prune_lab.pipeline import build, dense_reference
    from prune_lab.sparsity import ChannelGroups
    from prune_lab.sparsity.importance import Magnitude, TaylorBN
    from prune_lab.sparsity.latency import _digest, table_for_run
    from prune_lab.sparsity.latency_allocation import solve_latency_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--out", type=Path, help="also write the numbers as JSON")
    ap.add_argument("--outputs", type=Path, default=ROOT / "outputs", help="where the dense and table caches are")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=fashion_mnist", "method=l1_filter",
                                                       "method.target=latency", "latency.batch_size=128",
                                                       f"seed={args.seed}", "budget=0.5",
                                                       f"paths.dense_dir={args.outputs / 'dense'}",
                                                       f"paths.root_dir={ROOT}", "paths.output_dir=/tmp/probe",
                                                       f"latency.table_cache={args.outputs / 'latency_tables'}"])
    torch.manual_seed(args.seed)
    dm = build(cfg.data)
    dm.check()
    model = build(cfg.model, num_classes=dm.num_classes, in_channels=dm.channels, weights=None)
    example = dm.example_input(1)
    model.load_state_dict(dense_reference(cfg, dm, model, example)["state_dict"])
    model.eval()
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    groups = ChannelGroups(model, example, ignored=[classifier])
    scorer = TaylorBN().channel_scorer()
    dm.setup("fit")
    batches = []
    for i, (x, y) in enumerate(dm.train_dataloader()):  # training data only
        if i >= 64:
            break
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        batches.append(groups.scores(scorer))
    model.zero_grad(set_to_none=True)

    def summed(lo, hi):
        return [sum(b[g] for b in batches[lo:hi]) for g in range(len(groups.sizes))]

    draws = {"A (batches 0-7)": summed(0, 8), "B (batches 8-15)": summed(8, 16), "C (batches 0-63)": summed(0, 64)}
    flat = {k: torch.cat(v).numpy() for k, v in draws.items()}
    names = list(draws)
    out = {"seed": args.seed, "groups": groups.roots, "sizes": groups.sizes,
           "spearman": {f"{a} vs {b}": float(spearmanr(flat[a], flat[b]).statistic)
                        for i, a in enumerate(names) for b in names[i + 1:]}}
    for k, v in out["spearman"].items():
        print(f"Spearman {k}: {v:.3f}")
    lat = {**{k: v for k, v in cfg.latency.items()}, "batch_size": 128}
    table = table_for_run(groups, example, lat)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    for budget in args.budgets:
        plans = {k: solve_latency_target(groups, table, scores, budget, "halp", round_to=8, values=v,
                                         min_keep=0.25)[0] for k, v in draws.items()}
        a = plans[names[0]]
        rows = []
        print(f"\nbudget {budget}: kept channels per group (A / B / C), channels A keeps that B / C drop")
        for root, size in zip(groups.roots, groups.sizes):
            kept = [int(plans[k][root].sum()) for k in names]
            diff = [int((a[root] & ~plans[k][root]).sum()) for k in names[1:]]
            rows.append({"group": root, "size": size, "kept": kept, "a_not_b": diff[0], "a_not_c": diff[1]})
            print(f"  {root:18s} {size:3d}  {kept[0]:3d} / {kept[1]:3d} / {kept[2]:3d}   {diff[0]:3d} / {diff[1]:3d}")
        total = sum(groups.sizes)
        moved = {k: sum(int((a[r] & ~plans[k][r]).sum()) for r in groups.roots) for k in names[1:]}
        print(f"  channels A keeps that the other plan drops: B {moved[names[1]]}, C {moved[names[2]]} of {total}")
        out[f"budget{budget}"] = {"rows": rows, "moved": moved, "total_channels": total}
    # the greedy looking 1 level ahead (the default) against 4 (latency.lookahead), on draw C
    for budget in args.budgets:
        print(f"\nbudget {budget}: kept per group with lookahead 1 / 4, and the Taylor value each plan keeps")
        plans = {}
        for la in (1, 4):
            plan, predicted = solve_latency_target(groups, table, scores, budget, "halp", round_to=8,
                                                   values=draws[names[2]], min_keep=0.25, lookahead=la)
            kept_value = sum(float(v[plan[r]].sum()) for r, v in zip(groups.roots, draws[names[2]]))
            plans[la] = (plan, predicted, kept_value)
        for root in groups.roots:
            print(f"  {root:18s} {int(plans[1][0][root].sum()):3d} / {int(plans[4][0][root].sum()):3d}")
        total_value = sum(float(v.sum()) for v in draws[names[2]])
        for la in (1, 4):
            print(f"  lookahead {la}: predicted reduction {plans[la][1]:.3f}, Taylor value kept "
                  f"{plans[la][2] / total_value:.4f} of the dense model's")
        out[f"lookahead_budget{budget}"] = {str(la): {"kept": {r: int(p[0][r].sum()) for r in groups.roots},
                                                      "predicted": p[1], "value_kept": p[2] / total_value}
                                            for la, p in plans.items()}
    # what the table can steer: per group, the predicted ms and the MACs one block of 8 channels
    # saves, at the dense model and at half width; equal ms per MAC everywhere would leave a latency
    # plan nothing a FLOPs plan does not already get
    flops = table.flops
    dense_ms, dense_macs = table.predict_ms(None), flops.macs()
    print(f"\nms (table) per GMAC saved by removing one block of 8 channels (dense {dense_ms:.2f} ms, "
          f"{dense_macs / 1e6:.1f} MMAC per image)")
    cost = []
    for g, (root, size) in enumerate(zip(groups.roots, groups.sizes)):
        row = {"group": root, "size": size}
        for label, kept in (("at full width", size), ("at half width", size // 2)):
            if kept - 8 < 1:
                continue
            plan = {r: torch.ones(n, dtype=torch.bool) for r, n in zip(groups.roots, groups.sizes)}
            before, after = plan.copy(), plan.copy()
            before[root] = torch.arange(size) < kept
            after[root] = torch.arange(size) < kept - 8
            d_ms = table.predict_ms(before) - table.predict_ms(after)
            d_macs = flops.macs(before) - flops.macs(after)
            row[label] = {"ms": d_ms, "macs": d_macs, "ms_per_gmac": d_ms / (d_macs * 128 / 1e9)}
        cost.append(row)
        print(f"  {root:18s} " + "   ".join(f"{k}: {v['ms']:.3f} ms / {v['macs'] * 128 / 1e9:.4f} GMAC = "
                                            f"{v['ms_per_gmac']:.1f} ms/GMAC" for k, v in row.items()
                                            if isinstance(v, dict)))
    out["cost_per_block"] = cost
    # the measured grids themselves (cached, not re-timed): each conv's ms at full input width
    # against its output channels, where the steps show
    print("\ncached grid, ms at full input width by output channels (batch 128)")
    grids = []
    for name, sig in table.sigs.items():
        if sig["kind"] != "conv" or sig.get("dw"):
            continue
        full = table.grids[_digest(sig)][-1]  # the row at full input width
        key = (sig["cin"], sig["cout"], tuple(sig["k"]), tuple(sig["stride"]), tuple(sig["hw"]))
        if key in {g["key"] for g in grids}:
            continue
        grids.append({"key": key, "layer": name, "outs": sig["outs"], "ms": full})
        print(f"  {name:20s} {sig['cin']:3d}->{sig['cout']:3d} k{sig['k'][0]} s{sig['stride'][0]} {sig['hw'][0]}px: "
              + "  ".join(f"{o}:{m:.3f}" for o, m in zip(sig["outs"], full)))
    out["grids_full_input"] = [{**g, "key": list(g["key"])} for g in grids]
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
