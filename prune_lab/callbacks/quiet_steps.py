"""`QuietSteps`: a run's batches hold the quiet lock shared (prune_lab/quiet.py says why)."""
from __future__ import annotations

import logging

import lightning as L

from prune_lab import quiet

log = logging.getLogger("prune_lab")


class QuietSteps(L.Callback):
    """Holds the quiet lock shared during every training, validation and test batch (a no-op
    unless `configure` was given a path; switched off for multi-process runs)."""

    def setup(self, trainer, pl_module, stage):
        if trainer.world_size > 1 and quiet.active():
            log.info("quiet lock: off under DDP")
            quiet.configure(None)

    def _begin(self, *args, **kwargs):
        quiet.begin_work()

    def _end(self, *args, **kwargs):
        quiet.end_work()

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = _begin
    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _end

    def on_exception(self, trainer, pl_module, exception):
        quiet.end_work()
