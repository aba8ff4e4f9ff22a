"""The run's record: results.json (schema 1, DESIGN.md §4) and layers.png."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path

import torch
from torch import nn

from prune_lab.sparsity import count_flops, count_nonzero, count_params, prunable_weights, sparse_flops

SCHEMA = 1


def write_json_atomic(path: Path, data: dict) -> None:
    """Write then rename: a reader never sees half a file, and a crash leaves the old one intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def model_costs(model: nn.Module, example_input: torch.Tensor) -> dict:
    return {"params": count_params(model), "flops": count_flops(model, example_input)}


def pruned_costs(dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor, dense_costs: dict) -> dict:
    """Sizes of the deployed model and reductions against the dense one.

    `flops` counts the deployed model with dense kernels; `sparse_flops` skips zero weights (what a
    sparse kernel would execute); reductions and the theoretical speed-up use `sparse_flops`, so
    unstructured and structured methods are compared on one axis.
    """
    nonzero = count_nonzero(pruned)
    dense_prunable = sum(p.numel() for p in prunable_weights(dense).values())
    nonzero_prunable = sum(int(p.count_nonzero()) for p in prunable_weights(pruned).values())
    flops = count_flops(pruned, example_input)
    sflops = sparse_flops(pruned, example_input)
    return {
        "params": count_params(pruned),
        "nonzero_params": nonzero,
        "flops": flops,
        "sparse_flops": sflops,
        "sparsity": 1.0 - nonzero_prunable / dense_prunable,
        "params_reduction": 1.0 - nonzero / dense_costs["params"],
        "flops_reduction": 1.0 - sflops / dense_costs["flops"],
        "compression_ratio": dense_costs["params"] / max(nonzero, 1),
        "theoretical_speedup": dense_costs["flops"] / max(sflops, 1),
    }


def layer_table(dense: nn.Module, pruned: nn.Module) -> list[dict]:
    """Per prunable layer: deployed shape, dense shape and density relative to the dense layer."""
    dense_w = prunable_weights(dense)
    rows = []
    for name, w in prunable_weights(pruned).items():
        d = dense_w.get(name, w)
        rows.append({"name": name.removesuffix(".weight"), "shape": list(w.shape), "dense_shape": list(d.shape),
                     "density": int(w.count_nonzero()) / d.numel()})
    return rows


def git_sha(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plot_layers(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(rows) + 2), 4))
    names = [r["name"] for r in rows]
    ax.bar(range(len(rows)), [r["density"] for r in rows], color="tab:blue", label="density (nonzero / dense size)")
    structured = any(r["shape"] != r["dense_shape"] for r in rows)
    if structured:
        kept = [r["shape"][0] / r["dense_shape"][0] for r in rows]
        ax.plot(range(len(rows)), kept, "o", color="tab:orange", label="kept output channels")
    ax.set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of the dense layer")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(results: dict):
    """Dense vs pruned side by side, as printed at the end of a run."""
    from rich.table import Table

    d, p, lat = results["dense"], results["pruned"], results["latency"]
    t = Table(title=f"{results['method']} {results['model']}/{results['data']} budget={results['budget']} "
                    f"({results['target']}) seed={results['seed']}")
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("pruned", justify="right")
    t.add_row("top-1", f"{d['top1']:.4f}", f"{p['top1']:.4f}")
    t.add_row("top-5", f"{d['top5']:.4f}", f"{p['top5']:.4f}")
    t.add_row("params", f"{d['params']:,}", f"{p['params']:,}")
    t.add_row("nonzero params", f"{d['params']:,}", f"{p['nonzero_params']:,} (-{p['params_reduction']:.1%})")
    t.add_row("MACs (dense kernels)", f"{d['flops']:,}", f"{p['flops']:,}")
    t.add_row("MACs (sparse kernels)", f"{d['flops']:,}", f"{p['sparse_flops']:,} (-{p['flops_reduction']:.1%})")
    shared = lat.get("contention", {})
    note = f" (contended: {shared.get('runnable_others')} other runnable, {shared.get('cores')} cores)" \
        if lat.get("contended") else ""
    t.add_row(f"CPU latency, batch {lat['batch_size']}{note}", f"{lat['dense_ms']:.2f} ms",
              f"{lat['pruned_ms']:.2f} ms ({lat['speedup']:.2f}x)")
    if results.get("target") == "latency":
        # the channel-pruning methods record their plan under latency_plan, STP's search under stp
        predicted = results.get("latency_plan", {}).get("predicted_reduction",
                                                        results.get("stp", {}).get("estimated_latency_reduction"))
        exp = lat.get("exported", {})
        predicted = float("nan") if predicted is None else predicted
        t.add_row("latency reduction", f"budget {results['budget']:g}",
                  f"{1 - lat['pruned_min_ms'] / lat['dense_min_ms']:.1%} (table {predicted:.1%}"
                  f", model.pt2 {exp.get('reduction', float('nan')):.1%})")
    return t


