"""run(cfg): validate → dense reference → fit → test → export → report. Nothing else lives here."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from prune_lab import export, report
from prune_lab.checks import (check_checkpoint, check_forward, check_schedules, check_structured,  # noqa: F401
                              run_length, validate)
from prune_lab import quiet
from prune_lab.callbacks import QuietSteps, ResumableCheckpoint, RNGState
from prune_lab.callbacks.checkpoint import save_checkpoint_atomic
from prune_lab.errors import PruneLabError
from prune_lab.loggers import prepare_wandb, publish
from prune_lab.models.weights import load_plain
from prune_lab.module import PruneLabModule
from prune_lab.sparsity import latency_ms
from prune_lab.cpu import cpu_isa, cpu_kind, cpu_name

log = logging.getLogger("prune_lab")


def quiet_lightning() -> None:
    """Route Lightning's console messages through Hydra's logging (stdout + train.log), once.

    Lightning adds its own stderr handler at import; with it every message prints twice and
    stderr, which users read for errors, fills with INFO lines.
    """
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # an advertisement, not information about the run
    logging.getLogger("lightning.pytorch.utilities.rank_zero").filters = [lambda r: "litlogger" not in r.getMessage()]
    warnings.filterwarnings("ignore", message=".*treespec.*LeafSpec.*")


def build(node, **kwargs):
    """hydra.utils.instantiate, but a PruneLabError raised inside reaches the user unwrapped."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, PruneLabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise PruneLabError(str(e).splitlines()[0]) from e


def merge_reports(results: dict, reports: list[dict]) -> None:
    """Callbacks' records into results.json: new keys are added; a dict under an existing key
    (e.g. `train`) is merged into it, later reports overriding earlier ones key by key."""
    for rep in reports:
        for key, value in rep.items():
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                results[key].update(value)
            else:
                results[key] = value


