"""PruneLabModule: the LightningModule every method trains.

It owns the model, its `MaskSet` and a teacher slot; callbacks add to its behaviour (pruning,
regrowth, distillation) instead of subclassing it. Extra loss terms from callbacks are
registered in `loss_terms` as callables `(module, batch, logits) -> tensor`.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from prune_lab.models import classifier_of
from prune_lab.sparsity import MaskSet

log = logging.getLogger("prune_lab")


def _accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro")


def make_scheduler(factory: Callable, optimizer, total_steps: int, epochs: int | None = None):
    """Call a partial LR-scheduler factory, supplying the run length (steps, epochs) where it asks for one."""
    if factory is None:
        return None
    func = getattr(factory, "func", factory)
    given = getattr(factory, "keywords", {})
    params = inspect.signature(func).parameters
    extra = {k: total_steps for k in ("T_max", "total_steps", "total_iters") if k in params and k not in given}
    if epochs is not None and "epochs" in params and "epochs" not in given:
        extra["epochs"] = epochs
    return factory(optimizer, **extra)


class PruneLabModule(L.LightningModule):
    def __init__(self, model: nn.Module, num_classes: int, example_input: torch.Tensor,
                 optimizer: Callable, scheduler: Callable | None = None, label_smoothing: float = 0.0,
                 channels_last: bool = False, compile: bool = False):
        super().__init__()
        self.model = model
        # `module.compile`: the forward (and so its backward) through torch.compile; masks stay
        # enforced outside the graph by in-place multiplies on the parameters, which the compiled
        # graph reads as inputs, so no recompilation follows a mask change
        self.compile_training = compile
        self._compiled: tuple = ()  # (model it wraps, compiled) — a tuple keeps it out of state_dict
        # train in NHWC: the fast path of oneDNN and cuDNN convolutions (scripts/bench.py measures it)
        self.channels_last = channels_last and example_input.dim() == 4
        self.masks = MaskSet(model)
        self.register_buffer("example_input", example_input[:1].clone(), persistent=False)
        self.classifier_name, self.classifier = classifier_of(model)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing = label_smoothing
        self.loss_terms: list[Callable] = []
        # weight of the label cross-entropy; a callback may set 0 (UniPTS's objective uses no labels)
        self.label_loss_weight = 1.0
        self._teacher: list[nn.Module] = []  # a list keeps the teacher out of state_dict and .parameters()
        self.metrics = nn.ModuleDict({f"{stage}_{k}": _accuracy(num_classes, k)
                                      for stage in ("val", "test") for k in (1, 5)})

    # teacher slot: a frozen model that distillation callbacks compare against
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    @teacher.setter
    def teacher(self, model: nn.Module | None) -> None:
        self._teacher = [] if model is None else [model.requires_grad_(False)]

    def __setattr__(self, name, value):
        # nn.Module.__setattr__ registers any Module value as a submodule and never reaches the
        # property setter, which would put the teacher into state_dict and leave the slot empty
        if name == "teacher":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def rebind(self) -> None:
        """Re-point masks and classifier at `self.model` after a callback replaced or restructured
        it (physical shrink, expansion, merge): both hold references to the old modules."""
        self.masks.bind(self.model)
        self.classifier_name, self.classifier = classifier_of(self.model)

    def setup(self, stage):
        # after the callbacks' setup (which may shrink or expand the model), before the optimizer
        # and DDP see the parameters; `.to(memory_format=)` keeps the Parameter objects
        if stage == "fit" and self.channels_last and self._onednn_unsafe_layer() is not None:
            name, conv = self._onednn_unsafe_layer()
            log.warning("module.channels_last: training in NCHW instead: %s (a strided 1x1 convolution with %d < 8 "
                        "input channels, e.g. after a physical shrink) corrupts memory in oneDNN's channels-last CPU "
                        "backward (PyTorch 2.14 on AVX2 hosts: double free / segfault)", name, conv.in_channels)
            self.channels_last = False
        if stage == "fit" and self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.masks.bind(self.model)

    def _onednn_unsafe_layer(self) -> tuple[str, nn.Conv2d] | None:
        """The first conv that channels-last training on the CPU must not run: 1x1, stride > 1, fewer than 8
        input channels (found by bisecting a crash: Conv2d(6, 12, 1, stride=2) on a channels-last input that
        requires grad aborts the process; 3x3 strided, 1x1 unstrided and >= 8 input channels do not)."""
        device = getattr(getattr(self, "_trainer", None), "strategy", None)
        if device is not None and getattr(device, "root_device", torch.device("cpu")).type != "cpu":
            return None  # cuDNN, not oneDNN
        from prune_lab.sparsity.reparam import ExpandedConv2d

        for name, m in self.model.named_modules():
            # an expanded conv (over-parameterization, collapsed compute) runs its k×k factor's geometry on
            # the original input channels: judge it as that conv
            conv = nn.Conv2d(m.a.in_channels, m.b.out_channels, m.k.kernel_size, stride=m.k.stride, device="meta") \
                if isinstance(m, ExpandedConv2d) else m
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1 \
                    and conv.in_channels < 8:
                return name, conv
        return None

    def on_fit_end(self):
        # export, torch.export and safetensors expect the default layout
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
            self.masks.bind(self.model)

    def forward(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile_training and self.training:  # evaluation runs eager: one graph to compile, not three
            return self._compiled_forward(x)
        return self.model(x)

    def _compiled_forward(self, x):
        # compiled once per model object: a callback that replaces the model (shrink, expansion,
        # merge) gets a fresh compilation instead of the old graph
        if not self._compiled or self._compiled[0] is not self.model:
            # a fresh cache: Dynamo keys compiled code by the model's class and does not guard on
            # module hooks, so a second model of the class (the run after the dense reference, a
            # sweep's next job in this process) would reuse code that skips its hooks (distillation's
            # feature hooks), and its per-code cache limit would silently fall back to eager
            torch._dynamo.reset()
            # and hooks added or removed later (a callback's feature hooks) recompile instead of being skipped
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            self._compiled = (self.model, torch.compile(self.model))
        try:
            return self._compiled[1](x)
        except Exception as e:  # noqa: BLE001 - Inductor failures (no C++ compiler, an unsupported op)
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise  # an error of the model itself, not of its compilation
            log.warning("module.compile: training eager instead; torch.compile failed: %s",
                        str(e).strip().splitlines()[0][:200])
            self.compile_training = False
            return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.log("train/ce", ce, on_step=False, on_epoch=True, sync_dist=True)
        loss = ce if self.label_loss_weight == 1.0 else self.label_loss_weight * ce
        for term in self.loss_terms:
            loss = loss + term(self, batch, logits)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _eval_step(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        for k in (1, 5):
            metric = self.metrics[f"{stage}_{k}"]
            metric.update(logits, y)
            self.log(f"{stage}/top{k}", metric, on_epoch=True, prog_bar=(k == 1))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_train_epoch_end(self):
        self.log("sparsity", self.masks.sparsity(), on_epoch=True, sync_dist=True)

    def on_load_checkpoint(self, checkpoint):
        self.masks.bind(self.model)

    def parameter_groups(self) -> list:
        """The model's parameters for the optimizer: one group, or two when modules list parameters
        in `no_decay_parameters()` (the outer factors of an expanded layer, whose weight decay would
        shrink the merged weight 3× as fast): those get weight_decay=0."""
        exempt = {id(p) for m in self.model.modules() if hasattr(m, "no_decay_parameters")
                  for p in m.no_decay_parameters()}
        params = list(self.model.parameters())
        if not exempt:
            return params
        return [{"params": [p for p in params if id(p) not in exempt]},
                {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        scheduler = make_scheduler(self.scheduler_factory, optimizer, int(self.trainer.estimated_stepping_batches),
                                   int(self.trainer.max_epochs or 1))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
