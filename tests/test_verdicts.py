"""The verdict vocabulary (prune_lab/verdicts.py): the five words, p-values against scipy's t-test,
Holm's step-down across a study's primary claims, and how studies feed them (seed pairing, config checks)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy import stats

from prune_lab.errors import PruneLabError
from prune_lab.study import Claim, Study, load_study, verdicts
from prune_lab.verdicts import ALPHA, adjust, interval, judge, label, p_value, word


def t_interval(diffs, level=0.95):
    """Two-sided t-interval from scipy's own interval routine (not verdicts.interval)."""
    d = np.asarray(diffs, dtype=float)
    return stats.t.interval(level, len(d) - 1, loc=d.mean(), scale=stats.sem(d))


# -- the five words ----------------------------------------------------------------------------------
@pytest.mark.parametrize("diffs, op, margin, expected", [
    ([1.0, 1.2, 1.1], ">", 0.25, "better"),
    ([1.0, 1.2, 1.1], "==", 0.25, "better"),                 # lo > 0 is better whatever the op
    ([-1.0, -1.2, -1.1], ">", 0.25, "worse"),
    ([-1.0, -1.2, -1.1], ">=", 0.25, "worse"),
    # hi < 0 although lo > -margin: A is below B, if by less than the margin -> worse, not "not worse"
    ([-0.1, -0.11, -0.09], ">=", 0.25, "worse"),
    ([-0.1, -0.11, -0.09], "==", 0.25, "equivalent"),        # "==" asks for equivalence first: inside (-m, +m)
    ([-0.1, -0.11, -0.09], ">", 0.25, "worse"),
    # an interval inside (-m, +m) that contains 0: equivalent only for "=="
    ([0.05, -0.05, 0.0], "==", 0.25, "equivalent"),
    ([0.05, -0.05, 0.0], ">=", 0.25, "not worse"),
    ([0.05, -0.05, 0.0], ">", 0.25, "not worse"),
    # lo > -m but hi > +m: not worse, and not equivalent even for "=="
    ([0.3, 0.5, 0.75], "==", 0.25, "not worse"),
    ([0.3, 0.5, 0.75], ">=", 0.25, "not worse"),
    ([2.0, -1.0, 0.5], ">", 0.25, "within noise"),
    ([2.0, -1.0, 0.5], "==", 0.25, "within noise"),
    ([2.0, -1.0, 0.5], ">=", 0.25, "within noise"),
])
def test_each_word_on_crafted_differences(diffs, op, margin, expected):
    v = judge(diffs, op, margin, primary=False)
    lo, hi = t_interval(diffs)
    assert v["ci95"] == pytest.approx([lo, hi], abs=1e-9)
    assert v["raw_verdict"] == v["verdict"] == expected
    assert word(lo, hi, margin, op) == expected
    assert v["judged"] and v["n"] == 3 and not v["primary"] and v["label"] == "exploratory"


def test_word_boundaries():
    assert word(0.01, 1.0, 0.25, ">") == "better"
    assert word(0.0, 1.0, 0.25, ">") == "not worse"  # lo > 0 is strict
    assert word(-1.0, -0.01, 0.25, ">=") == "worse"
    assert word(-1.0, 0.0, 0.25, ">=") == "within noise"  # hi < 0 is strict
    assert word(-0.25, 0.1, 0.25, ">=") == "within noise"  # lo > -m is strict
    assert word(-0.24, 0.1, 0.25, ">=") == "not worse"
    assert word(-0.24, 0.24, 0.25, "==") == "equivalent"
    assert word(-0.24, 0.25, 0.25, "==") == "not worse"  # hi < +m is strict
    assert word(-0.24, 0.24, 0.5, ">") == "not worse" and word(-0.6, 0.24, 0.5, "==") == "within noise"
    # the margin decides: the same interval at a wider margin
    assert word(-0.4, 0.3, 0.25, "==") == "within noise" and word(-0.4, 0.3, 0.5, "==") == "equivalent"