# -- the dense reference ----------------------------------------------------------------
def dense_key(cfg: DictConfig) -> str:
    """Identifies a dense model: architecture, data, recipe and seed (not paths or workers)."""
    # calibration_size only restricts what a post-training method sees; the dense model uses all data;
    # on_device moves the same batches elsewhere
    skip = {"root", "num_workers", "eval_batch_size", "download", "calibration_size", "on_device"}
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in skip}
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "weights"}
    module = OmegaConf.to_container(cfg.module, resolve=True)
    module["optimizer"]["lr"] = cfg.dense.lr
    if not module.get("channels_last"):  # the default layout: cache keys stay those of earlier versions
        module.pop("channels_last", None)
    # compiled and eager training compute the same function up to float rounding (as thread counts do):
    # they share one dense reference
    module.pop("compile", None)
    blob = json.dumps({"v": 1, "model": model, "data": data, "dense": OmegaConf.to_container(cfg.dense, resolve=True),
                       "module": module, "seed": cfg.seed, "precision": str(cfg.trainer.get("precision"))},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def dense_reference(cfg: DictConfig, dm, model: torch.nn.Module, example: torch.Tensor) -> dict:
    """The dense model every run is compared with: {state_dict, top1, top5, params, flops}.

    With `model.weights` a file or hub name, it is that model, evaluated here. Otherwise it is
    trained once with the `dense` recipe and cached under `paths.dense_dir/<model>_<data>_<key>`.
    """
    weights = cfg.model.get("weights")
    if weights not in (None, "auto"):
        # its test accuracy is measured after the method's final test (run()), so nothing the method
        # does (search, calibration, training) can happen after a test image has been read
        return {"state_dict": copy.deepcopy(model.state_dict()), "source": str(weights),
                **report.model_costs(copy.deepcopy(model).cpu(), example.cpu())}
    cache = Path(cfg.paths.dense_dir) / f"{cfg.model.name}_{dm.name}_{dense_key(cfg)}"
    if (cache / "dense.json").is_file():
        log.info("dense reference: cached %s", cache)
        meta = json.loads((cache / "dense.json").read_text())
        return {"state_dict": load_file(str(cache / "model.safetensors")), **meta}
    log.info("dense reference: training %s on %s for %d epochs (cached for later runs)",
             cfg.model.name, dm.name, cfg.dense.epochs)
    if getattr(dm, "calibration_size", None) is not None:  # the dense model trains on the whole train set
        dm = build(cfg.data, calibration_size=None)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dense_model = copy.deepcopy(model)
    optimizer = build(cfg.module.optimizer, lr=cfg.dense.lr)
    module = PruneLabModule(dense_model, dm.num_classes, example, optimizer, build(cfg.module.scheduler),
                            cfg.module.get("label_smoothing", 0.0), cfg.module.get("channels_last", False),
                            cfg.module.get("compile", False))
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    # its own resumable checkpoint, keyed like the cache: a killed dense training resumes (sweep
    # jobs training the same model share it; they follow the same trajectory)
    partial = cache.with_name(f".{cache.name}.partial")
    resume = partial / "last.ckpt"
    if resume.is_file():
        try:
            check_checkpoint(resume)
            log.info("dense reference: resuming its unfinished training from %s", resume)
        except PruneLabError:
            log.warning("dense reference: %s is unreadable; training it from the start", resume)
            resume.unlink(missing_ok=True)
    checkpoint = ResumableCheckpoint(dirpath=str(partial), every_n_steps=cfg.checkpoint.get("every_n_steps"),
                                     every_minutes=cfg.checkpoint.get("every_minutes"))
    trainer = build(cfg.trainer, max_epochs=cfg.dense.epochs, logger=False,
                    callbacks=[checkpoint, RNGState(), QuietSteps(),
                               build({"_target_": "lightning.pytorch.callbacks.RichProgressBar", "leave": False})],
                    default_root_dir=str(tmp))
    t0 = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume.is_file() else None, weights_only=True)
    metrics = _test(trainer, module, dm)
    metrics.update(report.model_costs(dense_model.cpu(), example.cpu()))
    metrics.update({"train_wall_s": time.time() - t0, "key": cache.name})
    if not trainer.is_global_zero:  # under DDP every rank trained it; one writes it
        return {"state_dict": dense_model.state_dict(), **metrics}
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in dense_model.state_dict().items()},
              str(tmp / "model.safetensors"))
    (tmp / "dense.json").write_text(json.dumps(metrics, indent=2))
    try:
        os.replace(tmp, cache)  # atomic: concurrent sweep jobs never see a half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another job finished first; its copy is equivalent
    shutil.rmtree(partial, ignore_errors=True)
    return {"state_dict": dense_model.state_dict(), **metrics}


def mask_digests(masks) -> list[str]:
    """A hash of every rank's masks, gathered: DDP runs record proof that all ranks agree."""
    h = hashlib.sha256()
    for name, buf in sorted(masks.state_dict().items()):
        h.update(name.encode())
        h.update(buf.detach().cpu().numpy().tobytes())
    digest = h.hexdigest()[:16]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [digest]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, digest)
    return gathered


def training_cost(results: dict, cfg: DictConfig, dense: dict, dm) -> tuple[float | None, float | None]:
    """All the training a pruned model took: (in epochs of dense training on the whole training split,
    in wall seconds on this machine).

    Epochs: its own optimizer steps at their measured cost (`train.flops_ratio`, per step relative to
    a dense step of the same batch size), plus the dense reference's training when the method starts
    from it (HALP, L1-filter, STP: the pre-training a from-scratch method saves). Seconds: the run's
    `train.wall_s` (its prepare steps and training; not the dense reference's training when this run
    happened to train it, nor a latency table both kinds of method measure) plus the dense reference's
    recorded `train_wall_s` for those methods. None when the dense model was given by file (its cost is
    unknown). What `flops_ratio` leaves out is left out of the epochs too: a distillation teacher's
    forward passes, searches and calibration (the seconds include them)."""
    dense_steps_per_epoch = max(math.ceil(dm.full_train_size / dm.batch_size), 1)
    own = (results["train"].get("flops_ratio") or 0.0) * results["train"]["steps"] / dense_steps_per_epoch
    wall = results["train"]["wall_s"]
    if not cfg.method.get("needs_dense", False):
        return own, wall
    if "source" in dense:
        return None, None
    dense_wall = results["dense"]["train_wall_s"]
    return own + float(cfg.dense.epochs), (None if math.isnan(dense_wall) else wall + dense_wall)


