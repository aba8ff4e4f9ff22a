"""A study's report: table.csv (one row per job), table.md, verdicts.json, plot.png and forest.png.

verdicts.json is the one source of every comparison a reader sees: `scripts/study.py --summary`
(prune_lab/results_summary.py) turns the committed ones into docs/results.md and the README's
"Results at a glance" block.
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from prune_lab.study import Study, scale, verdicts
from prune_lab.verdicts import ALPHA, EXPLORATORY_SEEDS, PRIMARY_SEEDS, label

SCHEMA = 2  # verdicts.json: an object with the study's facts and its claims (1: a bare list of claims)


def _mean_std(values: list[float], pts: float) -> str:
    values = [v for v in values if v == v]  # NaN: the column does not apply
    if not values:
        return "–"
    mean, std = pts * statistics.fmean(values), pts * (statistics.stdev(values) if len(values) > 1 else 0.0)
    digits = 2 if abs(mean) >= 0.1 or mean == 0 else 4  # small quantities (a loss change) keep their digits
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _sides(claim: dict, rows: list[dict], pts: float) -> dict:
    """Mean ± std of A and B over the seeds the claim paired: points of the metric, or the claim's column."""
    key, unit = (claim["column"], 1.0) if claim.get("column") else ("metric", pts)
    out = {}
    for side in ("a", "b"):
        vals = [unit * r[key] for r in rows if r["variant"] == claim[side] and r["budget"] == claim["budget"]
                and r["seed"] in claim["seeds"]]
        out[f"{side}_mean"] = statistics.fmean(vals) if vals else float("nan")
        out[f"{side}_std"] = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return out


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:+.2f}"


def claims_table(judged: list[dict]) -> list[str]:
    """The claims as a markdown table: primary claims first, raw and adjusted verdicts side by side."""
    lines = ["| claim | kind | seeds | mean difference | 95 % CI | raw verdict | verdict |", "|---|---|---|---|---|---|---|"]
    for v in sorted(judged, key=lambda v: not v["primary"]):
        lo, hi = v["ci95"]
        kind = v["label"] + (f", Holm p = {v['adjusted_p']:.3g} of {v['family']}" if "adjusted_p" in v else "")
        seeds = str(v["n"]) + (f" (excl. {', '.join(v['excluded'])})" if v["excluded"] else "")
        lines.append(f"| {v['claim']} | {kind} | {seeds} | {_fmt(v['mean'])} | [{_fmt(lo)}, {_fmt(hi)}] | "
                     f"{label(v['raw_verdict'], v['margin'])} | **{label(v['verdict'], v['margin'])}** |")
    return lines


