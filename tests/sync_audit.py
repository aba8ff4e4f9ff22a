"""Counts host reads of tensor values made by prune_lab code during training steps (test helper).

On an accelerator each of these waits for the device: `.item()`, `float()`/`int()`/`bool()` of a
tensor, `.tolist()`, `.numpy()`, `.cpu()`, and `nonzero` (a data-dependent shape). On the CPU they
cost nothing, so they are found by counting calls whose caller is in the prune_lab package."""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch

PACKAGE = str(Path(__file__).resolve().parent.parent / "prune_lab") + "/"
METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu", "nonzero")


def _caller_in_package() -> str | None:
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return None
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE):
            if name.startswith(PACKAGE + "data/"):  # the data pipeline reads host tensors before any transfer
                return None
            if name == PACKAGE + "pipeline.py":  # only Lightning's own code between here and the read
                return None
            return f"{name[len(PACKAGE):]}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class SyncAudit(L.Callback):
    """events[step] = [(method, 'file:line'), ...] for the steps from `start` on."""

    def __init__(self, start: int = 2):
        self.start, self.step, self.events = start, -1, defaultdict(list)
        self._saved = {}

    def _patch(self):
        for m in METHODS:
            original = getattr(torch.Tensor, m)
            self._saved[m] = original

            def wrapped(t, *a, __m=m, __o=original, **k):
                if self.step >= self.start:
                    where = _caller_in_package()
                    if where is not None:
                        self.events[self.step].append((__m, where))
                return __o(t, *a, **k)

            setattr(torch.Tensor, m, wrapped)

    def _unpatch(self):
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, original)
        self._saved = {}

    def on_train_start(self, trainer, pl_module):
        self._patch()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step

    # what runs between steps (validation, epoch ends, checkpoints) is not a step; the batch-end hooks
    # of the other callbacks are (this one runs first: the test puts it first in the list)
    def on_validation_start(self, trainer, pl_module):
        self.step = -1

    def on_train_epoch_end(self, trainer, pl_module):
        self.step = -1

    def on_train_end(self, trainer, pl_module):
        self.step = -1
        self._unpatch()

    def teardown(self, trainer, pl_module, stage):
        self._unpatch()


def instance():  # the config's _target_: the audit object the caller prepared (THE)
    return THE


THE: SyncAudit | None = None