def _test(trainer, module, dm) -> dict:
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {"top1": float(out["test/top1"]), "top5": float(out["test/top5"])}


def _validate(trainer, module, dm) -> float:
    """Top-1 of the final model on the validation split (carved from the training data): what a
    choice between recipes may read (a study's selection metric), never the test split."""
    out = trainer.validate(module, datamodule=dm, verbose=False)[0]
    return float(out["val/top1"])


def _evaluate(cfg, dm, model, example) -> dict:
    """Test accuracy of a model that is not trained here (a dense reference given by file)."""
    module = PruneLabModule(model, dm.num_classes, example, build(cfg.module.optimizer))
    trainer = build(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[],
                    enable_progress_bar=False)
    return _test(trainer, module, dm)


# -- the run ----------------------------------------------------------------------------
def run_job(cfg: DictConfig) -> dict | None:
    """What train.py calls. A directory with results.json is finished and is left alone; one with
    a checkpoint but no results (a crash, a killed sweep) resumes from it; in a sweep, a job that
    fails unexpectedly records failed.json and the sweep goes on (bad input still stops it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out = Path(cfg.paths.output_dir)
    if (out / "results.json").is_file():
        log.info("skipping %s: finished already (results.json exists)", out)
        return json.loads((out / "results.json").read_text())
    last = out / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path is None and last.is_file():
        try:
            check_checkpoint(last)
            log.info("resuming the unfinished job in %s from %s", out, last)
            OmegaConf.update(cfg, "ckpt_path", str(last), force_add=True)
        except PruneLabError:
            broken = last.with_name(f"last.ckpt.broken-{int(time.time())}")
            log.warning("%s is unreadable; kept as %s, starting the job over", last, broken.name)
            os.replace(last, broken)
    elif cfg.ckpt_path is None and (out / "train.log").is_file() and (out / "train.log").stat().st_size > 0:
        log.info("restarting the unfinished job in %s from its start (it stopped before its first checkpoint); "
                 "a search in it is repeated with the same seed and result", out)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:
        return run(cfg)
    try:
        return run(cfg)
    except PruneLabError:
        raise
    except Exception as e:  # one broken job must not take the rest of the sweep down
        import traceback

        log.error("job failed: %s: %s (details in %s)", type(e).__name__, e, out / "failed.json")
        report.write_json_atomic(out / "failed.json", {"error": f"{type(e).__name__}: {e}",
                                                       "traceback": traceback.format_exc()})
        return None


def run(cfg: DictConfig) -> dict:
    t_start = time.time()
    quiet_lightning()
    validate(cfg)
    quiet.configure_from_env()  # a study's parallel jobs pause their batches while one measures latency
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build(cfg.data)
    dm.check()
    weights = cfg.model.get("weights")
    model = build(cfg.model, num_classes=dm.num_classes, in_channels=dm.channels,
                  weights=None if weights == "auto" else weights)
    example = dm.example_input(1)
    check_forward(cfg, dm, model, example)
    check_structured(cfg, model, example)
    callbacks = [build(c) for c in cfg.method.get("callbacks", {}).values()]
    check_schedules(cfg, dm, callbacks)  # cheap: before a latency check measures its table
    for cb in callbacks:  # method-specific requirements on the model, before anything is written
        if hasattr(cb, "check"):
            cb.check(model, example)
    # steps a method takes once before training, or instead of it (train: false): one-shot pruning,
    # BN re-estimation, layer-wise reconstruction; each is called as step(module, datamodule, trainer)
    prepare = [build(s) for s in (cfg.method.get("prepare") or {}).values()]
    run_callbacks = [build(c) for c in cfg.get("callbacks", {}).values()]
    loggers = [build(prepare_wandb(c, cfg) if "WandbLogger" in c._target_ else c)
               for c in (cfg.get("logger") or {}).values()]
    # ---- inputs are valid: from here on the run writes ----
    out_dir = Path(cfg.paths.output_dir)
    dense = dense_reference(cfg, dm, model, example)
    if cfg.method.needs_dense or weights == "auto":
        load_plain(model, dense["state_dict"])
    dense_model = copy.deepcopy(model).cpu().eval()
    load_plain(dense_model, dense["state_dict"])

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = PruneLabModule(model, dm.num_classes, example, build(cfg.module.optimizer), build(cfg.module.scheduler),
                            cfg.module.get("label_smoothing", 0.0), cfg.module.get("channels_last", False),
                            cfg.module.get("compile", False))
    module.teacher = copy.deepcopy(dense_model)  # the frozen dense reference, for distillation callbacks
    trainer = build(cfg.trainer, callbacks=callbacks + run_callbacks + [QuietSteps()], logger=loggers or False)
    t_fit = time.time()
    prepared = out_dir / "prepare.json"  # the prepare steps' records: a resumed run reports them too
    if cfg.ckpt_path is None:  # a resumed run has done them: their effect is in the checkpoint
        for step in prepare:
            step(module, dm, trainer)
        if prepare and trainer.is_global_zero:
            records: dict = {}
            merge_reports(records, [s.report() for s in prepare if callable(getattr(s, "report", None))])
            report.write_json_atomic(prepared, records)
    else:
        log.info("resuming from %s; work that is not checkpointed mid-way (a search, BN re-estimation, "
                 "export) is repeated from its start, with the same seed and result", cfg.ckpt_path)
    trains = cfg.method.get("train", True)
    if trains:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)
    elif cfg.ckpt_path is not None:  # no fit to restore it: the prepared weights and masks come from the file
        state = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        module.masks.bind(module.model)
    wall = time.time() - t_fit
    val_top1 = _validate(trainer, module, dm) if dm.val_set is not None else float("nan")
    pruned_metrics = {**_test(trainer, module, dm), "val_top1": val_top1}
    if "top1" not in dense:  # a dense model given by file: tested now, after everything the method chose
        dense.update(_evaluate(cfg, dm, copy.deepcopy(dense_model), example))
    if not trains and cfg.ckpt_path is None:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_checkpoint_atomic(trainer, out_dir / "checkpoints" / "last.ckpt")
    digests = mask_digests(module.masks)
    if not trainer.is_global_zero:
        return {}

    final = export.deployable(module.model, module.masks, example)
    with torch.no_grad():
        masked = copy.deepcopy(module.model).cpu().eval()
        x = torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        export_diff = float((masked(x) - final(x)).abs().max())
    plan = {k: v.cpu() for k, v in module.masks.channel_plan.items()}
    export.save_model(out_dir, final, model.prune_lab_spec, plan, example.cpu(), module.masks.removed,
                      fold_bn=bool(cfg.latency.get("fold_bn", False)),
                      channels_last=bool(cfg.latency.get("channels_last", False)))

    dense_costs = {"params": dense["params"], "flops": dense["flops"]}
    pruned = {**pruned_metrics, **report.pruned_costs(dense_model, final, example.cpu(), dense_costs)}
    lat_cfg = cfg.latency
    cl, fold = bool(lat_cfg.get("channels_last", False)), bool(lat_cfg.get("fold_bn", False))
    lat, applied = latency_ms({"dense": dense_model, "pruned": final}, example.cpu(), lat_cfg.batch_size,
                              lat_cfg.warmup, lat_cfg.repeats, cl, fold, bool(lat_cfg.get("compile", False)))
    dense_ms, pruned_ms = lat["dense"], lat["pruned"]
    fastest = applied.pop("min_ms")
    contended = applied["contention"]["contended"]
    target = cfg.method.target
    # a latency budget is judged on each model's fastest round (other work on the machine only adds
    # time), and on the median of latency.plan_measurements such paired calls, as the plan was
    reductions = [1.0 - fastest["pruned"] / fastest["dense"]]
    if target == "latency":
        for _ in range(int(lat_cfg.get("plan_measurements", 3)) - 1):
            more = latency_ms({"dense": dense_model, "pruned": final}, example.cpu(), lat_cfg.batch_size,
                              lat_cfg.warmup, lat_cfg.repeats, cl, fold, bool(lat_cfg.get("compile", False)))[1]
            reductions.append(1.0 - more["min_ms"]["pruned"] / more["min_ms"]["dense"])
            contended = contended or more["contention"]["contended"]
    achieved = {"params": pruned["sparsity"], "flops": pruned["flops_reduction"],
                "latency": statistics.median_high(reductions)}[target]
    tol = {"params": 0.005, "flops": 0.02, "latency": float(lat_cfg.get("tolerance", 0.04))}[target]
    # a latency budget is a ceiling on latency (HALP's constraint): removing more than asked meets it
    met = achieved >= cfg.budget - tol if target == "latency" else abs(achieved - cfg.budget) <= tol
    if target == "latency" and contended:
        log.warning("budget_met of this latency budget was read from a contended measurement (other processes "
                    "were running): re-measure on a quiet machine (scripts/remeasure_latency.py) before relying on it")
    if cfg.method.name != "dense" and not met:
        log.warning("achieved %s reduction %.4f is outside %s%.3f of budget %.3f", target, achieved,
                    "-" if target == "latency" else "±", tol, cfg.budget)
    latency = {"device": "cpu", "batch_size": lat_cfg.batch_size, "channels_last": cl, **applied,
               "dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
               "dense_min_ms": fastest["dense"], "pruned_min_ms": fastest["pruned"], "contended": contended}
    if target == "latency":  # the deliverable as saved, timed as anyone would load it
        latency.update(reduction=achieved, reductions=reductions)
        latency["exported"] = report.exported_latency(out_dir / "model.pt2", dense_model, example.cpu(), lat_cfg)
    layers = report.layer_table(dense_model, final)
    results = {
        "schema": report.SCHEMA, "method": cfg.method.name,
        "budget": 0.0 if cfg.method.name == "dense" else float(cfg.budget),
        "target": cfg.method.target, "model": cfg.model.name, "data": dm.name, "seed": int(cfg.seed),
        "tags": list(cfg.get("tags") or []),
        # train_wall_s: the dense reference's own training time, recorded when it was trained (cached
        # references written before the key read NaN)
        "dense": {**{k: dense[k] for k in ("top1", "top5", "params", "flops")},
                  "train_wall_s": float(dense.get("train_wall_s", float("nan")))},
        "pruned": pruned,
        "budget_met": cfg.method.name == "dense" or met,
        "latency": latency,
        "layers": layers,
        "train": {"epochs": int(trainer.current_epoch), "steps": int(trainer.global_step), "wall_s": wall,
                  "world_size": int(trainer.world_size), "total_wall_s": time.time() - t_start,
                "precision": str(trainer.precision), "compiled": bool(module.compile_training and trainer.global_step),
                  "mask_digest_per_rank": digests},
        "export": {"max_abs_diff_masked_vs_deployed": export_diff},
        "env": {"git_sha": report.git_sha(Path(cfg.paths.root_dir)), "torch": torch.__version__,
                "lightning": L.__version__, "cpu": cpu_name(), "cpu_isa": cpu_isa(), "cpu_kind": cpu_kind(),
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
    }
    # records of the method's post-training steps (their pruning cost), the run's callbacks (training
    # cost), then the method's (search results, its own cost accounting, ...): under their own keys,
    # or merged into `train`
    earlier = None if cfg.ckpt_path is None else Path(cfg.ckpt_path).resolve().parent.parent / "prepare.json"
    if earlier is not None and earlier.is_file():  # the steps ran in the run the checkpoint belongs to
        reports = [json.loads(earlier.read_text())]
        if earlier != prepared.resolve():
            shutil.copyfile(earlier, prepared)
    else:
        reports = [s.report() for s in prepare if callable(getattr(s, "report", None))]
    merge_reports(results, reports + [cb.report() for cb in run_callbacks + callbacks
                                      if callable(getattr(cb, "report", None))])
    results["train"]["cost_dense_epochs"], results["train"]["cost_wall_s"] = training_cost(results, cfg, dense, dm)
    report.plot_layers(layers, out_dir / "layers.png",
                       f"{cfg.method.name} {cfg.model.name}/{dm.name} budget={cfg.budget} ({cfg.method.target})")
    publish(loggers, results, out_dir)
    report.write_json_atomic(out_dir / "results.json", results)
    from rich.console import Console

    Console().print(report.summary_table(results))
    log.info("results: %s", out_dir / "results.json")
    return results