def test_label_prints_the_margin_of_not_worse_and_equivalent_only():
    assert label("not worse", 0.25) == "not worse (margin 0.25)"
    assert label("equivalent", 0.5) == "equivalent (margin 0.5)"
    assert label("equivalent", 1.0) == "equivalent (margin 1)"
    for w in ("better", "worse", "within noise", "needs 2 more seeds", "budget not run"):
        assert label(w, 0.25) == w


def test_claim_text_reads_the_vocabulary():
    assert Claim("A", "B", ">").text(0.5) == "A better than B at budget 0.5"
    assert Claim("A", "B", ">=").text(0.5) == "A not worse than B at budget 0.5 (margin 0.25)"
    assert Claim("A", "B", "==", margin=0.5).text(0.85) == "A equivalent to B at budget 0.85 (margin 0.5)"


# -- p-values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("diffs", [
    [1.0, 1.2, 1.1],
    [0.05, -0.05, 0.0, 0.1, -0.02],
    [-0.3, 0.1, -0.2, 0.4],
    [2.0, -1.0, 0.5],
    [-1.0, -1.2, -1.1, -0.9, -1.05],
])
@pytest.mark.parametrize("margin", [0.25, 0.5])
def test_p_value_against_scipy_one_sample_t_tests(diffs, margin):
    d = np.asarray(diffs, dtype=float)
    greater = stats.ttest_1samp(d, 0.0, alternative="greater").pvalue
    non_inferior = stats.ttest_1samp(d + margin, 0.0, alternative="greater").pvalue  # H0: mean <= -m
    below_upper = stats.ttest_1samp(d - margin, 0.0, alternative="less").pvalue  # H0: mean >= +m
    assert p_value(diffs, ">", margin) == pytest.approx(greater, rel=1e-9, abs=1e-15)
    assert p_value(diffs, ">=", margin) == pytest.approx(non_inferior, rel=1e-9, abs=1e-15)
    assert p_value(diffs, "==", margin) == pytest.approx(max(non_inferior, below_upper), rel=1e-9, abs=1e-15)
    assert judge(diffs, ">=", margin, primary=False)["p"] == pytest.approx(non_inferior, rel=1e-9, abs=1e-15)


def test_p_value_agrees_with_the_interval():
    # one-sided p < ALPHA exactly when the 95 % interval's low end clears the claim's bound
    for diffs in ([0.0, 1.5, 3.0, 4.5, 6.0], [0.0, 1.0, 3.0, 4.5, 6.0], [-0.3, 0.1, -0.2, 0.4], [1.0, 1.2, 1.1]):
        _, lo, hi = interval(diffs)
        assert (p_value(diffs, ">", 0.25) < ALPHA) == (lo > 0)
        assert (p_value(diffs, ">=", 0.25) < ALPHA) == (lo > -0.25)
        assert (p_value(diffs, "==", 0.25) < ALPHA) == (lo > -0.25 and hi < 0.25)


def test_p_value_of_identical_differences_follows_the_sign():
    assert p_value([1.0, 1.0, 1.0], ">", 0.25) < 1e-6
    assert p_value([-1.0, -1.0, -1.0], ">", 0.25) > 1 - 1e-6
    assert p_value([-0.1, -0.1, -0.1], ">=", 0.25) < 1e-6


# -- seeds needed --------------------------------------------------------------------------------------
def test_primary_claims_need_five_seeds_and_count_in_the_family_before():
    four = judge([1.0, 1.1, 1.2, 1.3], ">", 0.25, primary=True)
    assert four["verdict"] == four["raw_verdict"] == "needs 1 more seed" and not four["judged"]
    assert four["label"] == "primary" and four["mean"] == pytest.approx(1.15)
    five = judge([1.0, 1.1, 1.2, 1.3, 1.4], ">", 0.25, primary=True)
    assert five["verdict"] == "better" and five["judged"]
    four.update(op=">", margin=0.25, diffs=[1.0, 1.1, 1.2, 1.3])
    five.update(op=">", margin=0.25, diffs=[1.0, 1.1, 1.2, 1.3, 1.4])
    adjust([four, five], lambda r: r["diffs"])
    assert "adjusted_p" not in four and "family" not in four and "ci_adjusted" not in four
    assert four["verdict"] == "needs 1 more seed"
    # the unjudged primary still belongs to the family (as p = 1, last): the judged one is corrected for 2
    assert five["family"] == 2 and five["adjusted_p"] == pytest.approx(2 * five["p"])
    assert judge([1.0, 1.1, 1.2], ">", 0.25, primary=False)["verdict"] == "better"  # exploratory: 3 suffice
    assert judge([1.0, 1.1], ">", 0.25, primary=False)["verdict"] == "needs 1 more seed"
    assert judge([1.0], ">", 0.25, primary=True)["verdict"] == "needs 4 more seeds"
    none = judge([], ">", 0.25, primary=True)  # no seed has both variants
    assert none["verdict"] == "not run" and not none["judged"]


