"""Benchmarks: what prune_lab costs on top of dense training, and what its pruned models gain.

    python scripts/bench.py --quick --out bench.json     # < 5 min on 2 CPU cores
    python scripts/bench.py --out bench.json             # full: more repeats, ResNet-50 training too
    python scripts/bench.py --device cuda --amp bf16 --compile    # on a GPU: bf16 autocast, torch.compile
    python scripts/bench.py --only latency --latency-target 0.5 --out bench_latency.json   # the latency-target bench alone
    python scripts/bench.py --only nm --device cuda --out bench_nm.json   # 2:4 semi-structured kernels vs dense (GPU)
    python scripts/bench.py --only compile --out bench_compile.json   # module.compile=true: compiled/eager training step

Every figure is a ratio against a baseline measured in the same process, from medians over
interleaved repeats (dense, masked, dense, masked, ...), so slow drift of the machine cancels.
Keys (the benchmark contract): train_overhead_ratio, update_cost_fraction, speedup_fraction_of_ideal,
torch_pruning_speedup_fraction_of_ideal, peak_memory_ratio, plus search costs and details.
The pieces live in prune_lab/bench/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

from prune_lab.bench.deployment import realized_speedup
from prune_lab.bench.latency_target import latency_target_speedup
from prune_lab.bench.semi_structured import semi_structured_speedup
from prune_lab.bench.training import (channels_last_gain, compile_gain, peak_memory, stp_search_cost, train_overhead,
                                      unipts_search_cost, update_cost)
from prune_lab.models import create_model
from prune_lab.cpu import cpu_isa, cpu_kind, cpu_name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--round-to", type=int, default=32, help="kept channels rounded to this multiple")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where training is timed (latency is always measured on CPU too)")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none", help="autocast for the training steps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward of both models timed in training")
    ap.add_argument("--size", type=int, default=224, help="ResNet-50 input size of the speed-up benchmarks")
    ap.add_argument("--only", choices=("latency", "nm", "compile"), help="run only this section (latency: the latency-target "
                    "one; nm: 2:4 through PyTorch's semi-structured sparse kernels, CUDA only)")
    lat = ap.add_argument_group("latency target: ResNet-50 pruned to a measured latency budget, "
                                "batch 1 and 16, served on CPU, against torch-pruning's uniform at equal latency")
    lat.add_argument("--latency-target", type=float, help="fraction of the dense latency to remove (default with "
                                                          "--only latency: 0.5; otherwise the section is skipped)")
    lat.add_argument("--latency-round-to", type=int, default=8, help="kept channels rounded to this multiple")
    lat.add_argument("--table-points", type=int, default=8, help="latency-table grid points per channel dimension")
    lat.add_argument("--table-cache", default="outputs/latency_tables",
                     help="where measured table grids are cached ('none': not cached; a fresh folder re-measures)")
    lat.add_argument("--latency-tolerance", type=float, default=0.02,
                     help="meet_latency stops within half of this of the target")
    lat.add_argument("--latency-rounds", type=int, default=3, help="meet_latency's measured correction rounds")
    lat.add_argument("--noise-k", type=int, default=5, help="measurements of one dense/pruned pair for the noise")
    args = ap.parse_args()
    if args.only == "latency" and args.latency_target is None:
        args.latency_target = 0.5
    if args.latency_target is not None and not 0 < args.latency_target < 1:
        ap.error(f"--latency-target {args.latency_target}: expected a fraction of the dense latency in (0, 1)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    amp = None if args.amp == "none" else args.amp
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # the frozen layout uses it
    quick = args.quick
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t_start = time.time()
    res: dict = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                         "cpu_isa": cpu_isa(), "cpu_kind": cpu_kind(),
                         "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                         "amp": amp, "compile": args.compile, "quick": quick,
                         "date": time.strftime("%Y-%m-%d"), "host_load": os.getloadavg()[0]}}
    if args.latency_target is not None:
        res["latency_target"] = latency_target_speedup(
            args.latency_target, batches=(1, 16), size=args.size, points=args.table_points,
            cache_dir=None if args.table_cache == "none" else args.table_cache, round_to=args.latency_round_to,
            tolerance=args.latency_tolerance, rounds=args.latency_rounds, repeats=9 if quick else 21,
            noise_k=args.noise_k)
    if args.only in (None, "nm"):
        res["semi_structured_2_4"] = semi_structured_speedup(device, repeats=20 if quick else 50)
    batch = 64 if quick and device == "cpu" else 128
    r20 = create_model("resnet20", num_classes=10).to(device)
    x, y = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    if args.only in (None, "compile"):  # module.compile=true: the training step's compiled/eager ratio
        res["compiled_training"] = compile_gain("resnet20", r20, x, y, steps=4 if device == "cpu" else 20,
                                                rounds=6 if quick else 12, sync=sync, amp=amp)
    if args.only:  # one section alone: write it, print its table, stop
        res["wall_s"] = time.time() - t_start
        args.out.write_text(json.dumps(res, indent=2))
        if args.only == "nm":
            print_nm(res["semi_structured_2_4"])
        elif args.only == "compile":
            c = res["compiled_training"]
            print(f"masked training step, {c['model']} batch {c['batch']}: eager {c['eager_step_ms']:.1f} ms, compiled "
                  f"{c['compiled_step_ms']:.1f} ms (compiled/eager {c['compiled_over_eager']:.2f}x; first compiled "
                  f"step {c['first_compiled_step_s']:.0f} s)")
        else:
            print_latency_table(res["latency_target"])
        print(f"wrote {args.out} in {res['wall_s']:.0f} s")
        return 0
    kw = {"sync": sync, "amp": amp, "compile_": args.compile}
    res["train_overhead"] = [train_overhead("resnet20", r20, x, y, steps=4 if device == "cpu" else 20,
                                            rounds=16 if quick else 24, **kw)]
    if not quick or device == "cuda":
        r50 = torchvision.models.resnet50(num_classes=1000).to(device)
        b50 = 16 if device == "cpu" else 64
        xi, yi = torch.randn(b50, 3, 224, 224, device=device), torch.randint(0, 1000, (b50,), device=device)
        if device == "cuda":  # channels-last is the fast path of cuDNN convolutions
            r50, xi = r50.to(memory_format=torch.channels_last), xi.contiguous(memory_format=torch.channels_last)
        res["train_overhead"].append(train_overhead("resnet50", r50, xi, yi, steps=2 if device == "cpu" else 10,
                                                    rounds=5 if device == "cpu" else 10, **kw))
        del r50
    res["train_overhead_ratio"] = res["train_overhead"][0]["ratio"]
    res["channels_last_training"] = channels_last_gain("resnet20", r20, x, y, steps=4 if device == "cpu" else 20,
                                                       rounds=6 if quick else 12, sync=sync, amp=amp)
    res["update_cost"] = update_cost(x, y, sync)
    res["update_cost_fraction"] = res["update_cost"][res["update_cost"]["worst"]]["fraction"]
    res["speedup"] = realized_speedup(0.85, batches=(1, 16), size=args.size, repeats=9 if quick else 21,
                                      round_to=args.round_to, device=device)
    # the contract figures: CPU, batch 16, the deployment results.json measures (channels-last, BN folded)
    # the contract figures: CPU, batch 16, both pruned models served the way PyTorch serves an
    # exported model fastest (torch.compile, Inductor, weights frozen); every other deployment is
    # in res["speedup"] too, and results.json measures the same with latency.compile=true
    res["speedup_deployment"] = "compiled"
    best = res["speedup"]["compiled"]["batch16"]
    res["speedup_fraction_of_ideal"] = best["ours"]["fraction_of_ideal"]
    res["torch_pruning_speedup_fraction_of_ideal"] = best["tp"]["fraction_of_ideal"]
    res["peak_memory"] = [peak_memory("resnet20", batch, device, repeats=1 if quick else 3)]
    if not quick:
        res["peak_memory"].append(peak_memory("resnet50", 16 if device == "cpu" else 64, device))
    res["peak_memory_ratio"] = res["peak_memory"][0]["ratio"]
    res["stp_search"] = stp_search_cost(10 if quick else 40, device, sync)
    res["unipts_search"] = unipts_search_cost(4 if quick else 14, device, sync, rounds=3 if quick else 5)
    res["wall_s"] = time.time() - t_start
    args.out.write_text(json.dumps(res, indent=2))
    print_table(res, args.out)
    print_nm(res["semi_structured_2_4"])
    return 0


def print_nm(nm: dict) -> None:
    if not nm["supported"]:
        print(f"2:4 semi-structured kernels: not timed — {nm['reason']}")
        return
    for c in nm["cases"]:
        print(f"2:4 {c['name']} ({c['dtype']}): dense {c['dense_ms']:.3f} ms, 2:4 {c['sparse_ms']:.3f} ms, "
              f"{c['speedup']:.2f}x (max |diff| {c['max_abs_diff']:.3g} of {c['ref_max_abs']:.3g})")


def print_table(res: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    env = res["env"]
    t = Table(title=f"prune_lab benchmarks ({'quick' if env['quick'] else 'full'}, {env['device']}, "
                    f"{env['threads']} CPU threads)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    goal = "≤ 1.05x" if env["device"] == "cpu" else "≤ 1.03x"
    for o in res["train_overhead"]:
        t.add_row(f"training step, masked / dense ({o['model']}, batch {o['batch']}, {env['device']})",
                  f"{o['ratio']:.3f}x", goal)
        t.add_row("  of which mask enforcement (timed alone)", f"{100 * o['mask_ops_fraction_of_step']:.2f} %", "")
    c = res["channels_last_training"]
    t.add_row(f"masked training step, default layout / channels-last ({c['model']}, batch {c['batch']})",
              f"{c['speedup']:.2f}x faster", "")
    u = res["update_cost"]
    for k, what in (("gmp", "GMP update every 20 steps"), ("rigl", "RigL drop-and-grow every 100 steps"),
                    ("iee", "IEE per 450-step cycle (incl. exploration steps)")):
        t.add_row(f"structural updates, {what}", f"{100 * u[k]['fraction']:.2f} %", "≤ 2 %")
    for o in res["peak_memory"]:
        t.add_row(f"peak memory of training above model + batch, masked / dense ({o['model']}, batch {o['batch']})",
                  f"{o['ratio']:.3f}x", "")
    t.add_row("STP search: one KD fitness evaluation (ResNet-56, 256 images)",
              f"{1e3 * res['stp_search']['seconds_per_fitness_eval']:.0f} ms", "")
    u = res["unipts_search"]
    t.add_row("UniPTS search: one fitness evaluation (ResNet-14 1x16x16, BN re-estimation + top-1 on 2,048 images)",
              f"{1e3 * u['seconds_per_fitness_eval']:.0f} ms (before {1e3 * u['seconds_per_fitness_eval_before']:.0f} ms: "
              f"{u['speedup']:.2f}x; {u['stack']} stacked: {u['speedup_stacked']:.2f}x); {u['gmacs_per_s']:.1f} GMAC/s "
              f"against a 1024² GEMM's {u['gemm_gmacs_per_s']:.1f}: at most {u['max_exact_speedup_at_gemm_rate']:.1f}x "
              "more without fewer MACs", "≥ 3x")
    sp = res["speedup"]
    t2 = Table(title=f"ResNet-50, {100 * sp['target']:.0f} % FLOPs removed: measured speed-up / ideal (FLOPs ratio) "
                     f"= fraction; goal ≥ 0.90 for prune_lab, compiled, on CPU at batch 16")
    for col in ("deployment", "batch", "dense", f"prune_lab (round_to={sp['round_to']})", "torch-pruning uniform"):
        t2.add_column(col, justify="left" if col == "deployment" else "right")
    for key, by_batch in sp.items():
        if not isinstance(by_batch, dict) or key == "layers":
            continue
        for b, r in by_batch.items():
            cells = [f"{r[w]['latency_ms']:.1f} ms: {r[w]['measured_speedup']:.2f}/{r[w]['ideal_speedup']:.2f} = "
                     f"[bold]{r[w]['fraction_of_ideal']:.2f}[/bold]" for w in ("ours", "tp")]
            t2.add_row(key, b.removeprefix("batch"), f"{r['dense_latency_ms']:.1f} ms", *cells)
    console = Console()
    console.print(t)
    console.print(t2)
    layers = sp.get("layers")
    if layers:  # the layers that take a larger share of the pruned model's time than of its MACs
        ours, dense = layers["ours"], layers["dense"]
        total_ms, total_macs = sum(v["ms"] for v in ours.values()), sum(v["macs"] for v in ours.values())
        t3 = Table(title="served prune_lab model at batch 16, per layer: where the gap to the ideal speed-up is")
        for col in ("layer", "share of time", "share of MACs", "GMAC/s pruned", "GMAC/s dense"):
            t3.add_column(col, justify="left" if col == "layer" else "right")
        excess = sorted(ours, key=lambda n: ours[n]["ms"] / total_ms - ours[n]["macs"] / total_macs, reverse=True)
        for n in excess[:6]:
            rate = (lambda v: f"{v['gmacs_per_s']:.0f}" if v and v["gmacs_per_s"] else "–")
            t3.add_row(n, f"{100 * ours[n]['ms'] / total_ms:.1f} %", f"{100 * ours[n]['macs'] / total_macs:.1f} %",
                       rate(ours[n]), rate(dense.get(n)))
        console.print(t3)
    if "latency_target" in res:
        print_latency_table(res["latency_target"])
    print(f"wrote {out} in {res['wall_s']:.0f} s")


def print_latency_table(lt: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ResNet-50 {lt['input']}², {100 * lt['target']:.0f} % of served latency removed: speed-up "
                    f"(fraction of {lt['target_speedup']:.2f}×); torch-pruning at prune_lab's measured latency")
    for col in ("batch", "dense", "prune_lab", "torch-pruning", "goal", "table/measured", "noise", "table"):
        t.add_column(col, justify="right")
    for key, r in lt.items():
        if not key.startswith("batch"):
            continue
        cells = [f"{r[w]['measured_speedup']:.2f}× ([bold]{r[w]['fraction_of_target']:.2f}[/bold])" for w in ("ours", "tp")]
        chosen = next((h for h in r["meet_latency"] if h.get("chosen")),  # files before the flag: closest
                      min(r["meet_latency"], key=lambda h: abs(h["measured"] - lt["target"])))
        n = r["noise"]
        t.add_row(key.removeprefix("batch"), f"{r['dense']['latency_ms']:.1f} ms", *cells,
                  f"≥ {r['goal_fraction']:.2f}" if r["goal_fraction"] else "",
                  f"{chosen['predicted']:.2f}/{chosen['measured']:.2f} ({len(r['meet_latency'])} r.)",
                  f"±{n['std']:.3f}", f"{r['table']['build_s']:.0f} s")
    Console().print(t)
    print("  table/measured: the table's predicted reduction of the chosen plan / its measured reduction after "
          "meet_latency's rounds (r.); noise: std of one pair's measured reduction (bench.json: latency_target)")

if __name__ == "__main__":
    sys.exit(main())
