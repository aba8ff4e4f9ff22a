"""Pictures of a study: the metric against the budget (`plot.png`, from the rows), the
validation accuracy against the epoch (`curves.png`) and, for runs that explore (IEE), what each
grow does (`exploration.png`): the last two from the job folders still on this machine."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path


def plot(study: Study, rows: list[dict], path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, variant in enumerate(study.variants):
        xs, ys, es = [], [], []
        for budget in study.budgets:
            vals = [r["metric"] for r in rows if r["variant"] == variant and r["budget"] == budget and r["metric"] == r["metric"]]
            if vals:
                xs.append(budget + (i - len(study.variants) / 2) * 0.002)  # a small dodge keeps error bars apart
                ys.append(scale * statistics.fmean(vals))
                es.append(scale * (statistics.stdev(vals) if len(vals) > 1 else 0.0))
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=variant)
    dense = [r["dense_top1"] for r in rows if r["dense_top1"] == r["dense_top1"]]
    if dense and study.metric.endswith("top1"):
        ax.axhline(100 * statistics.fmean(dense), color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("budget")
    ax.set_ylabel(study.metric + (" (%)" if scale == 100 else ""))
    ax.set_title(f"study {study.name}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_curve(job_dir: Path, key: str = "val/top1") -> dict[int, float]:
    """Epoch -> the run's logged `key` (csv/metrics.csv of a train.py run); {} if it has none."""
    path = job_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {int(r["epoch"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def mean_curves(study, jobs, key: str = "val/top1") -> dict[tuple[float, str], tuple[int, dict[int, float]]]:
    """(budget, variant) -> (runs, {epoch: mean of `key` over them}), in the study's variant order,
    from the finished jobs whose folders exist (rows carried from another machine have no curve)."""
    found: dict = {}
    for job in jobs:
        curve = read_curve(job.directory, key) if job.done else {}
        if curve:
            found.setdefault((job.budget, job.variant), []).append(curve)
    out = {}
    for budget in sorted({b for b, _ in found}):
        for variant in study.variants:
            runs = found.get((budget, variant))
            if runs:
                epochs = sorted(set.intersection(*(set(c) for c in runs)))
                out[(budget, variant)] = (len(runs), {e: statistics.fmean(c[e] for c in runs) for e in epochs})
    return out


def curves(study, jobs, path: Path, key: str = "val/top1") -> int:
    """Mean over seeds of `key` per epoch, one line per variant, one panel per budget: `path` (png)
    and the same numbers in `path` with suffix .csv (budget, variant, runs, epoch counted from 1,
    mean). Returns the number of runs drawn (0: nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_curves(study, jobs, key)
    if not means:
        return 0
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "variant", "runs", "epoch", key])
        w.writerows([b, v, n, e + 1, round(m, 6)] for (b, v), (n, curve) in means.items() for e, m in curve.items())
    budgets = sorted({b for b, _ in means})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for i, variant in enumerate(study.variants):
            if (budget, variant) not in means:
                continue
            runs, curve = means[(budget, variant)]
            # colour by the variant's position in the study (the same in every panel); past the ten
            # colours of the cycle the line style changes, so no two variants look alike
            ax.plot([e + 1 for e in curve], [100 * m for m in curve.values()],
                    marker=".", color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3],
                    label=f"{variant} ({runs})")
        ax.set_title(f"budget {budget:g}: {key}, mean over (n) seeds")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return sum(n for n, _ in means.values())


def read_exploration(job_dir: Path) -> dict[str, list[tuple]]:
    """A finished IEE run's record of its grows (results.json `train.turnover` and
    `train.grow_loss`): {"turnover": [(cycle, grown, never active before)], "grow_loss": [(step,
    loss with the grown values − loss with them at zero)]}; {} for a run without them."""
    path = job_dir / "results.json"
    train = json.loads(path.read_text()).get("train", {}) if path.is_file() else {}
    out = {}
    if train.get("turnover", {}).get("per_grow"):
        out["turnover"] = [(r["cycle"], r["grown"], r["never_active"]) for r in train["turnover"]["per_grow"]]
    if train.get("grow_loss", {}).get("per_grow"):
        out["grow_loss"] = [(r["step"], r["loss"] - r["loss_at_zero"]) for r in train["grow_loss"]["per_grow"]]
    return out


def exploration(study, jobs, path: Path) -> int:
    """For runs that record their grows (IEE): units grown per cycle and how many of them were never
    active before (left), and the training loss with the grown values minus the loss with the grown
    units at zero, per grow (right; above 0: the values the grow gives hurt). Mean over seeds per
    (budget, variant), over the grows every seed has; the numbers in `path` with suffix .csv.
    Returns the number of runs drawn (0: nothing written)."""
    found: dict = {}
    for job in jobs:
        record = read_exploration(job.directory) if job.done else {}
        if record:
            found.setdefault((job.budget, job.variant), []).append(record)
    if not found:
        return 0
    means: dict = {}  # (budget, variant, record) -> (runs, [(x, mean of each value)])
    for (budget, variant), records in found.items():
        for what in ("turnover", "grow_loss"):
            runs = [r[what] for r in records if what in r]
            if runs:
                means[(budget, variant, what)] = (len(runs), [
                    (rows[0][0], *(statistics.fmean(v) for v in zip(*(row[1:] for row in rows))))
                    for rows in zip(*runs)])  # zip: the grows every run has
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "variant", "record", "runs", "cycle or step", "grown or loss increase", "never active"])
        w.writerows([b, v, what, n, x, *(round(a, 6) for a in vals)] for (b, v, what), (n, pts) in means.items()
                    for x, *vals in pts)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({b for b, _, _ in means})
    fig, axes = plt.subplots(len(budgets), 2, figsize=(13, 4.2 * len(budgets)), squeeze=False)
    for (left, right), budget in zip(axes, budgets):
        for i, variant in enumerate(study.variants):
            style = dict(color=f"C{i % 10}", marker=".")
            if (budget, variant, "turnover") in means:
                n, pts = means[(budget, variant, "turnover")]
                left.plot([p[0] + 1 for p in pts], [p[1] for p in pts], label=f"{variant} ({n} seeds)", **style)
                left.plot([p[0] + 1 for p in pts], [p[2] for p in pts], ls="--", **style)
            if (budget, variant, "grow_loss") in means:
                n, pts = means[(budget, variant, "grow_loss")]
                right.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{variant} ({n} seeds)", **style)
        left.set(title=f"budget {budget:g}: units grown per cycle (dashed: never active before)",
                 xlabel="cycle", yscale="log")
        right.axhline(0, color="black", lw=1)
        right.set(title=f"budget {budget:g}: loss, grown values − grown units at zero", xlabel="step")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return sum(len(records) for records in found.values())


def forest(name: str, judged: list[dict], path: Path) -> None:
    """Every claim's seed-paired difference with its 95 % interval, lines at 0 and at −margin:
    the differences that decide the verdicts, on their own scale (plot.png's axis spans every variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune_lab.verdicts import label

    # one axis, one unit: a claim on another quantity (a training cost) is in the table only
    shown = [v for v in judged if v["mean"] == v["mean"] and not v.get("column")]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.36 * len(shown)))
    for i, v in enumerate(reversed(shown)):
        lo, hi = v["ci95"]
        color = {"better": "tab:green", "worse": "tab:red", "not worse": "tab:blue",
                 "equivalent": "tab:blue"}.get(v["verdict"], "gray")
        ax.errorbar(v["mean"], i, xerr=[[v["mean"] - lo], [hi - v["mean"]]], fmt="D" if v["primary"] else "o",
                    color=color, capsize=3, ms=6 if v["primary"] else 4)
        ax.plot([-v["margin"]] * 2, [i - 0.35, i + 0.35], color="tab:orange", lw=1.5)
        ax.annotate(f"{label(v['verdict'], v['margin'])} (n={v['n']})", (1.01, i), xycoords=("axes fraction", "data"),
                    va="center", fontsize=7, color=color)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([_short(f"{'[P] ' if v['primary'] else ''}{v['a']} − {v['b']} @ {v['budget']:g}")
                        for v in reversed(shown)], fontsize=7)
    ax.set_xlabel(f"{shown[0]['units']}: A − B, mean and 95 % interval over seeds; orange: −margin")
    ax.set_title(f"study {name}: every claim ([P] primary, diamonds; verdict on the right)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.subplots_adjust(right=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _short(text: str, width: int = 75) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
