"""Studies: a paper's claim as a config file, run as ordinary jobs, judged by seed-paired statistics.

`conf/study/<name>.yaml` names the overrides every job gets (`base`), the variants (name →
overrides), the budgets and seeds, the metric, extra columns and the claims. Every job is a
plain `train.py` run in its own directory, so a study resumes where it stopped (a job with a
results.json is skipped) and any job can be re-run or inspected by hand. The verdict of a claim
"A op B" is computed from the per-seed differences A − B (the variants of one seed share the
dense reference, so the pairing removes the seed's luck): their mean, the 95 % t-interval, and

    op ">":  holds if the interval lies above 0, contradicted if below 0, else within noise
    op ">=": holds if the interval lies above −margin (A is at worst `margin` below B),
             contradicted if it lies below −margin, else within noise
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf

from prune_lab.errors import PruneLabError

ROOT = Path(__file__).resolve().parent.parent
STUDY_DIR = ROOT / "conf" / "study"
OPS = (">", ">=")
VERDICTS = ("holds", "within noise", "contradicted")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "variant"


@dataclass(frozen=True)
class Claim:
    a: str
    b: str
    op: str = ">"
    budget: float | None = None  # None: judged at every budget of the study
    margin: float = 0.0

    def text(self, budget: float) -> str:
        tail = f" (margin {self.margin:g})" if self.op == ">=" and self.margin else ""
        return f"{self.a} {self.op} {self.b} at budget {budget:g}{tail}"


@dataclass(frozen=True)
class Job:
    variant: str
    budget: float
    seed: int
    overrides: tuple[str, ...]
    directory: Path

    @property
    def done(self) -> bool:
        return (self.directory / "results.json").is_file()


@dataclass
class Study:
    name: str
    description: str
    base: list[str]
    variants: dict[str, list[str]]
    budgets: list[float]
    seeds: list[int]
    metric: str = "pruned.top1"
    columns: dict[str, str] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    # variants run at some budgets only (a diagnosis at one budget): variant -> its budgets
    only: dict[str, list[float]] = field(default_factory=dict)

    def runs_at(self, variant: str, budget: float) -> bool:
        return variant not in self.only or budget in self.only[variant]

    def config_hash(self, variant: str) -> str:
        """Hash of the overrides a variant's jobs get: editing a variant re-runs it instead of reusing old jobs."""
        blob = json.dumps([*self.base, *self.variants[variant]])
        return hashlib.sha1(blob.encode()).hexdigest()[:6]

    def variant_dir(self, out: Path, variant: str) -> Path:
        return out / "jobs" / f"{slug(variant)}-{self.config_hash(variant)}"

    def jobs(self, out: Path) -> list[Job]:
        """Seed-major order: the first job of each seed trains (and caches) that seed's dense reference."""
        return [Job(v, b, s, (*self.base, *ov, f"budget={b}", f"seed={s}"),
                    self.variant_dir(out, v) / f"b{b:g}_s{s}")
                for s in self.seeds for v, ov in self.variants.items() for b in self.budgets if self.runs_at(v, b)]


def _fail(name: str, problem: str) -> PruneLabError:
    return PruneLabError(f"study {name}: {problem}")


