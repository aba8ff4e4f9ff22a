"""Pictures of a study: the metric against the budget (`plot.png`, from the rows), the
validation accuracy against the epoch (`curves.png`) and, for runs that explore (IEE), what each
grow does (`exploration.png`): the last two from the job folders on this machine and the per-run
records an earlier report kept beside them (`curves.csv`, `exploration.csv`)."""
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


def _earlier_records(study, path: Path) -> list[dict]:
    """Rows of a per-run csv written by an earlier report (`curves.csv`, `exploration.csv`) whose
    variant still has the same overrides (its `config` hash). Job folders live in outputs/, which
    does not outlive a machine; these committed files do, so a study continued over several
    sessions draws every seed, like its table. A file written before it had a seed column: none."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("seed") and r.get("variant") in study.variants
                and r.get("config") == study.config_hash(r["variant"])]


def run_curves(study, jobs, path: Path, key: str = "val/top1") -> dict[tuple[float, str, int], dict[int, float]]:
    """(budget, variant, seed) -> {epoch: `key`}: the finished jobs' logged curves and, for runs
    whose folder is not on this machine, the ones an earlier report kept in `path` (a per-run csv)."""
    runs: dict = {}
    for r in _earlier_records(study, path):
        if r.get(key):
            runs.setdefault((float(r["budget"]), r["variant"], int(r["seed"])), {})[int(r["epoch"]) - 1] = float(r[key])
    for job in jobs:
        curve = read_curve(job.directory, key) if job.done else {}
        if curve:
            runs[(job.budget, job.variant, job.seed)] = curve
    return runs


def mean_curves(study, runs: dict) -> dict[tuple[float, str], tuple[int, dict[int, float]]]:
    """(budget, variant) -> (runs, {epoch: mean over them, at the epochs every run has}), in the
    study's variant order, from `run_curves`."""
    found: dict = {}
    for (budget, variant, _), curve in sorted(runs.items(), key=lambda kv: kv[0][2]):
        found.setdefault((budget, variant), []).append(curve)
    out = {}
    for budget in sorted({b for b, _ in found}):
        for variant in study.variants:
            curves_ = found.get((budget, variant))
            if curves_:
                epochs = sorted(set.intersection(*(set(c) for c in curves_)))
                out[(budget, variant)] = (len(curves_), {e: statistics.fmean(c[e] for c in curves_) for e in epochs})
    return out


def _order(study, key: tuple) -> tuple:
    budget, variant, seed = key
    return budget, list(study.variants).index(variant), seed


def curves(study, jobs, path: Path, key: str = "val/top1") -> int:
    """Mean over seeds of `key` per epoch, one line per variant, one panel per budget: `path` (png).
    Every run's curve goes to `path` with suffix .csv (budget, variant, seed, config hash, epoch
    counted from 1, value), which a later report reads back for the runs no longer on the machine.
    Returns the number of runs drawn (0: nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = run_curves(study, jobs, path.with_suffix(".csv"), key)
    if not runs:
        return 0
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "variant", "seed", "config", "epoch", key])
        for k in sorted(runs, key=lambda k: _order(study, k)):
            b, v, s = k
            w.writerows([b, v, s, study.config_hash(v), e + 1, round(m, 6)] for e, m in sorted(runs[k].items()))
    means = mean_curves(study, runs)
    budgets = sorted({b for b, _ in means})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for i, variant in enumerate(study.variants):
            if (budget, variant) not in means:
                continue
            n, curve = means[(budget, variant)]
            # colour by the variant's position in the study (the same in every panel); past the ten
            # colours of the cycle the line style changes, so no two variants look alike
            ax.plot([e + 1 for e in curve], [100 * m for m in curve.values()],
                    marker=".", color=f"C{i % 10}", linestyle=("-", "--", ":")[i // 10 % 3],
                    label=f"{variant} ({n})")
        ax.set_title(f"budget {budget:g}: {key}, mean over (n) seeds")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(runs)


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


EXPLORATION_HEADER = ["budget", "variant", "seed", "config", "record", "cycle or step", "grown or loss increase",
                      "never active"]


def run_explorations(study, jobs, path: Path) -> dict[tuple[float, str, int], dict[str, list[tuple]]]:
    """(budget, variant, seed) -> `read_exploration`'s record, from the finished jobs and, for runs
    whose folder is not on this machine, from an earlier report's per-run csv at `path`."""
    runs: dict = {}
    for r in _earlier_records(study, path):
        if r["record"] == "turnover":  # unit counts
            point = (int(r["cycle or step"]), int(r["grown or loss increase"]), int(r["never active"]))
        else:
            point = (int(r["cycle or step"]), float(r["grown or loss increase"]))
        runs.setdefault((float(r["budget"]), r["variant"], int(r["seed"])), {}).setdefault(r["record"], []).append(point)
    for job in jobs:
        record = read_exploration(job.directory) if job.done else {}
        if record:
            runs[(job.budget, job.variant, job.seed)] = record
    return runs


def exploration(study, jobs, path: Path) -> int:
    """For runs that record their grows (IEE): units grown per cycle and how many of them were never
    active before (left), and the training loss with the grown values minus the loss with the grown
    units at zero, per grow (right; above 0: the values the grow gives hurt). Mean over seeds per
    (budget, variant), over the grows every seed has. Every run's record goes to `path` with suffix
    .csv, which a later report reads back for the runs no longer on the machine.
    Returns the number of runs drawn (0: nothing written)."""
    runs = run_explorations(study, jobs, path.with_suffix(".csv"))
    if not runs:
        return 0
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(EXPLORATION_HEADER)
        for k in sorted(runs, key=lambda k: _order(study, k)):
            b, v, s = k
            for what in ("turnover", "grow_loss"):
                w.writerows([b, v, s, study.config_hash(v), what, x, *(round(a, 6) for a in vals), *[""] * (2 - len(vals))]
                            for x, *vals in runs[k].get(what, []))
    found: dict = {}
    for k in sorted(runs, key=lambda k: _order(study, k)):
        found.setdefault(k[:2], []).append(runs[k])
    means: dict = {}  # (budget, variant, record) -> (runs, [(x, mean of each value)])
    for (budget, variant), records in found.items():
        for what in ("turnover", "grow_loss"):
            seeds = [r[what] for r in records if what in r]
            if seeds:
                means[(budget, variant, what)] = (len(seeds), [
                    (rows[0][0], *(statistics.fmean(v) for v in zip(*(row[1:] for row in rows))))
                    for rows in zip(*seeds)])  # zip: the grows every run has
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
    return len(runs)


def forest(name: str, judged: list[dict], path: Path) -> bool:
    """Every claim's seed-paired difference with its 95 % interval, lines at 0 and at −margin:
    the differences that decide the verdicts, on their own scale (plot.png's axis spans every variant).
    False (and no file, an earlier one removed) when no claim on the metric has a difference yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune_lab.verdicts import label

    # one axis, one unit: a claim on another quantity (a training cost) is in the table only
    shown = [v for v in judged if v["mean"] == v["mean"] and not v.get("column")]
    if not shown:
        path.unlink(missing_ok=True)
        return False
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
    return True


def _short(text: str, width: int = 75) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
