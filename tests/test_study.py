"""Studies: config checks, seed-paired verdicts (against an independent computation), and the
runner end to end (resumable: a second run starts no job)."""
from __future__ import annotations

import csv
from dataclasses import replace
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from prune_lab.cpu import cpu_kind
from prune_lab.errors import PruneLabError
from prune_lab.results_summary import CLAIMLESS_KINDS
from prune_lab.study import (STUDY_DIR, Claim, Study, carried_rows, collect, covering, foreign_seeds, load_study,
                             verdicts)
from prune_lab.study_report import write_report
from prune_lab.verdicts import interval, judge

ROOT = Path(__file__).resolve().parent.parent


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_study_loads_and_composes():
    from prune_lab.study import check_overrides

    names = sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))
    assert "quickstart" in names
    for name in names:
        study = load_study(name)
        # a study states claims, unless it is a selection (a schedule chosen on validation data) or a
        # probe (a measurement of why), and its description says which
        assert study.claims or study.description.split(" ", 1)[0] in CLAIMLESS_KINDS, name
        assert sum(c.primary for c in study.claims) <= 3, name
        check_overrides(study)  # every variant composes with the real config


@pytest.mark.parametrize("body, expected", [
    ("variants: {A: [method=magnitude]}\nbudgets: [1.5]", "budgets=[1.5]"),
    ("variants: {A: [method=magnitude]}\nbudgets: [0.5]\nclaims: [{a: A, b: B}]", "claim names variant 'B'"),
    ("variants: {A: [method=magnitude]}\nbudgets: [0.5]\nclaims: [{a: A, b: A, op: '<'}]", "claim op '<'"),
    ("variants: {A: [method=magnitude]}\nbudgets: [0.5]\nseeds: [0, 0]", "seeds=[0, 0]"),
    ("variants: {A: [method=magnitude]}\nbudget: [0.5]", "unknown keys ['budget']"),
    ("variants: {A: {overrides: [method=magnitude]}}\nbudgets: [0.5]", "variant 'A': give a list of overrides"),
    ("variants: {A: [method=magnitude]}\nbudgets: [0.5]\ncolumns: {cost: train.cost_dense_epochs}\n"
     "claims: [{a: A, b: A, column: costs}]", "claim column 'costs' is not one of the study's columns: cost"),
])
def test_bad_study_configs_are_one_line(tmp_path, body, expected):
    with pytest.raises(PruneLabError, match=None) as err:
        load_study(str(write_yaml(tmp_path / "bad.yaml", body)))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unknown_study_lists_the_known_ones():
    with pytest.raises(PruneLabError, match="unknown study 'nope'; choose one of: .*quickstart"):
        load_study("nope")