# -- Holm ------------------------------------------------------------------------------------------------
def _record(diffs, op=">", margin=0.25, primary=True, **extra):
    r = judge(diffs, op, margin, primary)
    r.update(op=op, margin=margin, diffs=diffs, **extra)
    return r


def holm(ps):
    """Holm's step-down adjusted p-values, written out: sort, multiply by (k − rank), running max, cap at 1."""
    k = len(ps)
    order = sorted(range(k), key=lambda i: ps[i])
    adjusted, running = [0.0] * k, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def test_holm_on_known_p_values_with_the_monotone_max():
    # given in unsorted order; by hand: 3·0.010 = 0.030; 2·0.012 = 0.024 -> max 0.030; 1·0.020 -> max 0.030
    diffs = [1.0, 1.1, 1.2, 1.3, 1.4]
    recs = [_record(diffs) for _ in range(3)]
    for r, p in zip(recs, (0.020, 0.010, 0.012)):
        r["p"] = p
    adjust(recs, lambda r: r["diffs"])
    assert [r["adjusted_p"] for r in recs] == pytest.approx([0.030, 0.030, 0.030])
    assert all(r["family"] == 3 for r in recs)
    # 3·0.005 = 0.015, 2·0.02 = 0.04, 1·0.6 = 0.6
    recs = [_record(diffs) for _ in range(3)]
    for r, p in zip(recs, (0.6, 0.005, 0.02)):
        r["p"] = p
    adjust(recs, lambda r: r["diffs"])
    assert [r["adjusted_p"] for r in recs] == pytest.approx([0.6, 0.015, 0.04])
    # capped at 1, and still monotone after the cap
    for r, p in zip(recs, (0.5, 0.45, 0.9)):
        r["p"] = p
    adjust(recs, lambda r: r["diffs"])
    assert [r["adjusted_p"] for r in recs] == pytest.approx([1.0, 1.0, 1.0])


def test_holm_on_real_claims_matches_the_written_out_step_down():
    recs = [_record([1.0, 1.2, 1.1, 0.9, 1.05]),                       # strong
            _record([0.0, 1.5, 3.0, 4.5, 6.0]),                         # raw better, p ≈ 0.024
            _record([-0.1, 0.2, 0.1, 0.0, 0.15], op=">=", margin=0.25)]  # non-inferiority
    ps = [stats.ttest_1samp(np.asarray(r["diffs"]) + (r["margin"] if r["op"] == ">=" else 0.0), 0.0,
                            alternative="greater").pvalue for r in recs]
    assert [r["p"] for r in recs] == pytest.approx(ps, rel=1e-9)
    adjust(recs, lambda r: r["diffs"])
    assert [r["adjusted_p"] for r in recs] == pytest.approx(holm(ps), rel=1e-9)
    k = 3
    for r in recs:
        assert r["ci_adjusted"] == pytest.approx(list(t_interval(r["diffs"], 1 - 2 * ALPHA / k)), abs=1e-9)
        lo95, hi95 = r["ci95"]
        assert r["ci_adjusted"][0] < lo95 and r["ci_adjusted"][1] > hi95  # Bonferroni level: wider


