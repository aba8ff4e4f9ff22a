"""The verdict vocabulary of a study's claims, computed from seed-paired differences.

A claim "A op B" is judged on the per-seed differences d = A − B in points (the variants of a seed
share one dense reference, so pairing removes the seed's luck), their mean and the 95 % two-sided
t-interval [lo, hi] (each tail 2.5 %). The interval is then read in one of five words, the same
in verdicts.json, tables, README and docs:

    equivalent     lo > −m and hi < +m         only for op "==": two one-sided tests at margin m
    better         lo > 0                      A above B
    worse          hi < 0                      A below B (even if by less than the margin)
    not worse      lo > −m                     A at worst m points below B; always printed with m
    within noise   none of these

The op says which word supports the claim: ">" better; ">=" better or not worse; "==" equivalent.

Multiplicity. A study marks at most three claims `primary` (the paper's headline claims). They need
at least PRIMARY_SEEDS seeds (fewer: "needs N more seeds", never a verdict) and are adjusted with
Holm–Bonferroni across the study's primaries at one-sided level ALPHA (a primary not judged yet
counts as p = 1) (the claim's own null
hypothesis: d ≤ 0 for ">", d ≤ −m for ">=", |d| ≥ m for "=="). The adjusted verdict is the claim's
word when Holm rejects its null; otherwise the interval at the Bonferroni level 1 − 2·ALPHA/k is read
(it can only say worse, within noise, or a word that does not support the claim). Every other claim
is `exploratory`: at least EXPLORATORY_SEEDS seeds, unadjusted. A claim with no paired seed at all
in a report (its variants run elsewhere, or not yet) reads "not run".

Written by hand: scipy gives the t quantiles and tails; the vocabulary and Holm's step-down over
one-sided t-tests are a few lines that no library states this way.
"""
from __future__ import annotations

import math
import statistics

ALPHA = 0.025  # one-sided; the 95 % two-sided interval's tail
PRIMARY_SEEDS = 5
EXPLORATORY_SEEDS = 3
DEFAULT_MARGIN = 0.25  # points; a larger margin needs a one-line `why` in the study config
WORDS = ("better", "not worse", "equivalent", "within noise", "worse")
SUPPORTS = {">": ("better",), ">=": ("better", "not worse"), "==": ("equivalent",)}
CLAIM_WORD = {">": "better", ">=": "not worse", "==": "equivalent"}
OPS = tuple(SUPPORTS)


def word(lo: float, hi: float, margin: float, op: str) -> str:
    """The vocabulary word for an interval of differences (points) at margin `margin` (points)."""
    if op == "==" and lo > -margin and hi < margin:  # the question an equivalence claim asks comes first
        return "equivalent"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    if lo > -margin:
        return "not worse"
    return "within noise"


def label(verdict: str, margin: float) -> str:
    """A verdict as printed: `not worse` and `equivalent` always carry their margin."""
    if verdict in ("not worse", "equivalent"):
        return f"{verdict} (margin {margin:g})"
    return verdict


def interval(diffs: list[float], level: float = 1 - 2 * ALPHA) -> tuple[float, float, float]:
    """Mean and two-sided t-interval at `level` of the differences (n >= 2)."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def p_value(diffs: list[float], op: str, margin: float) -> float:
    """One-sided p of the claim's null hypothesis (module docstring); TOST: the larger of the two."""
    from scipy import stats

    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        sd = 1e-12  # identical differences: the test is decided by the sign of mean − bound

    def above(bound: float) -> float:  # H0: mean <= bound
        return float(stats.t.sf((mean - bound) / (sd / math.sqrt(n)), n - 1))

    if op == ">":
        return above(0.0)
    if op == ">=":
        return above(-margin)
    below = float(stats.t.cdf((mean - margin) / (sd / math.sqrt(n)), n - 1))  # H0: mean >= margin
    return max(above(-margin), below)


def judge(diffs: list[float], op: str, margin: float, primary: bool) -> dict:
    """Raw verdict of one claim (differences in points); the adjusted one is set by `adjust`."""
    need = PRIMARY_SEEDS if primary else EXPLORATORY_SEEDS
    out = {"n": len(diffs), "primary": primary, "label": "primary" if primary else "exploratory",
           "mean": float("nan"), "ci95": [float("nan")] * 2, "p": float("nan")}
    if len(diffs) >= 2:
        mean, lo, hi = interval(diffs)
        out.update(mean=mean, ci95=[lo, hi], p=p_value(diffs, op, margin))
    if not diffs:  # neither seed has both variants in this report (a variant run elsewhere or not yet)
        out["raw_verdict"] = out["verdict"] = "not run"
        out["judged"] = False
        return out
    if len(diffs) < need:
        out["raw_verdict"] = out["verdict"] = f"needs {need - len(diffs)} more seed{'s' if need - len(diffs) > 1 else ''}"
        out["judged"] = False
        return out
    out["raw_verdict"] = word(*out["ci95"], margin, op)
    out["verdict"] = out["raw_verdict"]  # exploratory: unadjusted
    out["judged"] = True
    return out


def adjust(records: list[dict], diffs_of) -> None:
    """Holm across the judged primaries of one study (in place): `adjusted_p` and the adjusted verdict.

    `diffs_of(record)` gives the record's differences (points) for the Bonferroni-level interval.
    """
    # the family is every primary claim of the study; one not judged yet (too few seeds) counts as p = 1,
    # last in Holm's order: it is never rejected and keeps the others' correction as strict as it will be
    family = [r for r in records if r["primary"] and r["judged"]]
    k = sum(1 for r in records if r["primary"] and r["verdict"] != "budget not run")
    running = 0.0
    for rank, r in enumerate(sorted(family, key=lambda r: r["p"])):
        running = max(running, min(1.0, (k - rank) * r["p"]))  # Holm's step-down adjusted p
        r["adjusted_p"], r["family"] = running, k
    for r in family:
        mean, lo, hi = interval(diffs_of(r), 1 - 2 * ALPHA / k)
        w = word(lo, hi, r["margin"], r["op"])
        if r["adjusted_p"] <= ALPHA:  # Holm rejects the null: the claim's word, unless the interval says more
            r["verdict"] = w if w in SUPPORTS[r["op"]] or w == "worse" else CLAIM_WORD[r["op"]]
        else:  # not rejected: never a word that supports the claim
            r["verdict"] = "within noise" if w in SUPPORTS[r["op"]] else w
        r["ci_adjusted"] = [lo, hi]