def test_a_typo_in_a_variant_stops_before_any_job(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", "variants: {A: [method=magnitdue]}\nbudgets: [0.5]\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: study typo: variant 'A': unknown method 'magnitdue'; choose one of: " + ", ".join(
            sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")))]
    assert not (tmp_path / "o").exists()


def independent_t_interval(diffs):
    # the t quantile for 95 % from its definition (scipy's t.cdf inverted by bisection), not t.ppf
    from scipy.stats import t

    n = len(diffs)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t.cdf(mid, n - 1) < 0.975 else (lo, mid)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean - lo * sd / math.sqrt(n), mean + lo * sd / math.sqrt(n)


@pytest.mark.parametrize("diffs, op, margin, verdict", [  # differences and margins in points
    ([2.0, 2.5, 3.0], ">", 0.25, "better"),
    ([-2.0, -2.5, -3.0], ">", 0.25, "worse"),
    ([2.0, -1.0, 0.5], ">", 0.25, "within noise"),
    ([-0.1, -0.2, 0.05], ">=", 0.5, "not worse"),      # at worst 0.5 points below: non-inferior
    ([-2.0, -2.1, -1.9], ">=", 0.5, "worse"),
    ([1.0, -3.0, 0.0], ">=", 0.5, "within noise"),
    ([0.05, -0.05, 0.0], "==", 0.25, "equivalent"),
])
def test_paired_verdicts(diffs, op, margin, verdict):
    v = judge(diffs, op, margin, primary=False)
    lo, hi = independent_t_interval(diffs)
    assert v["ci95"] == pytest.approx([lo, hi], abs=1e-9)
    assert list(interval(diffs)[1:]) == pytest.approx([lo, hi], abs=1e-9)
    assert v["mean"] == pytest.approx(statistics.fmean(diffs))
    assert v["verdict"] == v["raw_verdict"] == verdict and v["judged"] and v["n"] == 3
    assert v["label"] == "exploratory"


def test_too_few_seeds_give_no_verdict():
    one = judge([0.1], ">", 0.25, primary=False)
    assert one["verdict"] == one["raw_verdict"] == "needs 2 more seeds" and not one["judged"]
    assert math.isnan(one["mean"]) and math.isnan(one["p"])
    two = judge([5.0, 5.1], ">", 0.25, primary=False)  # a clear difference, but an exploratory claim needs 3 seeds
    assert two["verdict"] == "needs 1 more seed" and not two["judged"]
    assert two["mean"] == pytest.approx(5.05)  # the interval is still reported
    assert judge([5.0, 5.1, 5.2], ">", 0.25, primary=True)["verdict"] == "needs 2 more seeds"


def test_verdicts_pair_by_seed_and_recompute_from_table_csv(tmp_path):
    study = Study(name="t", description="d", base=[], variants={"A": [], "B": []}, budgets=[0.5, 0.9],
                  seeds=[0, 1, 2], claims=[Claim("A", "B", ">", None)])
    # B is better on average but A beats B on every seed (by 1.0, 1.1, 1.2 points): only pairing sees it
    rows = []
    for s, base in enumerate([0.70, 0.90, 0.80]):
        for b in (0.5, 0.9):
            rows += [dict(variant="A", budget=b, seed=s, metric=base + 0.01 + s / 1000, dense_top1=0.9,
                          flops_reduction=b, params_reduction=b, train_wall_s=1.0),
                     dict(variant="B", budget=b, seed=s, metric=base, dense_top1=0.9, flops_reduction=b,
                          params_reduction=b, train_wall_s=1.0)]
    rows = [r for r in rows if not (r["variant"] == "B" and r["seed"] == 2 and r["budget"] == 0.9)]  # a missing job
    judged = write_report(study, rows, tmp_path)
    assert [v["claim"] for v in judged] == ["A better than B at budget 0.5", "A better than B at budget 0.9"]
    assert judged[0]["verdict"] == "better" and judged[0]["seeds"] == [0, 1, 2]
    assert judged[0]["diffs"] == pytest.approx([1.0, 1.1, 1.2])  # points: top-1 fractions times 100
    assert judged[0]["units"] == "points" and judged[0]["excluded"] == {}
    assert judged[1]["seeds"] == [0, 1]  # only seeds with both variants are paired
    assert judged[1]["verdict"] == "needs 1 more seed" and judged[1]["mean"] == pytest.approx(1.05)
    # recompute from table.csv alone
    table = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert list(table[0])[:7] == ["variant", "budget", "seed", "config", "cpu_kind", "metric", "val_top1"]
    assert table[0]["cpu_kind"] == "" and table[0]["val_top1"] == ""  # rows without the keys: empty cells
    for v in judged:
        value = {(r["variant"], r["seed"]): float(r["metric"]) for r in table if float(r["budget"]) == v["budget"]}
        diffs = [100 * (value[("A", str(s))] - value[("B", str(s))]) for s in (0, 1, 2)
                 if ("A", str(s)) in value and ("B", str(s)) in value]
        assert judge(diffs, ">", 0.25, primary=False)["ci95"] == pytest.approx(v["ci95"])
    data = json.loads((tmp_path / "verdicts.json").read_text())
    assert isinstance(data, dict) and data["schema"] == 2 and data["study"] == "t" and data["metric"] == "pruned.top1"
    assert data["seeds"] == [0, 1, 2] and data["cpu"] == ["unknown"]
    assert [c["verdict"] for c in data["claims"]] == ["better", "needs 1 more seed"]
    text = (tmp_path / "table.md").read_text()
    assert "**better**" in text and "**needs 1 more seed**" in text
    assert (tmp_path / "plot.png").stat().st_size > 1000 and (tmp_path / "forest.png").stat().st_size > 1000
    assert "](forest.png)" in text
    # a study continued later: no seed has both variants yet, so no difference to draw; the stale
    # forest.png goes and table.md links no missing picture
    write_report(study, [r for r in rows if r["variant"] == "A"], tmp_path)
    assert not (tmp_path / "forest.png").exists() and "forest.png)" not in (tmp_path / "table.md").read_text()
    write_report(study, [], tmp_path / "empty")
    assert "](" not in (tmp_path / "empty" / "table.md").read_text()  # nothing drawn, nothing linked


def test_a_claim_on_a_cost_column_is_judged_in_its_units_lower_being_better(tmp_path):
    cost = "training cost (dense epochs)"
    study = Study(name="t", description="d", base=[], variants={"A": [], "B": []}, budgets=[0.5],
                  seeds=[0, 1, 2, 3], columns={cost: "train.cost_dense_epochs"},
                  claims=[Claim("A", "B", ">", None, column=cost, lower=True), Claim("B", "A", ">", None, column=cost,
                                                                                   lower=True),
                          Claim("A", "B", ">", None)])
    # A costs 6.0-6.3 dense epochs, B 16 (its 8 of pre-training included); B is more accurate by 1 point
    rows = []
    for s in range(4):
        rows += [dict(variant="A", budget=0.5, seed=s, metric=0.80, dense_top1=0.9, flops_reduction=0.5,
                      params_reduction=0.5, train_wall_s=1.0, **{cost: 6.0 + s / 10}),
                 dict(variant="B", budget=0.5, seed=s, metric=0.81 + s / 1000, dense_top1=0.9, flops_reduction=0.5,
                      params_reduction=0.5, train_wall_s=1.0, **{cost: 16.0 if s < 3 else float("nan")})]
    judged = write_report(study, rows, tmp_path)
    cheaper, dearer, accuracy = judged
    assert cheaper["claim"] == f"A better than B in {cost} (lower is better) at budget 0.5"
    assert cheaper["diffs"] == pytest.approx([10.0, 9.9, 9.8])  # B − A in dense epochs, not points
    assert cheaper["verdict"] == "better" and cheaper["units"] == cost
    assert cheaper["excluded"] == {"3": f"{cost} not recorded"}  # a seed without the cost is left out
    assert (cheaper["a_mean"], cheaper["b_mean"]) == pytest.approx((6.1, 16.0))  # in the column's units
    assert dearer["verdict"] == "worse" and dearer["diffs"] == pytest.approx([-10.0, -9.9, -9.8])
    assert accuracy["verdict"] == "worse" and accuracy["seeds"] == [0, 1, 2, 3]  # the metric's claim: all seeds
    from prune_lab.results_summary import primary_rows

    data = json.loads((tmp_path / "verdicts.json").read_text())
    data["claims"][0]["primary"] = True  # as a primary row of the generated results, it says its unit
    (row,) = primary_rows([("t", data)], "studies/")[2:]
    assert "| 6.10 ± 0.10 dense epochs | 16.00 ± 0.00 dense epochs | +9.90 [" in row


def test_a_study_continues_from_its_committed_table_and_reruns_edited_variants(tmp_path):
    path = write_yaml(tmp_path / "two.yaml", """
base: [experiment=quickstart]
variants:
  A: [method=magnitude]
  B: [method=random]
budgets: [0.8]
seeds: [0, 1]
claims:
  - {a: A, b: B, op: ">"}
""")
    study = load_study(str(path))
    report = tmp_path / "report"
    rows = [dict(variant=v, budget=0.8, seed=s, config=study.config_hash(v), metric=0.5 + s / 10, dense_top1=0.9,
                 flops_reduction=0.8, params_reduction=0.8, train_wall_s=1.0) for v in "AB" for s in (0, 1)]
    write_report(study, rows[:3], report)  # B seed 1 never finished
    carried = carried_rows(study, report)
    assert set(carried) == {("A", 0.8, 0), ("A", 0.8, 1), ("B", 0.8, 0)}
    assert carried[("A", 0.8, 1)]["metric"] == pytest.approx(0.6) and carried[("A", 0.8, 1)]["seed"] == 1
    # collect (no job folders: a new machine) gives back the carried rows; the report round-trips
    assert collect(study, tmp_path / "jobs", carried) == [carried[k] for k in (("A", 0.8, 0), ("B", 0.8, 0), ("A", 0.8, 1))]
    # the runner counts them as finished and would run only the missing job
    cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), str(path), "--out", str(tmp_path / "jobs"),
           "--report", str(report), "--dry-run"]
    dry = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "3 finished (3 carried" in dry.stdout and dry.stdout.count("  todo ") == 1 and "b0.8_s1" in dry.stdout.split("todo")[1]
    assert "4 finished" not in subprocess.run([*cmd, "--fresh"], capture_output=True, text=True).stdout
    # a column added to the study since the rows were written reads as unknown (NaN) for them
    wider = load_study(str(path))
    wider.columns["new column"] = "pruned.sparsity"
    assert math.isnan(carried_rows(wider, report)[("A", 0.8, 0)]["new column"])
    # a run on other budgets or seeds keeps the report's rows outside its selection
    narrow = load_study(str(path), budgets=[0.5], seeds=[0])
    kept = collect(narrow, tmp_path / "jobs", carried_rows(narrow, report))
    assert {(r["variant"], r["budget"], r["seed"]) for r in kept} == set(carried)
    wide = covering(narrow, kept)
    assert wide.budgets == [0.5, 0.8] and wide.seeds == [0, 1]
    # editing a variant's overrides changes its hash: its old rows are not reused
    path.write_text(path.read_text().replace("B: [method=random]", "B: [method=random, epochs=2]"))
    assert set(carried_rows(load_study(str(path)), report)) == {("A", 0.8, 0), ("A", 0.8, 1)}
    # a fresh row whose seed's dense reference differs from the carried ones' is flagged, not silently paired
    judged = write_report(study, rows, report)
    assert "different dense references" not in (report / "table.md").read_text()
    assert judged[0]["seeds"] == [0, 1] and judged[0]["excluded"] == {}
    judged = write_report(study, [*rows[:3], {**rows[3], "dense_top1": 0.91}], report)
    text = (report / "table.md").read_text()
    assert "Warning: at budget 0.8 the rows of seed 1 come from different dense references" in text
    assert judged[0]["seeds"] == [0] and judged[0]["excluded"] == {"1": "different dense references"}
    assert "(excl. 1)" in text
    claims = json.loads((report / "verdicts.json").read_text())["claims"]
    assert claims[0]["excluded"] == {"1": "different dense references"} and claims[0]["n"] == 1


