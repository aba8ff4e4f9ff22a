"""Studies: a paper's claim as a config file, run as ordinary jobs, judged by seed-paired statistics.

`conf/study/<name>.yaml` names the overrides every job gets (`base`), the variants (name →
overrides), the budgets and seeds, the metric, extra columns and the claims. Every job is a
plain `train.py` run in its own directory, so a study resumes where it stopped (a job with a
results.json is skipped) and any job can be re-run or inspected by hand. A claim "A op B" is
judged from the per-seed differences A − B (prune_lab/verdicts.py: the vocabulary, margins in
points, primary claims with Holm's adjustment); the report (tables, plots, verdicts.json) is
written by prune_lab/study_report.py.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import OmegaConf

from prune_lab.cpu import kind_of
from prune_lab.errors import PruneLabError
from prune_lab.verdicts import DEFAULT_MARGIN, OPS

ROOT = Path(__file__).resolve().parent.parent
STUDY_DIR = ROOT / "conf" / "study"
MAX_PRIMARY = 3
TEXT_COLUMNS = ("variant", "config", "cpu_kind", "cpu_isa")  # the table.csv columns that are not numbers


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "variant"


@dataclass(frozen=True)
class Claim:
    a: str
    b: str
    op: str = ">"
    budget: float | None = None  # None: judged at every budget of the study
    margin: float = DEFAULT_MARGIN  # points of the metric (top-1 in %)
    primary: bool = False  # a headline claim of the paper: >= 5 seeds, Holm-adjusted
    why: str = ""  # the one-line justification a margin above the default needs
    # a claim on another quantity than the study's metric (a training cost): one of the study's
    # `columns` (its label), in that column's units; `lower` when less of it is better
    column: str = ""
    lower: bool = False

    def text(self, budget: float) -> str:
        words = {">": "better than", ">=": "not worse than", "==": "equivalent to"}[self.op]
        tail = f" (margin {self.margin:g})" if self.op != ">" else ""
        what = f" in {self.column}{' (lower is better)' if self.lower else ''}" if self.column else ""
        return f"{self.a} {words} {self.b}{what} at budget {budget:g}{tail}"


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
    # variants run on some seeds only (exploratory rows on 3 seeds beside 5-seed primaries)
    only_seeds: dict[str, list[int]] = field(default_factory=dict)
    paradigm: str = ""  # the row label in the generated results ("structured channels", ...)
    # other studies whose committed rows this one reuses where a variant has the same name and overrides
    carry_from: list[str] = field(default_factory=list)

    def runs_at(self, variant: str, budget: float, seed: int | None = None) -> bool:
        return (variant not in self.only or budget in self.only[variant]) and \
            (seed is None or variant not in self.only_seeds or seed in self.only_seeds[variant])

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
                for s in self.seeds for v, ov in self.variants.items() for b in self.budgets if self.runs_at(v, b, s)]


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
    unknown = set(raw) - {"description", "paradigm", "base", "variants", "budgets", "seeds", "metric", "columns",
                          "claims", "carry_from"}
    if unknown:
        raise _fail(name, f"unknown keys {sorted(unknown)}")
    # a variant is a list of overrides, or {overrides: [...], budgets: [...], seeds: [...]} to run at
    # those budgets / on those seeds only
    variants, only, only_seeds = {}, {}, {}
    for k, v in (raw.get("variants") or {}).items():
        if isinstance(v, dict):
            if set(v) - {"overrides", "budgets", "seeds"} or not (v.get("budgets") or v.get("seeds")):
                raise _fail(name, f"variant {k!r}: give a list of overrides or "
                                  "{overrides: [...], budgets: [...], seeds: [...]}")
            if v.get("budgets"):
                only[str(k)] = [float(b) for b in v["budgets"]]
            if v.get("seeds"):
                only_seeds[str(k)] = [int(x) for x in v["seeds"]]
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
                  columns={str(k): str(v) for k, v in (raw.get("columns") or {}).items()}, only=only,
                  only_seeds=only_seeds, paradigm=str(raw.get("paradigm", "")),
                  carry_from=[str(c) for c in raw.get("carry_from") or []])
    for other in study.carry_from:
        if not (STUDY_DIR / f"{other}.yaml").is_file():
            raise _fail(name, f"carry_from names study {other!r}, which has no conf/study/{other}.yaml")
        their_metric = str(OmegaConf.load(STUDY_DIR / f"{other}.yaml").get("metric", "pruned.top1"))
        if their_metric != study.metric:  # a carried row's `metric` column is the other study's metric
            raise _fail(name, f"carry_from study {other!r} measures {their_metric}, this one {study.metric}")
    if not study.budgets or any(not 0.0 <= b < 1.0 for b in study.budgets):
        raise _fail(name, f"budgets={study.budgets} must be a non-empty list of fractions in [0, 1)")
    if not study.seeds or any(s < 0 for s in study.seeds) or len(set(study.seeds)) != len(study.seeds):
        raise _fail(name, f"seeds={study.seeds} must be distinct non-negative integers")
    for c in raw.get("claims") or []:
        unknown = set(c) - {"a", "b", "op", "budget", "margin", "primary", "why", "column", "lower_is_better"}
        if unknown:
            raise _fail(name, f"claim {c}: unknown keys {sorted(unknown)}; a claim has a, b, op, budget, margin, "
                              "primary, why, column, lower_is_better")
        claim = Claim(a=str(c.get("a")), b=str(c.get("b")), op=str(c.get("op", ">")),
                      budget=None if c.get("budget") is None else float(c["budget"]),
                      margin=float(c.get("margin", DEFAULT_MARGIN)), primary=bool(c.get("primary", False)),
                      why=str(c.get("why", "")), column=str(c.get("column") or ""),
                      lower=bool(c.get("lower_is_better", False)))
        if claim.column and claim.column not in study.columns:
            raise _fail(name, f"claim column {claim.column!r} is not one of the study's columns: "
                              f"{', '.join(study.columns) or 'none'}")
        for side in (claim.a, claim.b):
            if side not in variants:
                raise _fail(name, f"claim names variant {side!r}; variants are: {', '.join(variants)}")
        if claim.op not in OPS:
            raise _fail(name, f"claim op {claim.op!r} is not one of: {', '.join(OPS)}")
        if claim.margin <= 0:
            raise _fail(name, f"claim margin {claim.margin} must be > 0 points")
        if claim.margin > DEFAULT_MARGIN and not claim.why:
            raise _fail(name, f"claim {claim.a!r} vs {claim.b!r}: margin {claim.margin:g} points is above the default "
                              f"{DEFAULT_MARGIN:g}; give its one-line justification as why: ...")
        study.claims.append(claim)
    primaries = sum(c.primary for c in study.claims if c.budget is not None) + \
        sum(len(study.budgets) for c in study.claims if c.primary and c.budget is None)
    if primaries > MAX_PRIMARY:
        raise _fail(name, f"{primaries} primary claims; a study has at most {MAX_PRIMARY} (the paper's headline "
                          "claims), every other claim is exploratory")
    return study


def compose_train(overrides: list[str]):
    """conf/train.yaml composed with `overrides`, as train.py would see it (Hydra's global state reset)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def check_overrides(study: Study) -> None:
    """Compose every variant's config once, so a typo stops the study before any job runs."""
    from prune_lab.cli import unknown_option

    for variant, overrides in study.variants.items():
        for o in [*study.base, *overrides]:  # one line for an unknown group option, as train.py says it
            problem = unknown_option(o)
            if problem:
                raise _fail(study.name, f"variant {variant!r}: {problem}")
        try:
            compose_train([*study.base, *overrides, f"budget={study.budgets[0]}", f"seed={study.seeds[0]}"])
        except Exception as e:  # Hydra's errors are multi-line; the first line names the problem
            raise _fail(study.name, f"variant {variant!r}: {str(e).splitlines()[0]}") from None


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


def carried_rows(study: Study, report: Path) -> dict[tuple[str, float, int], dict]:
    """Rows of an earlier report (its table.csv) whose variant still has the same overrides.

    Job folders live in outputs/, which does not outlive a machine; the committed table.csv does.
    A study longer than a session is continued from it: a job with a carried row is not run again.
    Rows without a `config` column (written before it existed) or with another hash are ignored.
    Rows of the studies in `carry_from` (their committed docs/studies/<name>/table.csv) count too:
    a variant with the same name and the same overrides (base included) is the same job.
    """
    carried = {}
    # `carry_from` studies first, this study's own table last: its rows win
    for other in study.carry_from:  # only the jobs this study runs: not the other study's other seeds
        rows = _table_rows(study, ROOT / "docs" / "studies" / other / "table.csv")
        carried.update({k: r for k, r in rows.items()
                        if k[1] in study.budgets and k[2] in study.seeds and study.runs_at(*k)})
    carried.update(_table_rows(study, report / "table.csv"))
    return carried


def _table_rows(study: Study, path: Path) -> dict[tuple[str, float, int], dict]:
    carried = {}
    if not path.is_file():
        return carried
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            variant = row.get("variant")
            if variant not in study.variants or row.get("config") != study.config_hash(variant):
                continue
            parsed = {k: (v if k in TEXT_COLUMNS else int(v) if k == "seed" else float(v or "nan"))
                      for k, v in row.items() if k is not None}
            # a table written before `cpu_kind`: its `cpu_isa` without the vendor (never equal to a new
            # row's kind, so not paired with one), or "" (written before that too: not known)
            parsed.setdefault("cpu_kind", parsed.pop("cpu_isa", ""))
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
               "train_wall_s": lookup(r, "train.total_wall_s"), "val_top1": lookup(r, "pruned.val_top1"),
               "cpu_kind": kind_of(r.get("env", {}))}
        row.update({label: lookup(r, key) for label, key in study.columns.items()})
        rows.append(row)
    # rows of budgets or seeds outside this selection (`--budgets 0.5` on a study whose report holds
    # 0.85 too) stay in the report: writing it never loses a finished job
    selected = {(j.variant, j.budget, j.seed) for j in jobs}
    order = list(study.variants)
    rows += sorted((r for k, r in carried.items() if k not in selected),
                   key=lambda r: (r["seed"], order.index(r["variant"]), r["budget"]))
    return rows


