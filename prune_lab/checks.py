"""Checks a run makes before anything is written: every bad input is refused here with one line."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import ChannelGroups, FlopsModel


# structured methods whose plan can be solved against the latency table (`target: latency`)
LATENCY_METHODS = ("l1_filter", "halp", "slimming", "depgraph", "iee_channels", "stp")


def import_user_modules(cfg: DictConfig) -> None:
    """`imports=[my_models]`: modules imported before anything is built, so that their
    `register_model` / `_target_` objects exist (a model, a dataset, a callback of the user's)."""
    import importlib
    import os
    import sys

    if cfg.get("imports") and os.getcwd() not in sys.path:  # `python path/to/train.py` puts only its own folder there
        sys.path.insert(0, os.getcwd())
    for name in cfg.get("imports") or []:
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise PruneLabError(f"imports: cannot import {name!r} ({e}); give a module importable from the "
                                "current directory or PYTHONPATH, e.g. imports=[my_models]") from None


def validate(cfg: DictConfig) -> None:
    import_user_modules(cfg)
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PruneLabError(f"seed={seed} is not a non-negative integer (e.g. seed=0)")
    for key in ("epochs", "dense.epochs"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise PruneLabError(f"{key}={value} is not a non-negative integer number of epochs (e.g. {key}=5)")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PruneLabError(f"trainer.accelerator={accelerator}, but no GPU is available here "
                            "(torch.cuda.is_available() is False); use trainer=cpu")
    b = cfg.budget
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= float(b) < 1.0:
        raise PruneLabError(f"budget={b} is outside [0, 1): it is the fraction of the method's target removed")
    if cfg.method.target not in ("params", "flops", "latency"):
        raise PruneLabError(f"method.target={cfg.method.target} is not one of: params, flops, latency")
    if cfg.method.target == "latency" and cfg.method.name not in LATENCY_METHODS:
        raise PruneLabError(f"method.target=latency is not available for method {cfg.method.name}; "
                            f"choose one of: {', '.join(LATENCY_METHODS)}")
    if cfg.ckpt_path is not None:
        check_checkpoint(Path(cfg.ckpt_path))


def check_checkpoint(path: Path) -> None:
    if not path.is_file():
        raise PruneLabError(f"ckpt_path={path} does not exist; pass a run's checkpoints/last.ckpt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PruneLabError(f"ckpt_path={path} is not a readable checkpoint ({type(e).__name__}); "
                            "pass a run's checkpoints/last.ckpt") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise PruneLabError(f"ckpt_path={path} is not a prune_lab checkpoint (no state_dict)")


def check_forward(cfg, dm, model, example) -> None:
    """The model runs once on the data's input size, so a mismatch is refused before the dense
    reference trains (instead of dying at pruning or export time)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as e:  # any failure here is a model/input mismatch the user must resolve
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        shape = "x".join(str(d) for d in example.shape[1:])
        raise PruneLabError(f"model {cfg.model.name} cannot run on {dm.name} inputs of shape {shape} ({detail}); "
                            f"choose a model made for {example.shape[-1]} px images or a larger data.image_size") from None
    finally:
        model.train(was_training)


def check_schedules(cfg, dm, callbacks) -> None:
    """Give every callback with a `check_schedule(total_steps, steps_per_epoch)` hook the run's
    length before training, so a schedule that does not fit it is refused now."""
    hooks = [cb.check_schedule for cb in callbacks if hasattr(cb, "check_schedule")]
    if not hooks or not cfg.method.get("train", True):
        return
    steps_per_epoch, total = run_length(cfg, dm)
    for hook in hooks:
        hook(total_steps=total, steps_per_epoch=steps_per_epoch)


def check_structured(cfg, model, example) -> None:
    if cfg.method.target not in ("flops", "latency"):
        return
    from prune_lab.models import classifier_of

    groups = ChannelGroups(model, example, ignored=[classifier_of(model)[1]])
    if len(groups) == 0:
        raise PruneLabError(f"method {cfg.method.name} prunes channels, but model {cfg.model.name} has no "
                            "prunable channel groups; use an unstructured method (magnitude, gmp, random)")
    if cfg.method.target == "flops" and cfg.method.name != "stp":  # STP also removes blocks: it can go further
        most = max_flops_reduction(groups, example)
        if most < float(cfg.budget) - 0.02:  # the FLOPs solver's tolerance
            raise PruneLabError(f"budget={cfg.budget} is out of reach for {cfg.method.name} on model {cfg.model.name}: "
                                f"with one channel left in every prunable group it removes {most:.3f} of the FLOPs "
                                "(channels a LayerNorm/GroupNorm normalises or that cross a channel shuffle or "
                                "attention heads stay whole; a larger data.image_size can change their share)")


def max_flops_reduction(groups: ChannelGroups, example) -> float:
    """The FLOPs reduction of the smallest plan: one channel (one per slice of a grouped conv) kept per group."""
    flops = FlopsModel(groups, example)
    plan = {}
    for root, size, slices in zip(groups.roots, groups.sizes, groups.slices):
        keep = torch.zeros(slices, size // slices, dtype=torch.bool)
        keep[:, 0] = True
        plan[root] = keep.flatten()
    return 1.0 - flops.macs(plan) / flops.macs()


def run_length(cfg: DictConfig, dm) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) the method's fit will take, from the trainer
    and data configs (what Lightning's `estimated_stepping_batches` will say), for checks before
    anything runs; `data.batch_size` is the global batch, so the counts hold on N devices too."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    world = (int(devices) if str(devices).isdigit() else 1) * int(trainer.get("num_nodes", 1) or 1)
    if dm.train_set is None:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            dm.prepare_data()
        dm.setup("fit")
    per_rank = -(-len(dm.train_set) // world)  # DistributedSampler pads to equal shards
    per_device = dm.per_device_batch_size(world)
    drop_last = per_rank > per_device and per_rank % per_device == 1  # as the train loader decides
    batches = per_rank // per_device if drop_last else -(-per_rank // per_device)
    limit = trainer.get("limit_train_batches")
    if limit is not None:
        batches = min(batches, int(limit)) if isinstance(limit, int) and not isinstance(limit, bool) \
            else int(batches * float(limit))
    accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
    steps = batches * int(trainer.max_epochs) // accumulate
    max_steps = int(trainer.get("max_steps", -1) or -1)
    return max(batches // accumulate, 1), max(min(steps, max_steps) if max_steps > 0 else steps, 1)


