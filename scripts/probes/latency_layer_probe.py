"""Where does a latency table's prediction part from the whole network's time? Layer by layer.

    python scripts/probes/latency_layer_probe.py <run dir> [<run dir> ...] [--batch 128] [--repeats 20]

For each run (a `method.target=latency` run, or any structured run of a model the table covers)
prints, per conv/linear layer of the deployed model, its kept (in, out) channels and three times:
the cached per-layer table's (what the plan was solved on), the same standalone layer timed now
(`time_layer`), and the layer timed inside the whole served network now (forward hooks, median
over `--repeats` forwards; synchronous CPU execution); the same for the dense model; then the
sums, the whole forwards and what the layers do not explain. If thin layers of a pruned network
run slower inside it than standalone, the in-network/standalone ratio of those layers is above 1
and the table under-predicts them. One thread, the run's latency settings (channels-last, BN
folded); holds the quiet lock when PRUNE_LAB_QUIET_LOCK is set. Weights: the run's own for the
pruned model, random for the dense one (weights do not change the time: latency_input_probe.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from prune_lab import quiet
    from prune_lab.export import load_model
    from prune_lab.models import build_from_spec, classifier_of
    from prune_lab.sparsity import ChannelGroups
    from prune_lab.sparsity.latency import LatencyTable, time_layer
    from prune_lab.sparsity.measure import inference_copy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cache", default=str(ROOT / "outputs" / "latency_tables"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet.configure_from_env()

    def in_network(model, x):
        """Median in-network ms of every conv/linear (hooks) and of the whole forward."""
        served = inference_copy(model, True, True)[0]
        times, starts, hooks = {}, {}, []
        for name, mod in served.named_modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                hooks.append(mod.register_forward_pre_hook(lambda m, i, n=name: starts.__setitem__(n, time.perf_counter())))
                hooks.append(mod.register_forward_hook(
                    lambda m, i, o, n=name: times.setdefault(n, []).append(1e3 * (time.perf_counter() - starts[n]))))
        whole = []
        with torch.no_grad(), quiet.measuring():
            for _ in range(3):
                served(x)
            times.clear()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                served(x)
                whole.append(1e3 * (time.perf_counter() - t0))
        for h in hooks:
            h.remove()
        return {n: statistics.median(t) for n, t in times.items()}, statistics.median(whole)

    for run in args.runs:
        meta = json.loads((run / "model.json").read_text())
        pruned = load_model(run).eval()
        dense = build_from_spec(meta["arch"]).eval()
        example = torch.zeros(1, *meta["input_shape"])
        groups = ChannelGroups(dense, example, ignored=[classifier_of(dense)[1]])
        table = LatencyTable(groups, example, batch_size=args.batch, cache_dir=args.cache)
        x = example.expand(args.batch, *example.shape[1:]).contiguous(memory_format=torch.channels_last)
        print(f"\n{run}  (table {table.env['cpu']} {table.env['isa']}, batch {args.batch})")
        print(f"{'layer':28s} {'kept in/out':>13s} {'table':>7s} {'alone':>7s} {'in-net':>7s} {'net/alone':>9s}"
              f"   dense: {'table':>7s} {'in-net':>7s} {'net/alone':>9s}")
        sums = {k: 0.0 for k in ("pt", "pa", "pn", "dt", "da", "dn")}
        net_p, whole_p = in_network(pruned, x)
        net_d, whole_d = in_network(dense, x)
        mods_p, mods_d = dict(pruned.named_modules()), dict(dense.named_modules())
        for name in table.sigs:
            sig = table.sigs[name]
            if name not in mods_p or name not in net_p:
                continue  # a removed block
            m = mods_p[name]
            cin, cout = (m.in_channels, m.out_channels) if sig["kind"] == "conv" else (m.in_features, m.out_features)
            md = mods_d[name]
            dcin, dcout = (md.in_channels, md.out_channels) if sig["kind"] == "conv" else (md.in_features, md.out_features)
            with quiet.measuring():
                alone_p = time_layer(sig, cin, cout, args.batch, True, sig["bias"], "cpu")
                alone_d = time_layer(sig, dcin, dcout, args.batch, True, sig["bias"], "cpu")
            row = dict(pt=table.layer_ms(name, cin, cout), pa=alone_p, pn=net_p[name],
                       dt=table.layer_ms(name, dcin, dcout), da=alone_d, dn=net_d[name])
            for k, v in row.items():
                sums[k] += v
            print(f"{name:28s} {f'{cin}/{cout}':>13s} {row['pt']:7.3f} {row['pa']:7.3f} {row['pn']:7.3f} "
                  f"{row['pn'] / row['pa']:9.2f}   dense: {row['dt']:7.3f} {row['dn']:7.3f} {row['dn'] / row['da']:9.2f}")
        print(f"{'sum of layers':28s} {'':13s} {sums['pt']:7.2f} {sums['pa']:7.2f} {sums['pn']:7.2f} "
              f"{sums['pn'] / sums['pa']:9.2f}   dense: {sums['dt']:7.2f} {sums['dn']:7.2f} {sums['dn'] / sums['da']:9.2f}")
        print(f"whole forward (median, hooks on): pruned {whole_p:.2f} ms, dense {whole_d:.2f} ms, reduction "
              f"{1 - whole_p / whole_d:.3f}; not in layers: pruned {whole_p - sums['pn']:.2f}, dense {whole_d - sums['dn']:.2f}"
              f"; layer-sum reduction: table {1 - sums['pt'] / sums['dt']:.3f}, alone now {1 - sums['pa'] / sums['da']:.3f}, "
              f"in-network {1 - sums['pn'] / sums['dn']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