def foreign_seeds(rows: list[dict], kind: str) -> dict[int, list[str]]:
    """Seeds whose rows all come from CPU kinds other than `kind` (this host's), with those kinds: a
    job of such a seed run here would pair with none of them (a claim pairs a seed's variants only
    within one kind). Rows of an unrecorded kind do not count."""
    kinds: dict[int, set[str]] = {}
    for r in rows:
        if r.get("cpu_kind"):
            kinds.setdefault(r["seed"], set()).add(r["cpu_kind"])
    return {s: sorted(k) for s, k in kinds.items() if kind and kind not in k}


def covering(study: Study, rows: list[dict]) -> Study:
    """The study with its budgets and seeds widened to every row's (see `collect`)."""
    return replace(study, budgets=sorted({*study.budgets, *(r["budget"] for r in rows)}),
                   seeds=sorted({*study.seeds, *(r["seed"] for r in rows)}))


def scale(metric: str) -> float:
    """Points per unit of the metric: top-1/top-5 are fractions, reported in percentage points."""
    return 100.0 if metric.endswith(("top1", "top5")) else 1.0


def _not_run(claim: Claim) -> dict:
    return {"n": 0, "primary": claim.primary, "label": "primary" if claim.primary else "exploratory",
            "mean": float("nan"), "ci95": [float("nan")] * 2, "p": float("nan"),
            "raw_verdict": "budget not run", "verdict": "budget not run", "judged": False}