def test_claim_at_a_budget_not_run():
    study = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5], seeds=[0, 1],
                  claims=[Claim("A", "B", ">", 0.9)])
    assert verdicts(study, [])[0]["verdict"] == "budget not run"


def test_a_variant_restricted_to_some_budgets_runs_and_is_judged_only_there(tmp_path):
    path = write_yaml(tmp_path / "diag.yaml", """
variants:
  A: [method=magnitude]
  probe: {overrides: [method=random], budgets: [0.5]}
budgets: [0.5, 0.9]
seeds: [0, 1]
claims: [{a: A, b: probe}]
""")
    study = load_study(str(path))
    jobs = study.jobs(tmp_path)
    assert sorted((j.variant, j.budget) for j in jobs if j.seed == 0) == [("A", 0.5), ("A", 0.9), ("probe", 0.5)]
    # the overrides (hence the config hash and the job folder) are the plain list's
    assert study.variants["probe"] == ["method=random"]
    rows = [{"variant": v, "budget": b, "seed": s, "metric": m, "dense_top1": 0.9, "flops_reduction": 0.5,
             "params_reduction": 0.5, "train_wall_s": 1.0}
            for s in (0, 1) for v, b, m in (("A", 0.5, 0.8 + s / 100), ("A", 0.9, 0.7), ("probe", 0.5, 0.6 + s / 50))]
    judged = {v["budget"]: v for v in write_report(study, rows, tmp_path / "r")}
    assert judged[0.5]["n"] == 2 and judged[0.5]["verdict"] == "needs 1 more seed"
    assert judged[0.9]["verdict"] == "budget not run"
    table = (tmp_path / "r" / "table.md").read_text()
    assert "| probe | 0.5 |" in table and "| probe | 0.9 |" not in table