def test_a_raw_better_claim_that_holm_does_not_reject_reads_within_noise():
    shaky = [0.0, 1.5, 3.0, 4.5, 6.0]  # 95 % interval just above 0 (p ≈ 0.024), wide
    recs = [_record(shaky), _record([-1.0, 0.0, 1.0, 2.0, 3.0]), _record([-2.0, 0.0, 1.0, 2.0, 0.5])]
    assert recs[0]["raw_verdict"] == "better" and recs[0]["p"] < ALPHA
    before = copy.deepcopy(recs[0])
    adjust(recs, lambda r: r["diffs"])
    assert recs[0]["adjusted_p"] >= 3 * recs[0]["p"] > ALPHA  # not rejected
    assert recs[0]["verdict"] == "within noise"
    assert recs[0]["raw_verdict"] == "better"  # the unadjusted word stays
    assert recs[0]["ci95"] == before["ci95"] and recs[0]["p"] == before["p"]
    assert recs[0]["ci_adjusted"][0] < -0.25


def test_a_claim_holm_rejects_keeps_its_word():
    recs = [_record([1.0, 1.2, 1.1, 0.9, 1.05]), _record([-1.0, 0.0, 1.0, 2.0, 3.0]),
            _record([-0.1, 0.2, 0.1, 0.0, 0.15], op=">=")]
    adjust(recs, lambda r: r["diffs"])
    assert recs[0]["adjusted_p"] <= ALPHA and recs[0]["verdict"] == "better"
    # the non-inferiority claim: p ≈ 0.002, Holm 2·p < α; its Bonferroni interval stays above −m
    assert recs[2]["raw_verdict"] == "not worse" and recs[2]["adjusted_p"] <= ALPHA
    assert recs[2]["ci_adjusted"][0] > -0.25 and recs[2]["verdict"] == "not worse"
    # a claim Holm does not reject never gets a word that supports it
    assert recs[1]["adjusted_p"] > ALPHA and recs[1]["verdict"] == "within noise"


def test_adjust_leaves_exploratory_records_alone_and_leaves_them_out_of_the_family():
    primaries = [_record([1.0, 1.2, 1.1, 0.9, 1.05]), _record([0.0, 1.5, 3.0, 4.5, 6.0])]
    exploratory = [_record([0.0, 1.5, 3.0], primary=False), _record([5.0, 5.1, 5.2], primary=False),
                   _record([0.05, -0.05, 0.0], op="==", primary=False)]
    snapshot = copy.deepcopy(exploratory)
    records = [exploratory[0], primaries[0], exploratory[1], primaries[1], exploratory[2]]
    adjust(records, lambda r: r["diffs"])
    assert exploratory == snapshot
    assert all("adjusted_p" not in r for r in exploratory)
    assert [r["family"] for r in primaries] == [2, 2]  # the exploratory claims do not count
    ps = [r["p"] for r in primaries]
    assert [r["adjusted_p"] for r in primaries] == pytest.approx(holm(ps))


def test_a_family_of_one_adjusts_nothing_for_an_equivalence_claim():
    r = _record([0.1, 0.11, 0.09, 0.1, 0.1], op="==")  # interval inside (0, 0.25): TOST rejects, p tiny
    adjust([r], lambda r: r["diffs"])
    assert r["ci_adjusted"] == pytest.approx(r["ci95"])
    assert r["verdict"] == r["raw_verdict"]


# -- how a study feeds the verdicts ------------------------------------------------------------------
def _row(variant, seed, metric, dense=0.9, cpu="avx2-amd", budget=0.5):
    row = dict(variant=variant, budget=budget, seed=seed, metric=metric, dense_top1=dense, flops_reduction=budget,
               params_reduction=budget, train_wall_s=1.0)
    if cpu is not None:
        row["cpu_kind"] = cpu
    return row


