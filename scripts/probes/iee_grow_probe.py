"""Does IEE's grow raise the sparse network's loss? At every grow of an IEE run (digits 8x8,
resnet8, ERK mask), the mean cross-entropy over the training set (BN in eval mode) with the
grown units at the values the policy gave them, and with the same units at zero.

    python scripts/probes/iee_grow_probe.py --budget 0.98 --epochs 10 --steps 8 --seeds 0 1

prints one JSON line per (grow_values, mru, seed): the loss pairs and their mean difference.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from prune_lab.callbacks import MaskUpdate, Regrowth  # noqa: E402
from prune_lab.data import DigitsDataModule  # noqa: E402
from prune_lab.methods.iee import IEE  # noqa: E402
from prune_lab.methods.iee_probe import GrowLoss  # noqa: E402
from prune_lab.models import create_model  # noqa: E402
from prune_lab.module import PruneLabModule  # noqa: E402
from prune_lab.sparsity import OneShot  # noqa: E402
from prune_lab.sparsity.importance import Random  # noqa: E402


def probe(budget, epochs, steps, grow_values, mru, seed):
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=8, batch_size=64, seed=seed)
    dm.setup("fit")
    batches = list(torch.utils.data.DataLoader(dm.train_set, batch_size=512))
    model = create_model("resnet8", num_classes=10, in_channels=1)
    opt = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    module = PruneLabModule(model, 10, dm.example_input(1), opt)
    init = MaskUpdate(budget, distribution="erk", importance=Random(seed=seed), schedule=OneShot(), dense_stem=True)
    policy = IEE(estimate_steps=steps, improve_steps=steps, explore_steps=steps, grow_values=grow_values, mru=mru)
    meter = GrowLoss(policy, batches)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, limit_val_batches=0, callbacks=[init, Regrowth(policy), meter])
    trainer.fit(module, datamodule=dm)
    diffs = [a - b for _, a, b in meter.rows]
    return {"grow_values": grow_values, "mru": mru, "seed": seed, "budget": budget,
            "mean_loss_increase_vs_zero": sum(diffs) / len(diffs), "grows (step, loss, loss at zero)": meter.rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.98)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="H = J = Q")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for grow_values, mru in (("last_active", "last_active"), ("explored", "last_active"), ("explored", "explored")):
        for seed in args.seeds:
            print(json.dumps(probe(args.budget, args.epochs, args.steps, grow_values, mru, seed)), flush=True)


if __name__ == "__main__":
    main()
