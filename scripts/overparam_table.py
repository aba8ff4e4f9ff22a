"""The over-parameterization study in one command: budgets × seeds × {vanilla, +SP-KD, +expansion, both}.

    python scripts/overparam_table.py                      # digits quick-start, 50/70/90 % FLOPs, 3 seeds
    python scripts/overparam_table.py --budgets 0.5 --seeds 0 -- trainer=gpu   # extra Hydra overrides after --

Every job is a normal prune_lab run (`method=overparam` with the two switches) composed from the
real config and written to `<out>/b<budget>_s<seed>_<variant>/`; jobs with a results.json are
skipped, so re-running after an interruption finishes the rest. All jobs of a seed share one
cached dense reference and the same pruned network (L1 filter, physically shrunk): the four
variants differ only in the fine-tuning. Prints a markdown table (mean ± std of test top-1 over
seeds) and writes it to `<out>/table.md`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: (expand, spkd)
    "vanilla fine-tuning": (False, False),
    "+SP-KD": (False, True),
    "+expansion": (True, False),
    "expansion + SP-KD": (True, True),
}


def run_job(overrides: list[str], out: Path, dense_dir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from prune_lab.pipeline import run

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"paths.output_dir={out}", f"paths.root_dir={ROOT}",
                                                      f"paths.dense_dir={dense_dir}", "~callbacks.progress_bar"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "w") as log, contextlib.redirect_stdout(log):
        return run(cfg)


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--experiment", default="quickstart")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "overparam_table")
    p.add_argument("--dense-dir", type=Path, default=ROOT / "outputs" / "dense")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = p.parse_args()

    rows: dict[tuple[float, str], list[float]] = {}
    info: dict[float, dict] = {}
    t0 = time.time()
    for budget in args.budgets:
        for seed in args.seeds:
            for variant, (expand, spkd) in VARIANTS.items():
                tag = variant.replace(" ", "").replace("+", "p")
                out = args.out / f"b{budget}_s{seed}_{tag}"
                t = time.time()
                r = run_job([f"experiment={args.experiment}", "method=overparam", f"budget={budget}", f"seed={seed}",
                             f"method.expand={str(expand).lower()}", f"method.spkd={str(spkd).lower()}",
                             *args.overrides], out, args.dense_dir)
                print(f"b={budget} seed={seed} {variant:20s} top-1 {r['pruned']['top1']:.4f} ({time.time() - t:.0f} s)",
                      file=sys.stderr, flush=True)
                rows.setdefault((budget, variant), []).append(r["pruned"]["top1"])
                info.setdefault(budget, {"dense": [], "params": r["pruned"]["params"],
                                         "flops_red": r["pruned"]["flops_reduction"], "model": r["model"],
                                         "data": r["data"], "epochs": r["train"]["epochs"]})
                if variant == "vanilla fine-tuning":
                    info[budget]["dense"].append(r["dense"]["top1"])

    any_info = next(iter(info.values()))
    lines = [f"{any_info['model']} on {any_info['data']}, L1-filter pruning, test top-1 (%) mean ± std over "
             f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))})", "",
             "| FLOPs budget | FLOPs red. | params | dense | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|---|" + "---|" * len(VARIANTS)]
    for budget in args.budgets:
        i = info[budget]
        cells = [fmt(rows[(budget, v)]) for v in VARIANTS]
        lines.append(f"| {budget:.0%} | {100 * i['flops_red']:.1f} % | {i['params']:,} | {fmt(i['dense'])} | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    print(f"\n{len(rows) * len(args.seeds)} jobs, {time.time() - t0:.0f} s; runs in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