def test_verdicts_exclude_seeds_across_dense_references_or_cpu_kinds():
    study = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5],
                  seeds=[0, 1, 2, 3, 4], claims=[Claim("A", "B", ">", 0.5)])
    rows = [_row("A", 0, 0.81), _row("B", 0, 0.80),
            _row("A", 1, 0.81, dense=0.91), _row("B", 1, 0.80, dense=0.90),  # another dense reference
            _row("A", 2, 0.81, cpu="avx512-amd"), _row("B", 2, 0.80),  # another CPU kind
            _row("A", 3, 0.812), _row("B", 3, 0.80, cpu=None),  # kind not recorded for B: still paired
            _row("A", 4, 0.813, cpu=""), _row("B", 4, 0.80, cpu="avx512-intel")]  # empty: not known either
    [v] = verdicts(study, rows)
    assert v["seeds"] == [0, 3, 4]
    assert v["excluded"] == {"1": "different dense references", "2": "different CPU kinds (avx512-amd, avx2-amd)"}
    assert v["diffs"] == pytest.approx([1.0, 1.2, 1.3])  # points
    assert v["n"] == 3 and v["verdict"] == "better" and v["units"] == "points"
    assert v["cpu"] == ["avx2-amd", "avx512-intel", "unknown"]
    assert v["claim"] == "A better than B at budget 0.5" and v["margin"] == 0.25 and v["margin_why"] == ""


def test_verdicts_scale_only_top1_metrics_to_points():
    rows = [_row("A", s, 2.0 + s / 10) for s in range(3)] + [_row("B", s, 1.0) for s in range(3)]
    loss = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5], seeds=[0, 1, 2],
                 metric="pruned.loss", claims=[Claim("A", "B", ">", 0.5)])
    [v] = verdicts(loss, rows)
    assert v["diffs"] == pytest.approx([1.0, 1.1, 1.2]) and v["units"] == "pruned.loss"
    top5 = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5], seeds=[0, 1, 2],
                 metric="pruned.top5", claims=[Claim("A", "B", ">", 0.5)])
    assert verdicts(top5, rows)[0]["diffs"] == pytest.approx([100.0, 110.0, 120.0])


def test_verdicts_adjust_the_primary_claims_of_a_study():
    study = Study(name="t", description="", base=[], variants={"A": [], "B": [], "C": []}, budgets=[0.5],
                  seeds=[0, 1, 2, 3, 4], claims=[Claim("A", "B", ">", 0.5, primary=True),
                                                 Claim("B", "C", ">", 0.5, primary=True),
                                                 Claim("A", "C", ">", 0.5)])
    shaky = [0.0, 1.5, 3.0, 4.5, 6.0]  # alone (95 %): better, p ≈ 0.024
    weak = [-1.0, 0.0, 1.0, 2.0, 3.0]
    rows = [_row("A", s, 0.5 + shaky[s] / 100) for s in range(5)] + [_row("B", s, 0.5) for s in range(5)] + \
        [_row("C", s, 0.5 - weak[s] / 100) for s in range(5)]
    ab, bc, ac = verdicts(study, rows)
    assert ab["diffs"] == pytest.approx(shaky) and bc["diffs"] == pytest.approx(weak)
    assert ab["raw_verdict"] == "better" and ab["family"] == 2 and bc["family"] == 2 and "adjusted_p" not in ac
    assert [ab["adjusted_p"], bc["adjusted_p"]] == pytest.approx(holm([ab["p"], bc["p"]]))
    assert ab["adjusted_p"] == pytest.approx(2 * ab["p"]) and ab["adjusted_p"] > ALPHA
    assert ab["verdict"] == "within noise"  # not rejected, and the Bonferroni interval reaches below −m
    assert bc["verdict"] == "within noise" and ac["label"] == "exploratory" and ac["verdict"] == ac["raw_verdict"]


# -- study configs ---------------------------------------------------------------------------------------
def _load(tmp_path, claims: str, extra: str = ""):
    path = tmp_path / "s.yaml"
    path.write_text("variants: {A: [method=magnitude], B: [method=random]}\nbudgets: [0.5, 0.9]\nseeds: [0, 1, 2]\n"
                    + extra + "claims:\n" + claims)
    return load_study(str(path))


def _error(tmp_path, claims: str, extra: str = "") -> str:
    with pytest.raises(PruneLabError) as err:
        _load(tmp_path, claims, extra)
    text = str(err.value)
    assert "\n" not in text and text.startswith("study s: ")
    return text