def exported_latency(pt2: Path, dense: nn.Module, example_input: torch.Tensor, latency) -> dict:
    """The saved `model.pt2`, as `torch.export.load(...).module()` runs it on a plain (NCHW)
    tensor, timed against the dense model exported the same way (`export.served_program`, saved
    beside it as `dense.pt2` so that anyone can time the pair), interleaved, at the run's latency
    batch size, fastest rounds: the deliverable as an independent check times it."""
    from prune_lab.export import served_program
    from prune_lab.sparsity.measure import interleaved_latency_ms

    fold, cl = bool(latency.get("fold_bn", False)), bool(latency.get("channels_last", False))
    dense_path = Path(pt2).with_name("dense.pt2")
    torch.export.save(served_program(dense, example_input, fold, cl), str(dense_path))
    programs = {"dense": torch.export.load(str(dense_path)).module(), "pruned": torch.export.load(str(pt2)).module()}
    xb = example_input[:1].expand(int(latency.batch_size), *example_input.shape[1:]).contiguous().cpu()
    times = interleaved_latency_ms(programs, xb, int(latency.warmup), int(latency.repeats))
    d, p = min(times["dense"]), min(times["pruned"])
    return {"input": "nchw", "weights": "channels_last" if cl and xb.dim() == 4 else "contiguous",
            "bn_folded": fold, "stat": "min", "dense_ms": d, "pruned_ms": p, "reduction": 1.0 - p / d}


# The quick start's tables in README.md and docs/get-started/quickstart.md are this rendering of the
# committed docs/quickstart/<name>.json (scripts/quickstart_docs.py writes them, tests/test_docs.py
# checks them), so the printed numbers and the machine that produced them live in one file.
QUICKSTART_START = "<!-- QUICKSTART:{name}:START (scripts/quickstart_docs.py; do not edit) -->"
QUICKSTART_END = "<!-- QUICKSTART:END -->"


def summary_text(results: dict, indent: int = 4) -> str:
    """`summary_table` as plain text without its title, as a markdown code block (indented)."""
    from rich.console import Console

    table = summary_table(results)
    table.title = None
    console = Console(width=80, record=True, color_system=None, force_terminal=False, file=io.StringIO())
    console.print(table)
    lines = console.export_text(styles=False).rstrip("\n").splitlines()
    return "\n".join(" " * indent + line.rstrip() for line in lines)


def quickstart_blocks(text: str, root: Path) -> str:
    """`text` with every QUICKSTART:<name> block replaced by the table of docs/quickstart/<name>.json."""
    def block(m: re.Match) -> str:
        results = json.loads((root / "docs" / "quickstart" / f"{m.group(1)}.json").read_text())
        return f"{QUICKSTART_START.format(name=m.group(1))}\n{summary_text(results)}\n{QUICKSTART_END}"

    start = re.escape(QUICKSTART_START).replace(r"\{name\}", r"([\w.]+)")
    return re.sub(start + r".*?" + re.escape(QUICKSTART_END), block, text, flags=re.S)
