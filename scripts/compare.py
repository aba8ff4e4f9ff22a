"""Run named method variants over budgets × seeds and print one markdown table (mean ± std).

    python scripts/compare.py --out outputs/tables/stp --budgets 0.5 0.85 --seeds 0 1 2 \
        --variant "STP=method=stp" --variant "STP, no search=method=stp method.search=false" \
        --column "kept/dropped |w|=stp.kept_dropped_magnitude.ratio" -- experiment=quickstart

Each variant is one Hydra sweep (`train.py -m`) in `<out>/<variant>/`, so an interrupted
comparison resumes where it stopped: finished jobs are skipped. Writes `<out>/table.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def lookup(results: dict, dotted: str) -> float:
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return float("nan")  # a column that does not apply to this variant
        node = node[part]
    return float(node)


def fmt(values: list[float], pct: bool) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "–"
    scale = 100 if pct else 1
    mean = statistics.fmean(values) * scale
    std = (statistics.stdev(values) if len(values) > 1 else 0.0) * scale
    return f"{mean:.2f} ± {std:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    ap.add_argument("--variant", action="append", required=True, help='"Label=override override ..."')
    ap.add_argument("--column", action="append", default=[], help='"Label=dotted.key.in.results.json"')
    ap.add_argument("common", nargs="*", help="overrides shared by every job (after --)")
    args = ap.parse_args()
    variants = [v.split("=", 1) for v in args.variant]
    columns = [c.split("=", 1) for c in args.column]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for label, overrides in variants:
        sweep = args.out / slug(label)
        cmd = [sys.executable, str(ROOT / "train.py"), "-m", *args.common, *overrides.split(),
               f"budget={','.join(args.budgets)}", f"seed={','.join(args.seeds)}", f"hydra.sweep.dir={sweep}"]
        print(f"[compare] {label}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
    head = ["variant", "budget", "top-1 (%)", "FLOPs red. (%)", "params red. (%)", *[c for c, _ in columns], "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = []
    for budget in args.budgets:
        for label, _ in variants:
            runs = [json.loads(p.read_text()) for p in sorted((args.out / slug(label)).glob("*/results.json"))]
            runs = [r for r in runs if abs(r["budget"] - float(budget)) < 1e-9 or r["method"] == "dense"]
            dense += [r["dense"]["top1"] for r in runs]
            cells = [label, budget, fmt([r["pruned"]["top1"] for r in runs], True),
                     fmt([r["pruned"]["flops_reduction"] for r in runs], True),
                     fmt([r["pruned"]["params_reduction"] for r in runs], True)]
            cells += [fmt([lookup(r, key) for r in runs], False) for _, key in columns]
            lines.append("| " + " | ".join([*cells, str(len(runs))]) + " |")
    text = "\n".join(lines) + f"\n\nDense reference top-1: {fmt(dense, True)} %. Mean ± std over seeds.\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