def load_study(name_or_path: str, seeds: list[int] | None = None, budgets: list[float] | None = None,
               extra: list[str] | None = None) -> Study:
    """Read and check a study config; `seeds`/`budgets`/`extra` override it (re-checks on other seeds)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDY_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDY_DIR.glob("*.yaml")))
        raise PruneLabError(f"unknown study '{name_or_path}'; choose one of: {known}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    name = path.stem
    unknown = set(raw) - {"description", "base", "variants", "budgets", "seeds", "metric", "columns", "claims"}
    if unknown:
        raise _fail(name, f"unknown keys {sorted(unknown)}")
    # a variant is a list of overrides, or {overrides: [...], budgets: [...]} to run at those budgets only
    variants, only = {}, {}
    for k, v in (raw.get("variants") or {}).items():
        if isinstance(v, dict):
            if set(v) - {"overrides", "budgets"} or not v.get("budgets"):
                raise _fail(name, f"variant {k!r}: give a list of overrides or {{overrides: [...], budgets: [...]}}")
            only[str(k)] = [float(b) for b in v["budgets"]]
            v = v.get("overrides")
        variants[str(k)] = [str(o) for o in (v or [])]
    if not variants:
        raise _fail(name, "no variants")
    # an extra override replaces the base's override of the same key (--set experiment=...)
    extra = [str(o) for o in extra or []]
    keys = {o.split("=", 1)[0].lstrip("+~") for o in extra}
    base = [str(o) for o in raw.get("base") or [] if str(o).split("=", 1)[0].lstrip("+~") not in keys] + extra
    study = Study(name=name, description=str(raw.get("description", "")), base=base, variants=variants,
                  budgets=[float(b) for b in (budgets or raw.get("budgets") or [])],
                  seeds=[int(s) for s in (seeds if seeds is not None else raw.get("seeds") or [0, 1, 2])],
                  metric=str(raw.get("metric", "pruned.top1")),
                  columns={str(k): str(v) for k, v in (raw.get("columns") or {}).items()}, only=only)
    if not study.budgets or any(not 0.0 <= b < 1.0 for b in study.budgets):
        raise _fail(name, f"budgets={study.budgets} must be a non-empty list of fractions in [0, 1)")
    if not study.seeds or any(s < 0 for s in study.seeds) or len(set(study.seeds)) != len(study.seeds):
        raise _fail(name, f"seeds={study.seeds} must be distinct non-negative integers")
    for c in raw.get("claims") or []:
        claim = Claim(a=str(c.get("a")), b=str(c.get("b")), op=str(c.get("op", ">")),
                      budget=None if c.get("budget") is None else float(c["budget"]),
                      margin=float(c.get("margin", 0.0)))
        for side in (claim.a, claim.b):
            if side not in variants:
                raise _fail(name, f"claim names variant {side!r}; variants are: {', '.join(variants)}")
        if claim.op not in OPS:
            raise _fail(name, f"claim op {claim.op!r} is not one of: {', '.join(OPS)}")
        if claim.margin < 0:
            raise _fail(name, f"claim margin {claim.margin} must be >= 0")
        study.claims.append(claim)
    return study


def check_overrides(study: Study) -> None:
    """Compose every variant's config once, so a typo stops the study before any job runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from prune_lab.cli import unknown_option

    for variant, overrides in study.variants.items():
        for o in [*study.base, *overrides]:  # one line for an unknown group option, as train.py says it
            problem = unknown_option(o)
            if problem:
                raise _fail(study.name, f"variant {variant!r}: {problem}")
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                compose(config_name="train", overrides=[*study.base, *overrides,
                                                        f"budget={study.budgets[0]}", f"seed={study.seeds[0]}"])
        except Exception as e:  # Hydra's errors are multi-line; the first line names the problem
            raise _fail(study.name, f"variant {variant!r}: {str(e).splitlines()[0]}") from None
        finally:
            GlobalHydra.instance().clear()


# -- statistics ---------------------------------------------------------------------------------
def lookup(results: dict, dotted: str) -> float:
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return float("nan")  # a column that does not apply to this variant
        node = node[part]
    try:
        return float(node)
    except (TypeError, ValueError):
        return float("nan")