def test_variants_option_selects_jobs_and_rejects_unknown_names(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    from study import main

    path = write_yaml(tmp_path / "sel.yaml", "variants: {A: [method=magnitude], B: [method=random]}\nbudgets: [0.5]\n")
    assert main([str(path), "--out", str(tmp_path / "o"), "--variants", "B", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  todo")]
    assert len(listed) == 3 and all("method=random" in line for line in listed)  # seeds 0, 1, 2 of B only
    assert main([str(path), "--variants", "C", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'C'" in err and "'A', 'B'" in err and "\n" not in err


def test_curves_average_the_logged_validation_accuracy_over_seeds(tmp_path):
    from prune_lab.study_plots import curves, mean_curves, read_curve, run_curves

    study = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5], seeds=[0, 1])
    jobs = study.jobs(tmp_path)
    for job in jobs:
        if job.variant == "B" and job.seed == 1:
            continue  # not finished: not drawn
        (job.directory / "csv").mkdir(parents=True)
        (job.directory / "results.json").write_text("{}")
        lines = ["epoch,step,train/loss,val/top1"] + [f"{e},{e},0.5," for e in range(3)] + \
            [f"{e},{e},,{0.5 + e / 10 + job.seed / 100}" for e in range(3)]
        (job.directory / "csv" / "metrics.csv").write_text("\n".join(lines))
    assert read_curve(jobs[0].directory) == {0: 0.5, 1: 0.6, 2: 0.7}  # seed 0, variant A
    report = tmp_path / "report"
    report.mkdir()
    assert curves(study, jobs, report / "curves.png") == 3 and (report / "curves.png").stat().st_size > 0
    # every run's curve in curves.csv, with its seed and config hash; the drawn means from them:
    # variant A averages seeds 0 and 1, B has seed 0 only
    with open(report / "curves.csv") as f:
        table = {(r["variant"], int(r["seed"]), int(r["epoch"])): float(r["val/top1"]) for r in csv.DictReader(f)}
    assert len(table) == 9 and table[("A", 1, 3)] == pytest.approx(0.71)
    assert mean_curves(study, run_curves(study, jobs, report / "curves.csv")) == {
        (0.5, "A"): (2, pytest.approx({0: 0.505, 1: 0.605, 2: 0.705})), (0.5, "B"): (1, pytest.approx({0: 0.5, 1: 0.6, 2: 0.7}))}
    # on a new machine (no job folders) the report's own csv still draws the three runs ...
    for job in jobs:
        shutil.rmtree(job.directory, ignore_errors=True)
    assert curves(study, study.jobs(tmp_path), report / "curves.png") == 3
    with open(report / "curves.csv") as f:
        assert {(r["variant"], int(r["seed"]), int(r["epoch"])): float(r["val/top1"]) for r in csv.DictReader(f)} == table
    # ... but not a variant whose overrides changed since: those runs are another job
    changed = replace(study, variants={"A": ["method=random"], "B": []})
    assert curves(changed, changed.jobs(tmp_path), report / "curves.png") == 1
    assert curves(study, [], tmp_path / "none.png") == 0 and not (tmp_path / "none.png").exists()


def test_exploration_averages_each_grow_over_seeds_and_skips_runs_without_a_record(tmp_path):
    from prune_lab.study_plots import exploration, run_explorations

    study = Study(name="t", description="", base=[], variants={"IEE": [], "RigL": []}, budgets=[0.95], seeds=[0, 1])
    jobs = study.jobs(tmp_path)
    for job in jobs:
        job.directory.mkdir(parents=True)
        train = {"flops_ratio": 0.3}
        if job.variant == "IEE":  # seed 1 has one grow more than seed 0: only the shared grows are averaged
            grows = range(2 + job.seed)
            train["turnover"] = {"per_grow": [{"cycle": c, "grown": 10 * (c + 1) + job.seed, "returning": 0,
                                               "earlier": 0, "never_active": 4 + 2 * job.seed} for c in grows]}
            train["grow_loss"] = {"per_grow": [{"step": 100 * (c + 1), "loss": 0.5 + 0.1 * job.seed,
                                                "loss_at_zero": 0.5} for c in grows]}
        (job.directory / "results.json").write_text(json.dumps({"train": train}))
    assert exploration(study, jobs, tmp_path / "exploration.png") == 2  # the two IEE runs; RigL records no grow
    assert (tmp_path / "exploration.png").stat().st_size > 0
    with open(tmp_path / "exploration.csv") as f:
        rows = list(csv.reader(f))[1:]  # one row per run and grow: seed 0 grew twice, seed 1 three times
    turnover = [(r[2], r[5], float(r[6]), float(r[7])) for r in rows if r[4] == "turnover"]
    assert turnover == [("0", "0", 10, 4), ("0", "1", 20, 4), ("1", "0", 11, 6), ("1", "1", 21, 6), ("1", "2", 31, 6)]
    loss = [(r[2], r[5], float(r[6])) for r in rows if r[4] == "grow_loss"]
    assert loss[:2] == [("0", "100", 0.0), ("0", "200", 0.0)] and loss[2] == ("1", "100", pytest.approx(0.1))
    means = run_explorations(study, [], tmp_path / "exploration.csv")  # read back: the values written
    assert means[(0.95, "IEE", 1)]["turnover"][2] == (2, 31, 6)
    assert exploration(study, [j for j in jobs if j.variant == "RigL"], tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()
    # on a new machine the per-run records of exploration.csv draw the same means
    for job in jobs:
        shutil.rmtree(job.directory)
    assert exploration(study, study.jobs(tmp_path), tmp_path / "exploration.png") == 2
    with open(tmp_path / "exploration.csv") as f:
        assert list(csv.reader(f))[1:] == rows


@pytest.mark.slow
@pytest.mark.ci
def test_study_runs_resumes_and_starts_no_job_the_second_time(tmp_path, dense_dir):
    path = write_yaml(tmp_path / "mini.yaml", f"""
description: two variants, two seeds, on a shrunk quick start
base: [experiment=quickstart, data.image_size=8, epochs=1, dense.epochs=2, latency.repeats=2, latency.warmup=1,
       paths.dense_dir={dense_dir}]
variants:
  magnitude: [method=magnitude]
  random: [method=random]
budgets: [0.8]
seeds: [0, 1]
columns:
  sparsity: pruned.sparsity
claims:
  - {{a: magnitude, b: random, op: ">="}}
""")
    cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), str(path), "--out", str(tmp_path / "out")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    results = sorted((tmp_path / "out").glob("jobs/*/b0.8_s*/results.json"))
    assert len(results) == 4
    stamps = {p: p.stat().st_mtime_ns for p in results}
    table = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    assert {(r["variant"], r["seed"]) for r in table} == {(v, s) for v in ("magnitude", "random") for s in ("0", "1")}
    for r in table:
        assert float(r["sparsity"]) == pytest.approx(0.8, abs=0.005)
        assert r["cpu_kind"] == cpu_kind()  # the host's kind, from each job's results.json env
    # the variants of one seed share the dense reference
    dense = {(r["variant"], r["seed"]): r["dense_top1"] for r in table}
    assert dense[("magnitude", "0")] == dense[("random", "0")] and dense[("magnitude", "1")] == dense[("random", "1")]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0
    assert "4 finished" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in results} == stamps  # no job ran again
    verdict = json.loads((tmp_path / "out" / "verdicts.json").read_text())
    assert verdict["schema"] == 2 and verdict["seeds"] == [0, 1]
    claim = verdict["claims"][0]
    assert claim["claim"] == "magnitude not worse than random at budget 0.8 (margin 0.25)" and claim["n"] == 2
    assert claim["verdict"] == "needs 1 more seed" and claim["excluded"] == {}  # two seeds: an exploratory claim needs 3


def test_extra_overrides_replace_the_base_key_and_rerun_on_other_seeds(tmp_path):
    study = load_study("quickstart", seeds=[3, 4], budgets=[0.7], extra=["experiment=fashion_mnist", "epochs=2"])
    assert study.base == ["experiment=fashion_mnist", "epochs=2"]
    jobs = study.jobs(tmp_path)
    assert {(j.budget, j.seed) for j in jobs} == {(0.7, 3), (0.7, 4)}
    assert all(j.overrides[:2] == ("experiment=fashion_mnist", "epochs=2") for j in jobs)
    # jobs of different seeds and budgets live in different folders: re-checks never overwrite
    assert len({j.directory for j in jobs}) == len(jobs)


def test_jobs_fill_each_device_and_stay_pinned_to_it(tmp_path, monkeypatch):
    """--devices: `workers` jobs per device at once, each job's CUDA_VISIBLE_DEVICES one device; checked
    with a stand-in for python that records its device and the jobs running beside it."""
    from prune_lab.study_runner import run_jobs

    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/bin/sh
d={tmp_path}/running; mkdir -p $d
touch $d/$$.$CUDA_VISIBLE_DEVICES
ls $d > {tmp_path}/seen.$$.start
sleep 0.3
ls $d > {tmp_path}/seen.$$.end
echo $CUDA_VISIBLE_DEVICES > "$(echo "$@" | sed 's/.*hydra.run.dir=\\([^ ]*\\).*/\\1/')/device"
rm $d/$$.$CUDA_VISIBLE_DEVICES
""")
    fake.chmod(0o755)
    path = write_yaml(tmp_path / "dev.yaml", "variants: {A: [method=magnitude], B: [method=random]}\nbudgets: [0.5, 0.9]\n")
    study = load_study(str(path))
    jobs = study.jobs(tmp_path / "o")  # 12 jobs: 2 variants x 2 budgets x 3 seeds
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # e.g. SLURM's share: --devices 0 1 are GPUs 5 and 7
    assert run_jobs(jobs, 2, 1, str(fake), devices=["0", "1"]) == []
    devices = [(j.directory / "device").read_text().strip() for j in jobs]
    assert sorted(set(devices)) == ["5", "7"] and min(devices.count("5"), devices.count("7")) >= 4
    listings = [seen.read_text().split() for seen in tmp_path.glob("seen.*")]
    assert len(listings) == 2 * len(jobs)
    for names in listings:  # whenever a job looked, at most 2 jobs ran on each device
        assert all(sum(n.endswith(f".{d}") for n in names) <= 2 for d in ("5", "7")), names
    assert max(len(names) for names in listings) >= 3  # and the devices did fill


def test_devices_without_a_gpu_are_one_line(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    from study import main

    with pytest.raises(SystemExit) as exit_:
        main(["dst", "--devices", "0", "--dry-run"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--devices 0" in err and "no CUDA device" in err


def test_carry_from_reuses_another_studys_committed_rows_of_the_same_variant(tmp_path):
    """unipts_practice shares UniPTS and the magnitude baseline with the unipts study: same name, same
    overrides, so the committed rows are the same jobs; variants of their own are not carried."""
    study = load_study("unipts_practice")
    carried = carried_rows(study, tmp_path)  # no table of its own yet
    with open(ROOT / "docs" / "studies" / "unipts" / "table.csv", newline="") as f:
        source = {(r["variant"], float(r["budget"]), int(r["seed"])): r for r in csv.DictReader(f)}
    # only the rows of jobs this study runs (seeds 3-7): not the unipts study's AVX-512 seeds 0-2
    shared = {k for k in source if k[0] in ("UniPTS", "magnitude global + CE FT") and k[2] in study.seeds}
    assert {k[2] for k in shared} == {3, 4} and set(carried) == shared
    for key in shared:
        assert carried[key]["metric"] == float(source[key]["metric"]) and carried[key]["cpu_kind"] == source[key]["cpu_kind"]
    with pytest.raises(PruneLabError, match="carry_from names study 'nope'"):
        load_study(str(write_yaml(tmp_path / "c.yaml", "carry_from: [nope]\nvariants: {A: [method=magnitude]}\nbudgets: [0.5]\n")))


def test_rows_of_one_seed_from_two_cpu_kinds_are_flagged_and_not_paired(tmp_path):
    """A table written before `cpu_kind` (its `cpu_isa` names no vendor) is read back, but its rows
    pair with neither kind of a new row: on an Intel AVX-512 host the dense references of seeds 1 and
    3 differed from an AMD AVX-512 host's (docs/development/notebook.md)."""
    study = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5],
                  seeds=[0, 1], claims=[Claim("A", "B", ">", 0.5)])
    (tmp_path / "old").mkdir()
    with open(tmp_path / "old" / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["variant", "budget", "seed", "config", "cpu_isa", "metric", "dense_top1",
                                          "flops_reduction", "params_reduction", "train_wall_s"])
        w.writeheader()
        w.writerows([dict(variant=v, budget=0.5, seed=s, config=study.config_hash(v), cpu_isa="avx512", metric=0.8,
                          dense_top1=0.9, flops_reduction=0.5, params_reduction=0.5, train_wall_s=1.0)
                     for v in "AB" for s in (0, 1)])
    carried = carried_rows(study, tmp_path / "old")
    assert {r["cpu_kind"] for r in carried.values()} == {"avx512"} and all("cpu_isa" not in r for r in carried.values())
    rows = [*carried.values()]
    rows[0] = {**rows[0], "metric": 0.81}  # A, seed 0: still the old kind on both sides → paired
    rows[1] = {**rows[1], "metric": 0.81, "cpu_kind": "avx512-intel"}  # A, seed 1: re-run on another host
    judged = write_report(study, rows, tmp_path / "new")
    assert judged[0]["seeds"] == [0] and judged[0]["excluded"] == {"1": "different CPU kinds (avx512-intel, avx512)"}
    text = (tmp_path / "new" / "table.md").read_text()
    assert "CPU kind per seed: 0: avx512, 1: avx512 + avx512-intel." in text
    assert "Warning: the rows of seed 1 come from different CPU kinds (avx512, avx512-intel)" in text
    assert "Warning: the rows of seed 0" not in text
    table = list(csv.DictReader(open(tmp_path / "new" / "table.csv")))
    assert "cpu_isa" not in table[0] and {r["cpu_kind"] for r in table} == {"avx512", "avx512-intel"}


