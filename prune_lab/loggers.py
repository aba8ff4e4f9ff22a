"""Experiment loggers beyond Lightning's defaults: W&B set-up that never prompts, and the end-of-run
publication of results.json, the per-layer table and layers.png."""
from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("prune_lab")


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def prepare_wandb(node: DictConfig, cfg: DictConfig) -> DictConfig:
    """Tags for method and budget; offline (and silent) when asked or when there is no key."""
    node = OmegaConf.to_container(node, resolve=True)
    node["tags"] = [*node.get("tags", []), f"method={cfg.method.name}", f"budget={cfg.budget}",
                    f"model={cfg.model.name}"]
    if node.get("offline") or not wandb_has_key():
        if not node.get("offline"):
            log.info("W&B: no API key found; logging offline (upload later with `wandb sync`)")
        node["offline"] = True
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(node["save_dir"]).mkdir(parents=True, exist_ok=True)
    return OmegaConf.create(node)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def publish(loggers: list, results: dict, out_dir: Path) -> None:
    """Put the run's record where each logger's users look for it."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        run = logger.experiment
        run.summary.update(flatten({k: v for k, v in results.items() if k != "layers"}))
        table = wandb.Table(columns=["layer", "shape", "dense_shape", "density"],
                            data=[[r["name"], str(r["shape"]), str(r["dense_shape"]), r["density"]]
                                  for r in results["layers"]])
        run.log({"layers/density": table, "layers/plot": wandb.Image(str(out_dir / "layers.png"))})
        # a readable copy among the run's files (uploaded by `wandb sync` with the rest): offline
        # runs keep their summary only inside the binary .wandb log
        (Path(run.dir) / "results.json").write_text(json.dumps(results, indent=2))
        run.finish()
