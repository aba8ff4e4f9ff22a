"""Sweep summaries: one row per (model, data, method, budget), mean ± std over seeds, a Pareto plot.

Reads every `<sweep>/<job>/results.json`; jobs without one are listed as unfinished (or failed,
with the error from failed.json), never fatal.
"""
from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

GROUP = ("model", "data", "method", "budget", "target")
METRICS = {  # column -> how to read it from results.json
    "top1": lambda r: r["pruned"]["top1"],
    "top5": lambda r: r["pruned"]["top5"],
    "params_reduction": lambda r: r["pruned"]["params_reduction"],
    "flops_reduction": lambda r: r["pruned"]["flops_reduction"],
    "speedup": lambda r: r["latency"]["speedup"],
    "dense_top1": lambda r: r["dense"]["top1"],
}


def collect(sweep_dir: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """(finished results, [(job dir, status)] for jobs without results)."""
    finished, missing = [], []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        res = job / "results.json"
        if res.is_file():
            try:
                finished.append({**json.loads(res.read_text()), "_job": job.name})
                continue
            except (json.JSONDecodeError, OSError) as e:
                missing.append((job.name, f"unreadable results.json ({e})"))
                continue
        failed = job / "failed.json"
        if failed.is_file():
            missing.append((job.name, "failed: " + json.loads(failed.read_text()).get("error", "?")))
        else:
            missing.append((job.name, "unfinished"))
    return finished, missing


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[tuple(r[k] for k in GROUP)].append(r)
    rows = []
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0][:3]) + (kv[0][3],)):
        row = dict(zip(GROUP, key))
        row["seeds"] = len(runs)
        for name, read in METRICS.items():
            row[name], row[f"{name}_std"] = _mean_std([read(r) for r in runs])
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(GROUP))
        w.writeheader()
        w.writerows(rows)


def markdown(rows: list[dict], missing: list[tuple[str, str]]) -> str:
    head = ("| model | data | method | budget | top-1 | top-5 | params red. | FLOPs red. | CPU speed-up "
            "| dense top-1 | seeds |\n|---|---|---|---|---|---|---|---|---|---|---|")
    pm = lambda r, k, pct=False: (f"{100 * r[k]:.2f} ± {100 * r[k + '_std']:.2f}" if pct
                                  else f"{r[k]:.2f} ± {r[k + '_std']:.2f}")
    lines = [head] + [
        f"| {r['model']} | {r['data']} | {r['method']} | {r['budget']} | {pm(r, 'top1', True)} | "
        f"{pm(r, 'top5', True)} | {pm(r, 'params_reduction', True)} | {pm(r, 'flops_reduction', True)} | "
        f"{pm(r, 'speedup')} | {pm(r, 'dense_top1', True)} | {r['seeds']} |" for r in rows]
    text = "\n".join(lines) + "\n\nAccuracies and reductions in %, mean ± std over seeds.\n"
    if missing:
        text += "\nJobs without results:\n\n" + "\n".join(f"- `{job}`: {status}" for job, status in missing) + "\n"
    return text


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, axis, label in zip(axes, ("flops_reduction", "params_reduction"), ("FLOPs", "parameter")):
        by_line = defaultdict(list)
        for r in rows:
            by_line[(r["method"], r["model"], r["data"])].append(r)
        for (method, model, data), pts in sorted(by_line.items()):
            pts.sort(key=lambda r: r[axis])
            name = method if len({(m, d) for _, m, d in by_line}) == 1 else f"{method} ({model}/{data})"
            ax.errorbar([100 * p[axis] for p in pts], [100 * p["top1"] for p in pts],
                        xerr=[100 * p[axis + "_std"] for p in pts], yerr=[100 * p["top1_std"] for p in pts],
                        marker="o", capsize=3, label=name)
        dense = [r["dense_top1"] for r in rows]
        if dense:
            ax.axhline(100 * statistics.fmean(dense), color="gray", ls="--", lw=1, label="dense")
        ax.set_xlabel(f"{label} reduction (%)" + (" — zero weights skipped" if axis == "flops_reduction" else ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle("top-1 vs reduction (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(sweep_dir: str | Path) -> tuple[list[dict], list[tuple[str, str]], str]:
    sweep_dir = Path(sweep_dir)
    finished, missing = collect(sweep_dir)
    rows = aggregate(finished)
    text = markdown(rows, missing)
    (sweep_dir / "summary.md").write_text(text)
    write_csv(rows, sweep_dir / "summary.csv")
    if rows:
        pareto_plot(rows, sweep_dir / "pareto.png")
    return rows, missing, text