def paired_verdict(diffs: list[float], op: str, margin: float = 0.0) -> dict:
    """Mean of the seed-paired differences, its 95 % t-interval and the verdict (module docstring)."""
    from scipy import stats

    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": diffs[0] if diffs else float("nan"), "ci95": [float("nan")] * 2,
                "verdict": "not enough seeds"}
    mean = statistics.fmean(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    bound = 0.0 if op == ">" else -margin
    verdict = "holds" if lo > bound else "contradicted" if hi < bound else "within noise"
    return {"n": n, "mean": mean, "ci95": [lo, hi], "verdict": verdict}


def carried_rows(study: Study, report: Path) -> dict[tuple[str, float, int], dict]:
    """Rows of an earlier report (its table.csv) whose variant still has the same overrides.

    Job folders live in outputs/, which does not outlive a machine; the committed table.csv does.
    A study longer than a session is continued from it: a job with a carried row is not run again.
    Rows without a `config` column (written before it existed) or with another hash are ignored.
    """
    path = report / "table.csv"
    if not path.is_file():
        return {}
    carried = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            variant = row.get("variant")
            if variant not in study.variants or row.get("config") != study.config_hash(variant):
                continue
            parsed = {k: (v if k in ("variant", "config") else int(v) if k == "seed" else float(v or "nan"))
                      for k, v in row.items() if k is not None}
            for label in study.columns:  # a column added to the study since: unknown for the old rows
                parsed.setdefault(label, float("nan"))
            carried[(variant, parsed["budget"], parsed["seed"])] = parsed
    return carried


def collect(study: Study, out: Path, carried: dict | None = None) -> list[dict]:
    """One row per finished job (variant, budget, seed, config hash, the metric and every column);
    a job not finished under `out` takes its carried row (`carried_rows`) if there is one."""
    rows = []
    carried = carried or {}
    jobs = study.jobs(out)
    for job in jobs:
        if not job.done:
            if (job.variant, job.budget, job.seed) in carried:
                rows.append(carried[(job.variant, job.budget, job.seed)])
            continue
        r = json.loads((job.directory / "results.json").read_text())
        row = {"variant": job.variant, "budget": job.budget, "seed": job.seed,
               "config": study.config_hash(job.variant),
               "metric": lookup(r, study.metric), "dense_top1": lookup(r, "dense.top1"),
               "flops_reduction": lookup(r, "pruned.flops_reduction"),
               "params_reduction": lookup(r, "pruned.params_reduction"),
               "train_wall_s": lookup(r, "train.total_wall_s")}
        row.update({label: lookup(r, key) for label, key in study.columns.items()})
        rows.append(row)
    # rows of budgets or seeds outside this selection (`--budgets 0.5` on a study whose report holds
    # 0.85 too) stay in the report: writing it never loses a finished job
    selected = {(j.variant, j.budget, j.seed) for j in jobs}
    order = list(study.variants)
    rows += sorted((r for k, r in carried.items() if k not in selected),
                   key=lambda r: (r["seed"], order.index(r["variant"]), r["budget"]))
    return rows


def covering(study: Study, rows: list[dict]) -> Study:
    """The study with its budgets and seeds widened to every row's (see `collect`)."""
    return replace(study, budgets=sorted({*study.budgets, *(r["budget"] for r in rows)}),
                   seeds=sorted({*study.seeds, *(r["seed"] for r in rows)}))


def verdicts(study: Study, rows: list[dict]) -> list[dict]:
    value = {(r["variant"], r["budget"], r["seed"]): r["metric"] for r in rows}
    out = []
    for claim in study.claims:
        for budget in [claim.budget] if claim.budget is not None else study.budgets:
            seeds = [s for s in study.seeds if (claim.a, budget, s) in value and (claim.b, budget, s) in value]
            diffs = [value[(claim.a, budget, s)] - value[(claim.b, budget, s)] for s in seeds]
            run = budget in study.budgets and study.runs_at(claim.a, budget) and study.runs_at(claim.b, budget)
            v = paired_verdict(diffs, claim.op, claim.margin) if run else \
                {"n": 0, "mean": float("nan"), "ci95": [float("nan")] * 2, "verdict": "budget not run"}
            out.append({"claim": claim.text(budget), "a": claim.a, "b": claim.b, "op": claim.op,
                        "budget": budget, "margin": claim.margin, "metric": study.metric, "seeds": seeds,
                        "diffs": diffs, **v})
    return out


# -- report -------------------------------------------------------------------------------------
def _mean_std(values: list[float], scale: float) -> str:
    values = [v for v in values if v == v]  # NaN: the column does not apply
    if not values:
        return "–"
    mean, std = scale * statistics.fmean(values), scale * (statistics.stdev(values) if len(values) > 1 else 0.0)
    digits = 2 if abs(mean) >= 0.1 or mean == 0 else 4  # small quantities (a loss change) keep their digits
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(study: Study, rows: list[dict], report: Path) -> list[dict]:
    """table.md, table.csv (one row per job: the verdicts can be recomputed from it), verdicts.json, plot.png."""
    report.mkdir(parents=True, exist_ok=True)
    judged = verdicts(study, rows)
    fields = ["variant", "budget", "seed", "config", "metric", "dense_top1", "flops_reduction", "params_reduction",
              "train_wall_s", *study.columns]
    with open(report / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    pct = 100.0 if study.metric.endswith(("top1", "top5")) else 1.0
    head = ["variant", "budget", f"{study.metric}{' (%)' if pct == 100 else ''}", "FLOPs red. (%)",
            "params red. (%)", *study.columns, "seeds"]
    lines = [f"# Study `{study.name}`", "", study.description, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in study.budgets:
        for variant in study.variants:
            sel = [r for r in rows if r["variant"] == variant and r["budget"] == budget]
            if not sel and not study.runs_at(variant, budget):
                continue
            cells = [variant, f"{budget:g}", _mean_std([r["metric"] for r in sel], pct),
                     _mean_std([r["flops_reduction"] for r in sel], 100), _mean_std([r["params_reduction"] for r in sel], 100)]
            cells += [_mean_std([r[c] for r in sel], 1.0) for c in study.columns]
            lines.append("| " + " | ".join([*cells, str(len(sel))]) + " |")
    dense = {r["seed"]: r["dense_top1"] for r in rows}
    lines += ["", f"Dense reference top-1: {_mean_std(list(dense.values()), 100)} % over seeds "
                  f"{sorted(dense)}. Mean ± std over seeds.", ""]
    # carried rows (an earlier session's jobs) pair with fresh ones only if the dense reference is the same
    mixed = False
    for budget in study.budgets:
        for seed in study.seeds:
            refs = {r["dense_top1"] for r in rows if r["seed"] == seed and r["budget"] == budget and r["dense_top1"] == r["dense_top1"]}
            if len(refs) > 1:
                mixed = True
                lines += [f"Warning: at budget {budget:g} the rows of seed {seed} have different dense references "
                          f"(top-1 {', '.join(f'{100 * v:.2f}' for v in sorted(refs))} %): their pairing is not exact.", ""]
    if judged:
        lines += ["| claim | seeds | mean difference | 95 % CI | verdict |", "|---|---|---|---|---|"]
        for v in judged:
            lo, hi = v["ci95"]
            lines.append(f"| {v['claim']} | {v['n']} | {pct * v['mean']:+.2f} | "
                         f"[{pct * lo:+.2f}, {pct * hi:+.2f}] | **{v['verdict']}** |")
        pairing = ("some seeds' rows come from different dense references, see the warnings above" if mixed
                   else "each seed's variants share one dense reference")
        lines += ["", f"Differences of {study.metric}{' in points' if pct == 100 else ''}, paired by seed "
                      f"({pairing}); 95 % t-interval over seeds.", ""]
    (report / "table.md").write_text("\n".join(lines))
    (report / "verdicts.json").write_text(json.dumps(judged, indent=2))
    if rows:
        from prune_lab.study_plots import plot

        plot(study, rows, report / "plot.png", pct)
    return judged


# -- running ------------------------------------------------------------------------------------
def run_jobs(jobs: list[Job], workers: int, threads: int, python: str, progress=None) -> list[tuple[Job, int]]:
    """Run the unfinished jobs, `workers` at a time, each `train.py` process with `threads` threads.

    The first job of each seed runs before that seed's others start: it trains the seed's dense
    reference, which the others then read from the cache instead of training it again in parallel.
    Returns (job, exit code) for the jobs that failed.
    """
    import os
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from prune_lab import quiet

    todo = [j for j in jobs if not j.done]
    leaders: dict[int, Job] = {}
    for j in todo:
        leaders.setdefault(j.seed, j)
    ready = {s: threading.Event() for s in leaders}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    # one lock for every study on this machine: a job measuring latency pauses the others' batches
    env.setdefault(quiet.ENV, str(ROOT / "outputs" / "quiet.lock"))
    failed: list[tuple[Job, int]] = []

    def one(job: Job) -> None:
        if leaders[job.seed] is not job:
            ready[job.seed].wait()
        try:
            job.directory.mkdir(parents=True, exist_ok=True)
            with open(job.directory / "run.log", "a") as log:
                cmd = [python, str(ROOT / "train.py"), *job.overrides, f"hydra.run.dir={job.directory}",
                       "callbacks.progress_bar.leave=false"]
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc:
                failed.append((job, rc))
        finally:
            if leaders[job.seed] is job:
                ready[job.seed].set()
            if progress is not None:
                progress(job)

    # leaders are queued first, so a worker never waits for a leader that no worker has taken
    order = list(leaders.values()) + [j for j in todo if leaders[j.seed] is not j]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, order))
    return failed