def test_foreign_seeds_are_those_with_rows_of_other_kinds_only():
    rows = [dict(seed=0, cpu_kind="avx512-amd"), dict(seed=0, cpu_kind="avx512-intel"),  # both: this kind is there
            dict(seed=1, cpu_kind="avx512-amd"), dict(seed=2, cpu_kind=""), dict(seed=3)]  # unrecorded: no kind
    assert foreign_seeds(rows, "avx512-intel") == {1: ["avx512-amd"]}
    assert foreign_seeds(rows, "") == {}  # a host whose kind is unknown judges nothing


def test_the_runner_leaves_a_seed_of_another_cpu_kind_to_such_a_host(tmp_path):
    """Seed 1's committed rows come from another CPU kind: its missing job would pair with none of
    them, so the runner lists it as `other kind` and does not run it, unless --any-kind."""
    if not cpu_kind():
        pytest.skip("this host's CPU kind is not known")
    path = write_yaml(tmp_path / "two.yaml", "base: [experiment=quickstart]\nvariants: {A: [method=magnitude], "
                                             "B: [method=random]}\nbudgets: [0.8]\nseeds: [0, 1]\n")
    study = load_study(str(path))
    report = tmp_path / "report"
    rows = [dict(variant="A", budget=0.8, seed=s, config=study.config_hash("A"), metric=0.5, dense_top1=0.9,
                 flops_reduction=0.8, params_reduction=0.8, train_wall_s=1.0,
                 cpu_kind=cpu_kind() if s == 0 else "avx2-elsewhere") for s in (0, 1)]
    write_report(study, rows, report)
    cmd = [sys.executable, str(ROOT / "scripts" / "study.py"), str(path), "--out", str(tmp_path / "jobs"),
           "--report", str(report), "--dry-run"]
    dry = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    state = {f"{m[2]} s{m[3]}": m[1] for m in re.finditer(r"^  (\w+(?: kind)?) +jobs/(\w)[^/]*/b0.8_s(\d)", dry.stdout, re.M)}
    assert state == {"a s0": "carried", "a s1": "carried", "b s0": "todo", "b s1": "other kind"}
    assert f"seed 1: its rows come from avx2-elsewhere and this host is {cpu_kind()}" in dry.stderr
    anyway = subprocess.run([*cmd, "--any-kind"], capture_output=True, text=True, timeout=120)
    assert anyway.stdout.count("  todo ") == 2 and "other kind" not in anyway.stdout


