"""prune_lab entry point:  python train.py method=stp budget=0.85   (see README.md)."""
import sys

import hydra
from omegaconf import DictConfig

from prune_lab.cli import check_overrides, continue_unfinished_run, set_sweep_id


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from prune_lab.errors import PruneLabError
    from prune_lab.pipeline import run_job

    try:
        run_job(cfg)
    except PruneLabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    set_sweep_id(sys.argv[1:])
    continue_unfinished_run(sys.argv[1:])
    main()
