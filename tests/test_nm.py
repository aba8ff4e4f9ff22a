"""N:M sparsity: the pattern itself, SR-STE and IEE keeping it at every step, and the exported
model of every N:M method holding it (digits 8x8, resnet8)."""
from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from prune_lab.callbacks import DynamicSparsity
from prune_lab.data import DigitsDataModule
from prune_lab.errors import PruneLabError
from prune_lab.models import create_model
from prune_lab.module import PruneLabModule
from prune_lab.sparsity.nm import NMPattern
from test_pipeline import run_fast
from test_regrowth import EXPLORE, GROW, STEPS, fit, iee

P24 = NMPattern(2, 4)


def manual_groups(w: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Every run of m consecutive input-dimension entries, by explicit indexing."""
    out = []
    for o in range(w.shape[0]):
        for g in range(w.shape[1] // m):
            block = w[o, g * m:(g + 1) * m]  # (m,) for linear, (m, kh, kw) for conv
            out.extend(block.reshape(m, -1).t())  # one group per kernel position
    return out


@pytest.mark.parametrize("shape", [(6, 8, 3, 3), (5, 12)])
def test_mask_keeps_the_n_largest_of_every_m_along_the_input_dimension(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = P24.mask(w.abs())
    for weights, kept in zip(manual_groups(w, 4), manual_groups(mask, 4)):
        assert int(kept.sum()) == 2
        assert set(torch.topk(weights.abs(), 2).indices.tolist()) == set(kept.nonzero().flatten().tolist())
    assert P24.holds(w * mask) and bool((P24.group_counts(w * mask) == 2).all())
    assert torch.equal(P24.ungroup(P24.groups(w), w), w)  # the group view is a permutation


def test_layers_the_pattern_does_not_fit_stay_dense_and_per_group_counts():
    assert bool(P24.mask(torch.randn(16, 3, 3, 3)).all())  # 3 input channels: not a multiple of 4
    scores = torch.arange(8.0).reshape(1, 8)
    picked = P24.top_per_group(scores, torch.tensor([1, 3]), candidates=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]]).bool())
    assert picked.int().tolist() == [[0, 0, 0, 1, 0, 1, 1, 1]]


@pytest.mark.parametrize("text", ["4:2", "2-4", "0:4", "a:b", "2:4:8"])
def test_bad_patterns_are_one_line_errors(text):
    with pytest.raises(PruneLabError) as e:
        NMPattern.parse(text)
    assert "\n" not in str(e.value) and text in str(e.value) and "N:M" in str(e.value)


class ForwardWeights(L.Callback):
    """Weights the forward pass used (at backward time) and the dense weights the optimizer steps."""

    def __init__(self):
        self.forward, self.stepped = {}, {}

    def on_before_backward(self, trainer, pl_module, loss):
        self.forward[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                             if n in pl_module.masks.prunable}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.stepped[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                             if n in pl_module.masks.prunable}


def test_sr_ste_forward_holds_the_pattern_every_step_and_the_dense_weights_keep_moving():
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(image_size=8, batch_size=64, seed=0)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    module = PruneLabModule(model, 10, dm.example_input(1), partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    probe = ForwardWeights()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, limit_val_batches=0,
                        callbacks=[DynamicSparsity(decay=2e-4, budget=0.5, pattern="2:4"), probe])
    trainer.fit(module, datamodule=dm)
    fitting = [n for n, w in probe.forward[0].items() if P24.fits(w)]
    assert len(fitting) == len(probe.forward[0]) - 1  # only the stem (1 input channel) is left dense
    for t, weights in probe.forward.items():
        for n in fitting:
            assert bool((P24.group_counts(weights[n]) == 2).all()), (t, n)  # exactly N of every M
    # straight-through: the pruned entries of the dense weights are stepped too, so masks change
    n = fitting[1]
    assert bool((P24.group_counts(probe.stepped[3][n]) > 2).any())
    assert not torch.equal(probe.forward[1][n] != 0, probe.forward[16][n] != 0)
    final = dict(module.model.named_parameters())
    assert all(bool((P24.group_counts(final[n]) == 2).all()) for n in fitting)


def test_iee_with_a_pattern_prunes_and_grows_within_groups():
    policy = iee(pattern="2:4")
    _, probe = fit(policy, budget=0.5, pattern="2:4")
    layers = list(probe.start[GROW[0]]["keep"])
    assert layers and all(P24.fits(probe.start[0]["masks"][n]) for n in layers)
    explore = set(sum(EXPLORE, ()))
    for t in range(STEPS):
        for n in layers:
            counts = P24.group_counts(probe.start[t]["masks"][n])
            if t in explore:
                assert bool((counts == 4).all())  # exploring: everything unmasked
                continue
            assert bool((counts <= 2).all())  # after a prune some groups hold fewer, never more
            assert bool((P24.group_counts(probe.end[t][n]) <= 2).all()), (t, n)
            if t == 0 or t in GROW or t > GROW[-1]:
                assert bool((counts == 2).all()), (t, n)  # every grow restores exactly N per group
    moved = any(not torch.equal(probe.start[STEPS - 1]["masks"][n], probe.start[0]["masks"][n]) for n in layers)
    assert moved


@pytest.mark.parametrize("method", ["magnitude", "sr_ste", "iee"])
def test_exported_model_keeps_the_pattern(method, tmp_path, dense_dir):
    extra = {"magnitude": ["method.pattern=2:4"], "sr_ste": [], "iee": ["method.pattern=2:4", "method.cycles=2"]}
    results, out = run_fast(tmp_path, dense_dir, f"method={method}", "budget=0.5", *extra[method])
    state = load_file(str(out / "model.safetensors"))
    weights = {k: v for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)}
    dense = [k for k, v in weights.items() if not P24.fits(v)]
    assert results["pattern"] == {"n": 2, "m": 4, "dense_layers": dense} and dense == ["conv1.weight"]
    for k, v in weights.items():
        if k not in dense:
            assert bool((P24.group_counts(v) == 2).all()), k
    assert results["budget_met"] is True
