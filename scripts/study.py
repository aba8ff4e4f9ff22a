"""Run a study (conf/study/<name>.yaml) and judge its claims.

    python scripts/study.py dst                          # every job, 2 one-thread jobs at a time
    python scripts/study.py dst --report docs/studies/dst   # also write the table where the README reads it
    python scripts/study.py dst --seeds 3 4 5             # re-check the claims on other seeds
    python scripts/study.py dst --budgets 0.95 --variants RigL IEE   # part of it first
    python scripts/study.py dst --dry-run                 # list the jobs and what is finished
    python scripts/study.py dst --report-only             # tables from the finished jobs, run nothing
    python scripts/study.py latency --from-table --report docs/studies/latency_avx512   # re-judge a committed table
    python scripts/study.py --summary                     # docs/results.md + README block from every verdicts.json

Jobs are ordinary train.py runs in outputs/studies/<name>/jobs/<variant>-<hash>/b<budget>_s<seed>/;
a job with a results.json is skipped, one with a checkpoint resumes, so an interrupted study is
continued by running the same command. outputs/ does not outlive a machine: a job whose row is in
the report's table.csv with the same overrides (its `config` hash) is skipped too, so a study
longer than a session is continued from its committed table (--fresh ignores it). A seed whose
rows all come from another CPU kind than this host's is left for such a host (--any-kind runs it).
Writes table.md, table.csv (one row per job), verdicts.json and plot.png to the report folder
(default outputs/studies/<name>/).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prune_lab.errors import PruneLabError  # noqa: E402
from prune_lab.cpu import cpu_kind  # noqa: E402
from prune_lab.study import carried_rows, check_overrides, collect, covering, foreign_seeds, load_study  # noqa: E402
from prune_lab.study_runner import run_jobs  # noqa: E402
from prune_lab.study_report import write_report  # noqa: E402
from prune_lab.study_plots import curves, exploration  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", nargs="?", help="a name in conf/study/ or a path to a study yaml")
    ap.add_argument("--jobs", type=int, default=2, help="jobs run at a time (default 2); per device with --devices")
    ap.add_argument("--devices", nargs="+", metavar="GPU", help="GPU indices to fill (or 'all'): --jobs jobs on "
                    "each, every job pinned to one (CUDA_VISIBLE_DEVICES); add --set trainer=gpu data.on_device=true")
    ap.add_argument("--threads", type=int, default=1, help="threads per job (OMP_NUM_THREADS, default 1)")
    ap.add_argument("--seeds", type=int, nargs="+", help="replace the study's seeds (re-checks)")
    ap.add_argument("--budgets", type=float, nargs="+", help="replace the study's budgets")
    ap.add_argument("--variants", nargs="+", metavar="NAME", help="run only these variants' jobs (the report "
                    "still holds every finished row): the core comparison first, ablations later")
    ap.add_argument("--set", dest="extra", nargs="+", default=[], metavar="OVERRIDE",
                    help="overrides added to every job (a separate output folder)")
    ap.add_argument("--out", type=Path, help="job folder root (default outputs/studies/<name>[-<hash of --set>])")
    ap.add_argument("--report", type=Path, help="where tables and plot go (default: the job folder root)")
    ap.add_argument("--dry-run", action="store_true", help="list the jobs; run nothing")
    ap.add_argument("--report-only", action="store_true", help="write the report from finished jobs; run nothing")
    ap.add_argument("--from-table", action="store_true", help="re-judge from the report's committed table.csv "
                    "alone (no job folders read; implies --report-only)")
    ap.add_argument("--summary", action="store_true", help="write docs/results.md and the README's results block "
                    "from every docs/studies/*/verdicts.json; run nothing")
    ap.add_argument("--fresh", action="store_true", help="run every job without a results.json, ignoring the rows "
                    "of the report's table.csv and of the carry_from studies' tables")
    ap.add_argument("--any-kind", action="store_true", help="also run the jobs of seeds whose rows all come from "
                    "another CPU kind (skipped by default: they would pair with none of them)")
    args = ap.parse_args(argv)
    devices = None
    if args.devices:  # checked before anything runs: a typo must not start jobs on the wrong device
        import torch

        count = torch.cuda.device_count()
        devices = [str(i) for i in range(count)] if args.devices == ["all"] else args.devices
        if not devices or any(not d.isdigit() or int(d) >= count for d in devices):
            ap.error(f"--devices {' '.join(args.devices)}: {count} CUDA device(s) visible here; give indices "
                     f"0..{count - 1} or 'all'" if count else f"--devices {' '.join(args.devices)}: no CUDA device "
                     "is visible here; leave --devices out to run on the CPU")
    if args.summary:
        from prune_lab.results_summary import write_summary

        for path in write_summary(ROOT):
            print(f"wrote {path}")
        return 0
    if not args.study:
        ap.error("name a study (or --summary)")
    args.report_only = args.report_only or args.from_table
    try:
        study = load_study(args.study, seeds=args.seeds, budgets=args.budgets, extra=args.extra)
        unknown = sorted(set(args.variants or []) - set(study.variants))
        if unknown:
            raise PruneLabError(f"--variants {', '.join(map(repr, unknown))}: not in study {study.name}; "
                                f"its variants are: {', '.join(map(repr, study.variants))}")
        if not args.report_only:
            check_overrides(study)
    except PruneLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    suffix = "-" + hashlib.sha1(" ".join(args.extra).encode()).hexdigest()[:6] if args.extra else ""
    out = args.out or ROOT / "outputs" / "studies" / f"{study.name}{suffix}"
    report = args.report or out
    if args.from_table:
        out = report / ".no-jobs"  # never created: every row comes from the table
    jobs = [j for j in study.jobs(out) if not args.variants or j.variant in args.variants]
    carried = {} if args.fresh else carried_rows(study, report)
    is_carried = [not j.done and (j.variant, j.budget, j.seed) in carried for j in jobs]
    finished = sum(j.done for j in jobs) + sum(is_carried)
    # a seed's rows must come from one CPU kind: a host of another kind leaves that seed's jobs alone
    here = cpu_kind()
    foreign = {} if args.any_kind or args.report_only else foreign_seeds(collect(study, out, carried), here)
    is_foreign = [not j.done and not c and j.seed in foreign for j, c in zip(jobs, is_carried)]
    print(f"study {study.name}: {len(jobs)} jobs ({len(study.variants)} variants × {len(study.budgets)} budgets × "
          f"{len(study.seeds)} seeds{'; some variants at their own budgets only' if study.only else ''}), {finished} finished ({sum(is_carried)} carried from committed tables); "
          f"jobs in {out}")
    for seed, kinds in sorted(foreign.items()):
        n = sum(f for j, f in zip(jobs, is_foreign) if j.seed == seed)
        if n:
            print(f"seed {seed}: its rows come from {', '.join(kinds)} and this host is {here}: its {n} unfinished "
                  "job(s) are left for such a host (--any-kind runs them here, e.g. to re-run the whole seed after "
                  "deleting its rows from table.csv)", file=sys.stderr)
    if args.dry_run:
        for j, c, f in zip(jobs, is_carried, is_foreign):
            state = "done" if j.done else "carried" if c else "other kind" if f else "todo"
            print(f"  {state:10s}  {j.directory.relative_to(out)}  {' '.join(j.overrides)}")
        return 0
    failed = []
    left_alone = sum(is_foreign)  # not this host's to run: the bar counts only the jobs it can finish
    if not args.report_only and finished + left_alone < len(jobs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[last]}")) as bar:
            task = bar.add_task(f"study {study.name}", total=len(jobs) - left_alone, completed=finished,
                                last="")
            failed = run_jobs([j for j, c, f in zip(jobs, is_carried, is_foreign) if not (c or f)], args.jobs,
                              args.threads, sys.executable,
                              progress=lambda j: bar.update(task, advance=1, last=f"{j.variant} b={j.budget:g} s={j.seed}"),
                              devices=devices)
    rows = collect(study, out, carried)
    report.mkdir(parents=True, exist_ok=True)  # the pictures first: table.md links the ones that exist
    drawn = curves(study, study.jobs(out), report / "curves.png")
    explored = exploration(study, study.jobs(out), report / "exploration.png")
    judged = write_report(covering(study, rows), rows, report)
    print((report / "table.md").read_text())
    for job, rc in failed:
        print(f"failed (exit {rc}): {job.directory} — see its run.log", file=sys.stderr)
    have = {(r["variant"], r["budget"], r["seed"]) for r in rows}
    missing = sum((j.variant, j.budget, j.seed) not in have for j in jobs)
    if missing:
        print(f"{missing} of {len(jobs)} jobs have no results yet; run the same command to continue", file=sys.stderr)
    print(f"report: {report}/table.md, table.csv, verdicts.json, plot.png ({len(judged)} verdicts)"
          + (f", curves.png + curves.csv ({drawn} runs)" if drawn else "")
          + (f", exploration.png + exploration.csv ({explored} runs)" if explored else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