def write_report(study: Study, rows: list[dict], report: Path) -> list[dict]:
    """table.md, table.csv (the verdicts can be recomputed from it), verdicts.json, plot.png, forest.png."""
    report.mkdir(parents=True, exist_ok=True)
    judged = verdicts(study, rows)
    pts = scale(study.metric)
    for v in judged:
        v.update(_sides(v, rows, pts))
    fields = ["variant", "budget", "seed", "config", "cpu_kind", "metric", "val_top1", "dense_top1", "flops_reduction",
              "params_reduction", "train_wall_s", *study.columns]
    with open(report / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    head = ["variant", "budget", f"{study.metric}{' (%)' if pts == 100 else ''}", "FLOPs red. (%)",
            "params red. (%)", *study.columns, "seeds"]
    lines = [f"# Study `{study.name}`", "", study.description, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in study.budgets:
        for variant in study.variants:
            sel = [r for r in rows if r["variant"] == variant and r["budget"] == budget]
            if not sel and not study.runs_at(variant, budget):
                continue
            cells = [variant, f"{budget:g}", _mean_std([r["metric"] for r in sel], pts),
                     _mean_std([r["flops_reduction"] for r in sel], 100), _mean_std([r["params_reduction"] for r in sel], 100)]
            cells += [_mean_std([r.get(c, float("nan")) for r in sel], 1.0) for c in study.columns]
            lines.append("| " + " | ".join([*cells, str(len(sel))]) + " |")
    dense = {r["seed"]: r["dense_top1"] for r in rows}
    kinds: dict[int, set[str]] = {}
    for r in rows:
        kinds.setdefault(r["seed"], set()).add(r.get("cpu_kind") or "unknown")
    per_seed = ", ".join(f"{s}: {' + '.join(sorted(k))}" for s, k in sorted(kinds.items()))
    lines += ["", f"Dense reference top-1: {_mean_std(list(dense.values()), 100)} % over seeds {sorted(dense)}. "
                  f"Mean ± std over seeds. CPU kind per seed: {per_seed}.", ""]
    for seed, k in sorted(kinds.items()):
        if len(k) > 1:
            lines += [f"Warning: the rows of seed {seed} come from different CPU kinds ({', '.join(sorted(k))}): claims "
                      "whose two variants differ in it leave the seed out (`excluded`).", ""]
    for budget in study.budgets:
        for seed in study.seeds:
            refs = {r["dense_top1"] for r in rows if r["seed"] == seed and r["budget"] == budget
                    and r["dense_top1"] == r["dense_top1"]}
            if len(refs) > 1:
                lines += [f"Warning: at budget {budget:g} the rows of seed {seed} come from different dense references "
                          f"(top-1 {', '.join(f'{100 * v:.2f}' for v in sorted(refs))} %): claims whose two variants "
                          "differ in it leave the seed out (`excluded`).", ""]
    if judged:
        lines += claims_table(judged)
        lines += ["", f"Differences of {study.metric}{' in points' if pts == 100 else ''} (a claim naming a column: of "
                      "that column, signed so that > 0 favours A), paired by seed; 95 % "
                      f"t-interval. Primary claims need {PRIMARY_SEEDS} seeds and are Holm-adjusted across the study's "
                      f"primaries (one-sided α = {ALPHA}); exploratory claims need {EXPLORATORY_SEEDS} and are not "
                      "adjusted. Verdicts: better (low end > 0), worse (high end < 0), not worse (low end > −margin), "
                      "equivalent (two one-sided tests at the margin, `==` claims only), within noise. "
                      "forest.png draws every claim on the metric.", ""]
    # pictures first, so that the table links only the ones drawn: a selection study (no claims),
    # or one whose claims have no paired seeds yet, has no forest plot
    from prune_lab.study_plots import forest, plot

    if rows:
        plot(study, rows, report / "plot.png", pts)
    if judged and forest(study.name, judged, report / "forest.png"):
        lines += ["![every claim's paired difference with its 95 % interval](forest.png)", ""]
    if rows:
        lines += ["![the metric against the budget, mean ± std over seeds](plot.png)", ""]
    if (report / "curves.png").is_file():
        lines += ["![validation top-1 per epoch](curves.png)", ""]
    if (report / "exploration.png").is_file():
        lines += ["![what each grow does: units grown per cycle, never-active ones dashed; loss change at "
                  "the grow against the grown units at zero](exploration.png)", ""]
    (report / "table.md").write_text("\n".join(lines))
    meta = {"schema": SCHEMA, "study": study.name, "description": study.description, "paradigm": study.paradigm,
            "base": study.base, "metric": study.metric, "benchmark": _benchmark(study.base),
            "cpu": sorted(set().union(*kinds.values())), "seeds": sorted(dense), "claims": judged}
    (report / "verdicts.json").write_text(json.dumps(meta, indent=2))
    return judged


def _benchmark(base: list[str]) -> str:
    for o in base:
        if o.startswith("experiment="):
            return o.split("=", 1)[1]
    return ""


def read_verdicts(path: Path) -> dict:
    """A verdicts.json as an object (schema 2)."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        raise ValueError(f"{path} is a schema-1 verdicts.json (a bare list); re-write it with "
                         "`python scripts/study.py <study> --report-only --report <folder>`")
    return data