def test_a_margin_above_the_default_needs_a_why(tmp_path):
    text = _error(tmp_path, "  - {a: A, b: B, op: '>=', margin: 0.5}\n")
    assert "why" in text and "0.5" in text
    study = _load(tmp_path, "  - {a: A, b: B, op: '>=', margin: 0.5, why: the paper's own threshold}\n")
    assert study.claims[0].margin == 0.5 and study.claims[0].why == "the paper's own threshold"
    assert _load(tmp_path, "  - {a: A, b: B, op: '>=', margin: 0.25}\n").claims[0].margin == 0.25  # no why needed
    assert _load(tmp_path, "  - {a: A, b: B, op: '>=', margin: 0.1}\n").claims[0].margin == 0.1
    assert _load(tmp_path, "  - {a: A, b: B}\n").claims[0].margin == 0.25  # the default, in points


@pytest.mark.parametrize("margin", ["0", "-0.1"])
def test_a_margin_must_be_positive(tmp_path, margin):
    assert "> 0" in _error(tmp_path, f"  - {{a: A, b: B, op: '>=', margin: {margin}}}\n")


def test_at_most_three_primary_claims(tmp_path):
    four = "".join(f"  - {{a: A, b: B, budget: {b}, primary: true}}\n" for b in (0.5, 0.9)) + \
        "".join(f"  - {{a: B, b: A, op: '>=', budget: {b}, primary: true}}\n" for b in (0.5, 0.9))
    text = _error(tmp_path, four)
    assert "at most 3" in text and "4 primary claims" in text
    # a primary claim without a budget is judged at every budget: two of them at two budgets are four
    both = "  - {a: A, b: B, primary: true}\n  - {a: B, b: A, op: '>=', primary: true}\n"
    assert "at most 3" in _error(tmp_path, both)
    three = four.split("\n", 1)[1]
    study = _load(tmp_path, three)
    assert sum(c.primary for c in study.claims) == 3
    # exploratory claims do not count
    assert len(_load(tmp_path, three + "  - {a: A, b: B}\n  - {a: B, b: A}\n").claims) == 5


def test_unknown_claim_keys(tmp_path):
    text = _error(tmp_path, "  - {a: A, b: B, margn: 0.1}\n")
    assert "unknown keys ['margn']" in text


def test_a_variant_on_some_seeds_runs_only_there(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("""
variants:
  A: [method=magnitude]
  probe: {overrides: [method=random], seeds: [0]}
  late: {overrides: [method=gmp], budgets: [0.9], seeds: [1, 2]}
budgets: [0.5, 0.9]
seeds: [0, 1, 2]
claims: [{a: A, b: probe, budget: 0.5}]
""")
    study = load_study(str(path))
    assert study.only_seeds == {"probe": [0], "late": [1, 2]} and study.variants["probe"] == ["method=random"]
    jobs = study.jobs(tmp_path / "out")
    assert sorted((j.budget, j.seed) for j in jobs if j.variant == "probe") == [(0.5, 0), (0.9, 0)]
    assert sorted((j.budget, j.seed) for j in jobs if j.variant == "late") == [(0.9, 1), (0.9, 2)]
    assert len([j for j in jobs if j.variant == "A"]) == 6
    assert all("seed=0" in j.overrides for j in jobs if j.variant == "probe")
    # the claim pairs the one seed both variants have
    rows = [_row("A", s, 0.8) for s in range(3)] + [_row("probe", 0, 0.7)]
    [v] = verdicts(study, rows)
    assert v["seeds"] == [0] and v["verdict"] == "needs 2 more seeds"


def test_an_unknown_dense_reference_is_treated_the_same_on_either_side():
    nan = float("nan")
    seeds = []
    for dense_a, dense_b in ((0.9, nan), (nan, 0.9)):
        study = Study(name="t", description="", base=[], variants={"A": [], "B": []}, budgets=[0.5],
                      seeds=[0, 1, 2], claims=[Claim("A", "B", ">", 0.5)])
        rows = [_row("A", 0, 0.81, dense=dense_a), _row("B", 0, 0.80, dense=dense_b)] + \
            [_row(v, s, 0.8 + (s / 100 if v == "A" else 0)) for s in (1, 2) for v in "AB"]
        seeds.append(verdicts(study, rows)[0]["seeds"])
    assert seeds[0] == seeds[1]
