"""Crash safety: a resumable `last.ckpt` during training, written so a kill never corrupts it.

Lightning's `ModelCheckpoint(save_top_k=0, save_last=True)` (2.6) writes `last.ckpt` only "when a
checkpoint was saved in this step": with no top-k checkpoint it is never saved until training
ends, so a killed run had nothing to resume from. `ResumableCheckpoint` keeps Lightning's
placement of the epoch-end save (after validation when there is one, else at the end of the
training epoch) but always writes `last.ckpt` there, and also

- every `every_n_steps` optimizer steps and/or every `every_minutes` of training (null = off),
  mid-epoch: the training data loader is stateful (`prune_lab.data.base.ResumableLoader`), so a
  resumed run continues with the next batch of the same epoch order;
- once more when training has ended (after every callback's `on_train_end`, e.g. dynamic
  sparsity's final swap to the sparse weights): a run killed during the search, BN re-estimation
  or export that follow resumes with training already done.

Every write goes to a temporary file in the same folder, then `os.replace`: a kill while writing
leaves the previous checkpoint readable. `save_top_k=-1` also keeps `epoch{N}.ckpt` per epoch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from prune_lab.errors import PruneLabError


def save_checkpoint_atomic(trainer, path, weights_only: bool = False) -> None:
    """`trainer.save_checkpoint`, but the file at `path` is replaced in one step (rank 0 writes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    trainer.save_checkpoint(tmp, weights_only)  # rank 0 writes; ends with a barrier
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("save_checkpoint_atomic")


def remove_stale_temporaries(folder: Path) -> None:
    """Half-written checkpoints of killed processes (`.<name>.tmp<pid>` whose pid is gone)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # alive under another user: not ours to touch


class ResumableCheckpoint(ModelCheckpoint):
    """Args:
        dirpath: folder of `last.ckpt` (and `epoch{N}.ckpt` with `keep_epochs`).
        every_n_steps: also save every N optimizer steps (null: only at epoch ends).
        every_minutes: also save when this many minutes of training passed since the last save.
        save_top_k: 0 keeps only `last.ckpt`; -1 also keeps `epoch{N}.ckpt` of every epoch.
    """

    def __init__(self, dirpath, every_n_steps: int | None = None, every_minutes: float | None = None,
                 save_top_k: int = 0, filename: str = "epoch{epoch:03d}"):
        if save_top_k not in (0, -1):
            raise PruneLabError(f"checkpoint save_top_k={save_top_k} is not one of: 0 (only last.ckpt), "
                                "-1 (also one per epoch)")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or int(every_n_steps) < 1):
            raise PruneLabError(f"checkpoint every_n_steps={every_n_steps} must be a positive integer or null (off)")
        if every_minutes is not None and not float(every_minutes) > 0:
            raise PruneLabError(f"checkpoint every_minutes={every_minutes} must be a positive number or null (off)")
        super().__init__(dirpath=dirpath, filename=filename, auto_insert_metric_name=False, save_last=True,
                         save_top_k=save_top_k, every_n_epochs=1, enable_version_counter=False)
        self.every_n_steps = int(every_n_steps) if every_n_steps else None
        self.every_seconds = 60.0 * float(every_minutes) if every_minutes else None
        self._last_save_time = time.monotonic()

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            remove_stale_temporaries(Path(self.dirpath))

    def on_train_start(self, trainer, pl_module):
        self._last_save_time = time.monotonic()

    # -- when ---------------------------------------------------------------------------------
    def _fitting(self, trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._fitting(trainer) or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save follows at once
        due = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        if self.every_seconds is not None:
            late = time.monotonic() - self._last_save_time >= self.every_seconds
            due = due or bool(trainer.strategy.broadcast(late))  # rank 0's clock decides for all
        if due and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module):
        if self._should_save_on_train_epoch_end(trainer):
            self._save_epoch(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_epoch(trainer)

    def on_train_end(self, trainer, pl_module):
        if self._fitting(trainer):  # the final state, after every callback's on_train_end
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_epoch(self, trainer) -> None:
        if not self._fitting(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.save_top_k != 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # -- how ------------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        save_checkpoint_atomic(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self._last_save_time = time.monotonic()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