def verdicts(study: Study, rows: list[dict]) -> list[dict]:
    """Every claim at each of its budgets, judged on the seeds both variants have (verdicts.py).

    A seed pairs only if A's and B's rows share their dense reference (same dense top-1) and CPU
    kind (where recorded): a difference across references or kinds is not seed-paired; such seeds
    are listed under `excluded`, with the reason.
    """
    from prune_lab.verdicts import adjust, judge

    pts = scale(study.metric)
    row = {(r["variant"], r["budget"], r["seed"]): r for r in rows}
    out = []
    for claim in study.claims:
        for budget in [claim.budget] if claim.budget is not None else study.budgets:
            key, unit = (claim.column, 1.0) if claim.column else ("metric", pts)
            sign = -1.0 if claim.lower else 1.0
            seeds, excluded = [], {}
            for s in study.seeds:
                ra, rb = row.get((claim.a, budget, s)), row.get((claim.b, budget, s))
                if ra is None or rb is None:
                    continue
                da, db = ra["dense_top1"], rb["dense_top1"]
                if da == da and db == db and da != db:  # both known (NaN: not recorded) and different
                    excluded[str(s)] = "different dense references"
                elif ra.get("cpu_kind") and rb.get("cpu_kind") and ra["cpu_kind"] != rb["cpu_kind"]:
                    excluded[str(s)] = f"different CPU kinds ({ra['cpu_kind']}, {rb['cpu_kind']})"
                elif not all(r.get(key, float("nan")) == r.get(key, float("nan")) for r in (ra, rb)):
                    excluded[str(s)] = f"{claim.column} not recorded"
                else:
                    seeds.append(s)
            # A − B in the claim's units, oriented so that > 0 is A better (a lower cost is better)
            diffs = [sign * unit * (row[(claim.a, budget, s)][key] - row[(claim.b, budget, s)][key]) for s in seeds]
            run = budget in study.budgets and study.runs_at(claim.a, budget) and study.runs_at(claim.b, budget)
            v = judge(diffs, claim.op, claim.margin, claim.primary) if run else _not_run(claim)
            kinds = sorted({str(row[(side, budget, s)].get("cpu_kind") or "unknown")
                            for s in seeds for side in (claim.a, claim.b)})
            out.append({"claim": claim.text(budget), "a": claim.a, "b": claim.b, "op": claim.op, "budget": budget,
                        "margin": claim.margin, "margin_why": claim.why,
                        "units": claim.column or ("points" if pts == 100 else study.metric),
                        "metric": study.metric, "column": claim.column, "lower_is_better": claim.lower,
                        "seeds": seeds, "excluded": excluded, "cpu": kinds, "diffs": diffs, **v})
    adjust(out, lambda r: r["diffs"])
    return out
