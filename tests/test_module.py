"""PruneLabModule: training in channels-last layout (`module.channels_last`)."""
from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn

from prune_lab.callbacks import MaskUpdate
from prune_lab.data import DigitsDataModule
from prune_lab.models import create_model
from prune_lab.module import PruneLabModule
from prune_lab.sparsity import OneShot

pytestmark = pytest.mark.usefixtures("one_thread")
CL = torch.channels_last


class LayoutProbe(L.Callback):
    """Records, at every training step, whether the conv weights, their masks and the batch the
    model sees are in channels-last layout."""

    def __init__(self):
        self.seen: list[tuple[bool, bool, bool]] = []

    @staticmethod
    def conv(model):  # with one input channel both layouts coincide: take a conv with several
        return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        conv = self.conv(pl_module.model)
        captured = []
        handle = conv.register_forward_pre_hook(lambda m, args: captured.append(args[0].is_contiguous(memory_format=CL)))
        self._handle, self._captured = handle, captured

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        w = self.conv(pl_module.model).weight
        params, masks = pl_module.masks._enforced()
        mask = next(m for p, m in zip(params, masks) if p is w)
        self.seen.append((w.is_contiguous(memory_format=CL), mask.is_contiguous(memory_format=CL), self._captured[0]))
        self._handle.remove()


def fit(channels_last: bool):
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=8, batch_size=64, seed=0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    opt = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    module = PruneLabModule(model, 10, dm.example_input(1), opt, channels_last=channels_last)
    probe = LayoutProbe()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, limit_val_batches=0,
                        callbacks=[MaskUpdate(0.8, distribution="uniform", schedule=OneShot()), probe])
    trainer.fit(module, datamodule=dm)
    return module, probe


def test_channels_last_training_matches_the_default_layout():
    nchw, probe_nchw = fit(False)
    nhwc, probe_nhwc = fit(True)
    assert probe_nhwc.seen and all(all(s) for s in probe_nhwc.seen)      # weights, masks, inputs in NHWC
    assert not any(any(s) for s in probe_nchw.seen)
    # after fit the model is back in the default layout (export and safetensors expect it)
    assert all(p.is_contiguous() for p in nhwc.model.parameters())
    for name in nchw.masks.prunable:
        assert torch.equal(nchw.masks[name], nhwc.masks[name])
    params = dict(nhwc.model.named_parameters())
    for name in nhwc.masks.active:
        assert not params[name][~nhwc.masks[name]].any()  # pruned entries stayed exactly zero
    # the same training up to float rounding: oneDNN sums in another order in NHWC, and gradients
    # of an 80 %-pruned net at initialisation cancel heavily, so compare what the models compute
    x = torch.randn(32, 1, 8, 8)
    nchw.model.eval(), nhwc.model.eval()
    with torch.no_grad():
        a, b = nchw.model(x), nhwc.model(x)
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(a.abs().max()))
    assert torch.equal(a.argmax(1), b.argmax(1))


def test_channels_last_is_ignored_for_non_image_inputs():
    module = PruneLabModule(torch.nn.Sequential(torch.nn.Linear(6, 3)), 3, torch.zeros(1, 6), None,
                            channels_last=True)
    assert module.channels_last is False



def test_channels_last_is_turned_off_for_a_strided_1x1_conv_with_few_input_channels(caplog):
    """oneDNN's channels-last CPU backward of Conv2d(c<8, ., 1, stride=2) corrupts the heap (bisected on
    PyTorch 2.14.1, AVX2); a shrunk ResNet has such shortcuts. Training then stays NCHW, with one warning;
    a model without such a layer keeps channels-last."""
    import logging

    from prune_lab.module import PruneLabModule

    def module_for(width_in):
        net = nn.Sequential(nn.Conv2d(1, width_in, 3, padding=1), nn.Conv2d(width_in, 16, 1, stride=2),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        return PruneLabModule(net, 10, torch.zeros(1, 1, 8, 8), lambda p: torch.optim.SGD(p, lr=0.1),
                              channels_last=True)

    unsafe = module_for(6)
    with caplog.at_level(logging.WARNING, logger="prune_lab"):
        unsafe.setup("fit")
    assert not unsafe.channels_last and "training in NCHW instead: 1 " in caplog.text
    from prune_lab.sparsity.reparam import ExpandedConv2d

    expanded = module_for(6)  # over-parameterization's collapsed chain runs a 1x1 stride-2 conv on 6 channels
    expanded.model[1] = ExpandedConv2d(expanded.model[1], ratio=4)
    expanded.setup("fit")
    assert not expanded.channels_last
    safe = module_for(8)
    safe.setup("fit")
    assert safe.channels_last and safe.model[1].weight.is_contiguous(memory_format=torch.channels_last)