def test_a_seed_whose_dense_reference_is_cached_runs_its_jobs_at_once(tmp_path):
    """A seed's first job trains its dense reference while the seed's other jobs wait for it; once the
    reference is in the cache nothing waits. A stand-in for python records how many jobs overlap."""
    from prune_lab.pipeline import dense_key
    from prune_lab.study import Job, compose_train
    from prune_lab.study_runner import dense_cached, run_jobs

    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!/bin/sh
d={tmp_path}/running; mkdir -p $d
touch $d/$$
sleep 1
ls $d | wc -l > "$(echo "$@" | sed 's/.*hydra.run.dir=\\([^ ]*\\).*/\\1/')/overlap"
rm $d/$$
""")
    fake.chmod(0o755)
    base = ("experiment=quickstart", f"paths.root_dir={ROOT}", f"paths.dense_dir={tmp_path}/dense", "seed=0")

    def jobs(tag):
        return [Job("A", b, 0, (*base, "method=magnitude", f"budget={b}"), tmp_path / tag / f"b{b}") for b in (0.5, 0.7)]

    def overlaps(tag):
        todo = jobs(tag)
        assert run_jobs(todo, 2, 1, str(fake)) == []
        return [int((j.directory / "overlap").read_text()) for j in todo]

    assert not dense_cached(jobs("cold")[0])
    assert overlaps("cold") == [1, 1]  # the second job started after the first had ended
    cfg = compose_train([*base, "method=magnitude", "budget=0.5"])
    cached = tmp_path / "dense" / f"resnet_digits_{dense_key(cfg)}"
    cached.mkdir(parents=True)
    (cached / "dense.json").write_text("{}")
    assert dense_cached(jobs("warm")[0])
    assert max(overlaps("warm")) == 2  # both ran at once
