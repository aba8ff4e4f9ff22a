"""Dynamic sparse training: schedules, drop/grow selection, RigL/SET and IEE driven by the real
Regrowth callback inside a Lightning fit (digits 8x8, resnet8), every step recorded by a probe."""
from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch

from prune_lab.callbacks import MaskUpdate, Regrowth
from prune_lab.data import DigitsDataModule
from prune_lab.errors import PruneLabError
from prune_lab.methods.iee_probe import GrowLoss
from prune_lab.methods.iee import IEE
from prune_lab.models import create_model
from prune_lab.module import PruneLabModule
from prune_lab.sparsity import ChannelGroups, CosineDecay, ExponentialDecay, FlopsModel, OneShot
from prune_lab.sparsity.importance import Magnitude, Random
from prune_lab.sparsity.regrowth import DropGrow, drop_and_grow, highest, lowest, step_generator

BUDGET = 0.9
STEPS = 34  # digits 8x8: 1078 training images, batch 64 -> 17 steps per epoch, 2 epochs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- schedules -----------------------------------------------------------------------------------
def test_cosine_decay_is_rigls_drop_fraction():
    s = CosineDecay(init=0.3, every=10, end=0.75)
    assert [t for t in range(100) if s.is_update(t, 100)] == [10, 20, 30, 40, 50, 60, 70]  # not 0, stops < 75
    assert s.fraction(0, 100) == pytest.approx(0.3)
    assert s.fraction(37, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 37 / 75)))
    assert s.fraction(75, 100) == pytest.approx(0.0) and s.fraction(99, 100) == pytest.approx(0.0)


def test_exponential_decay_reaches_final_at_end():
    s = ExponentialDecay(init=0.3, final=0.01, end=0.75)
    assert s.fraction(0, 400) == pytest.approx(0.3)
    assert s.fraction(150, 400) == pytest.approx(0.3 * (0.01 / 0.3) ** 0.5)
    assert s.fraction(300, 400) == pytest.approx(0.01) and s.fraction(399, 400) == pytest.approx(0.01)


@pytest.mark.parametrize("make,words", [
    (lambda: CosineDecay(init=1.5), ["init=1.5", "(0, 1]"]),
    (lambda: CosineDecay(every=0), ["every=0"]),
    (lambda: ExponentialDecay(end=0.0), ["end=0.0", "(0, 1]"]),
    (lambda: ExponentialDecay(init=0.1, final=0.2), ["final=0.2", "init=0.1"]),
    (lambda: DropGrow(grow="momentum"), ["momentum", "gradient", "random"]),
    (lambda: IEE(grow_init="ones"), ["ones", "mru", "zero"]),
    (lambda: IEE(grow_values="mru"), ["grow_values='mru'", "explored", "last_active", "zero"]),
    (lambda: IEE(mru="zero"), ["mru='zero'", "last_active", "explored"]),
    (lambda: IEE(cycles=0), ["cycles=0", "integer >= 1"]),
    (lambda: IEE(estimate_steps=10), ["estimate_steps", "improve_steps", "explore_steps", "none"]),
    (lambda: IEE(estimate_steps=1.5, improve_steps=1, explore_steps=1), ["estimate_steps=1.5", "(0, 1)"]),
    (lambda: IEE(pattern="4:2"), ["pattern='4:2'", "0 < N < M"]),
    (lambda: IEE(target="flops", criterion="gradient"), ["gradient", "taylor", "magnitude"]),
    (lambda: IEE(explore_steps=0), ["explore_steps=0"]),
    (lambda: Regrowth(policy="rigl"), ["str", "DropGrow", "IEE"]),
])
def test_bad_values_are_one_line_errors(make, words):
    with pytest.raises(PruneLabError) as e:
        make()
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


# -- selection -------------------------------------------------------------------------------------
def test_drop_and_grow_moves_exactly_n_and_picks_extremes():
    keep = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    w = torch.tensor([0.5, -0.1, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.8, 0.2])
    new, removed, added = drop_and_grow(keep, w.abs(), g, 2)
    assert new.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert removed.tolist() == [0, 1, 0, 1, 0, 0, 0, 0] and added.tolist() == [0, 0, 0, 0, 1, 0, 1, 0]
    # a dropped unit whose grow score is best comes straight back: nothing moves for it
    new, removed, added = drop_and_grow(keep, w.abs(), torch.tensor([0, 5.0, 0, 0, 1, 0, 0, 0]), 1)
    assert torch.equal(new, keep) and not removed.any() and not added.any()
    # ties break by position, identically every time
    ties = torch.zeros(8)
    assert lowest(ties, keep, 2).tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert highest(ties, ~keep, 2).tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError):
        lowest(ties, keep, 5)


def test_step_generator_depends_on_seed_and_step_only():
    a = torch.rand(5, generator=step_generator(3, 100))
    assert torch.equal(a, torch.rand(5, generator=step_generator(3, 100)))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(3, 101)))
    assert not torch.equal(a, torch.rand(5, generator=step_generator(4, 100)))


# -- a real fit with a probe ---------------------------------------------------------------------
class Probe(L.Callback):
    """Records, for every step, parameters, masks and the policy's Θ_K after the regrowth
    callback's `before_forward` (at batch start) and after the optimizer step (at batch end)."""

    def __init__(self, policy):
        self.policy, self.start, self.end, self.grads = policy, {}, {}, {}
        self.before_step, self.momentum = {}, {}

    @staticmethod
    def _params(pl_module):
        return {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_fit_start(self, trainer, pl_module):
        self.initial = self._params(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keep = getattr(self.policy, "keep", None)
        self.start[trainer.global_step] = {
            "params": self._params(pl_module),
            "masks": {n: pl_module.masks[n].clone() for n in pl_module.masks.prunable},
            "keep": None if keep is None else {k: v.clone() for k, v in keep.items()},
            "mru": {k: v.clone() for k, v in self.policy.mru.items()} if hasattr(self.policy, "mru") else None,
            "plan": {k: v.clone() for k, v in pl_module.masks.channel_plan.items()},
        }

    def on_after_backward(self, trainer, pl_module):
        self.grads[trainer.global_step] = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step[trainer.global_step] = self._params(pl_module)
        self.momentum[trainer.global_step] = {
            n: optimizer.state[p]["momentum_buffer"].clone() if optimizer.state.get(p) else torch.zeros_like(p)
            for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end[trainer.global_step - 1] = self._params(pl_module)


def fit(policy, target="params", budget=BUDGET, seed=0, extra=(), val_batches=0, pattern=None):
    """Two epochs on digits 8x8 with MaskUpdate (step-0 mask) + Regrowth(policy) + the probe
    (+ `extra` callbacks after it)."""
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(image_size=8, batch_size=64, seed=seed)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    opt = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    module = PruneLabModule(model, 10, dm.example_input(1), opt)
    if target == "params":
        init = MaskUpdate(budget, distribution="erk", importance=Random(seed=seed), schedule=OneShot(), pattern=pattern)
    else:
        init = MaskUpdate(budget, target="flops", distribution="uniform", importance=Magnitude(), schedule=OneShot())
    probe = Probe(policy)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, limit_val_batches=val_batches,
                        callbacks=[init, Regrowth(policy), probe, *extra])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == STEPS
    return module, probe


def counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


# -- RigL and SET ------------------------------------------------------------------------------------
@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_rigl_and_set_keep_exact_per_layer_counts_and_grow_from_zero(grow):
    policy = DropGrow(grow=grow, schedule=CosineDecay(init=0.3, every=5, end=0.75), seed=0)
    module, probe = fit(policy)
    updates = [t for t in range(STEPS) if policy.schedule.is_update(t, STEPS)]
    assert updates == [5, 10, 15, 20] and policy.updates == 4
    initial = counts(probe.start[0]["masks"])
    numel = sum(m.numel() for m in probe.start[0]["masks"].values())
    assert 1 - sum(initial.values()) / numel == pytest.approx(BUDGET, abs=5e-4)  # ERK at the budget
    moved = 0
    for u in updates:
        before, after = probe.start[u]["masks"], probe.start[u + 1]["masks"]
        assert counts(after) == initial  # exact: every layer keeps its ERK count
        for n, keep in before.items():
            if bool(keep.all()):
                assert bool(after[n].all())  # layers ERK left dense are not touched
                continue
            k = round(policy.schedule.fraction(u, STEPS) * int(keep.sum()))
            w = probe.start[u]["params"][n].abs()  # the weights the update saw (before this step)
            dropped = torch.zeros_like(keep).flatten()
            dropped[torch.topk(torch.where(keep, w, torch.inf).flatten(), k, largest=False).indices] = True
            survivors = keep & ~dropped.view_as(keep)
            assert bool((after[n] | ~survivors).all())  # every surviving weight is still active
            if grow == "gradient":  # grown = the k largest |dense gradient| outside the survivors
                g = probe.grads[u][n].abs()
                grown = torch.zeros_like(keep).flatten()
                grown[torch.topk(torch.where(survivors, -1.0, g).flatten(), k).indices] = True
                assert torch.equal(after[n], survivors | grown.view_as(keep))
            new = after[n] & ~keep
            moved += int(new.sum())
            assert bool((probe.before_step[u][n][new] == 0).all())  # grown weights start at zero
            assert bool((probe.momentum[u][n][new] == 0).all())     # with no momentum
    assert moved > 0 and policy.grown_entries() == moved  # results.json's grown_per_active counts these


def test_set_growth_depends_on_the_seed():
    sched = partial(CosineDecay, init=0.3, every=5, end=0.75)
    _, a = fit(DropGrow(grow="random", schedule=sched(), seed=0))
    _, b = fit(DropGrow(grow="random", schedule=sched(), seed=1))
    _, c = fit(DropGrow(grow="random", schedule=sched(), seed=0))
    same = all(torch.equal(a.start[6]["masks"][n], c.start[6]["masks"][n]) for n in a.start[6]["masks"])
    differ = any(not torch.equal(a.start[6]["masks"][n], b.start[6]["masks"][n]) for n in a.start[6]["masks"])
    assert same and differ


# -- IEE -----------------------------------------------------------------------------------------------
# H = J = Q = 3 over 34 steps, stop 0.75: cycles of 9 steps, 2 of them (25 // 9):
#   estimate 0-2, prune @3, improve 3-5, explore 6-8, grow @9; prune @12, explore 15-17, grow @18
PRUNE, EXPLORE, GROW = (3, 12), ((6, 7, 8), (15, 16, 17)), (9, 18)


def iee(**kw):
    return IEE(**{"estimate_steps": 3, "improve_steps": 3, "explore_steps": 3, **kw})


def test_iee_timeline():
    p = iee()
    assert [p.phase(t, STEPS) for t in range(19)] == (["estimate"] * 3 + ["improve"] * 3 + ["explore"] * 3) * 2 + \
        ["train"]
    assert p.n_cycles(STEPS) == 2 and p.phase(33, STEPS) == "train"
    no_improve = iee(improve=False)  # the J steps join estimate: prune and explore both at step 6
    assert [no_improve.phase(t, STEPS) for t in range(9)] == ["estimate"] * 6 + ["explore"] * 3
    no_explore = iee(explore=False)  # the Q steps train the active part
    assert [no_explore.phase(t, STEPS) for t in range(9)] == ["estimate"] * 3 + ["improve"] * 6
    with pytest.raises(PruneLabError, match="450 steps.*34 steps"):
        iee(estimate_steps=150, improve_steps=150, explore_steps=150).check_schedule(STEPS)
    with pytest.raises(PruneLabError, match="method.cycles=10 .* 34 steps"):
        IEE().before_forward(0, STEPS, [])  # 10 cycles of 3 steps need 30 steps before 0.75 · 34


def test_iee_cycle_lengths_follow_the_run():
    # `cycles` split the first `stop` of training into equal thirds, whatever the run length
    for total, (h, j, q) in ((34, (4, 4, 4)), (255, (33, 31, 31)), (10_000, (1250, 1250, 1250))):
        p = IEE(cycles=2)
        assert (p.n_cycles(total), (p.h, p.j, p.q)) == (2, (h, j, q))
        assert [p.phase(t, total) for t in (0, h, h + j, h + j + q, 2 * (h + j + q))] == \
            ["estimate", "improve", "explore", "estimate", "train"]
    quick = IEE()  # the default, on the quick start's 255 steps: 10 cycles of 19
    assert quick.n_cycles(255) == 10 and (quick.h, quick.j, quick.q) == (7, 6, 6)
    no_improve = IEE(improve=False)
    assert no_improve.n_cycles(255) == 10 and (no_improve.h, no_improve.j, no_improve.q) == (13, 0, 6)
    # fractions of training: 0.02 · 1000 = 20 steps each, as many cycles as fit before 750
    frac = IEE(estimate_steps=0.02, improve_steps=0.02, explore_steps=0.02)
    assert frac.n_cycles(1000) == 12 and (frac.h, frac.j, frac.q) == (20, 20, 20)


def frozen_masks(policy, keep):
    """True where a parameter entry is not in the exploration space (Θ_K and unmasked parameters)."""
    return policy.units.param_masks(keep)


def assert_explore_freezes_active(policy, probe):
    for steps in EXPLORE:
        for t in steps:
            frozen = frozen_masks(policy, probe.start[t]["keep"])
            changed = 0
            for n, before in probe.start[t]["params"].items():
                after = probe.end[t][n]
                f = frozen.get(n, torch.ones_like(before, dtype=torch.bool))
                assert torch.equal(after[f], before[f]), (t, n)  # bit-identical
                # and so is their momentum: weight decay and momentum must not move them later
                assert torch.equal(probe.momentum[t + 1][n][f], probe.momentum[t][n][f]), (t, n)
                changed += int((after[~f] != before[~f]).sum())
            assert changed > 0  # the exploration space does train


def test_iee_budget_is_exact_after_every_grow_and_prune_takes_omega():
    policy = iee()
    _, probe = fit(policy)
    initial = counts(probe.start[0]["masks"])
    sparse = [n for n, m in probe.start[0]["masks"].items() if not bool(m.all())]
    for g in GROW + (STEPS - 1,):
        assert counts(probe.start[g]["masks"]) == initial  # per layer, hence global: exactly the budget
    for p in PRUNE:
        omega = policy.omega.fraction(p, STEPS)
        after = counts(probe.start[p]["masks"])
        for n in initial:
            expected = initial[n] - min(round(omega * initial[n]), initial[n] - 1) if n in sparse else initial[n]
            assert after[n] == expected
    for t in sum(EXPLORE, ()):  # explore: everything unmasked, Θ_K kept by the policy
        assert all(bool(m.all()) for m in probe.start[t]["masks"].values())
    final = probe.start[STEPS - 1]["masks"]
    assert any(not torch.equal(final[n], probe.start[0]["masks"][n]) for n in sparse)  # units did move


@pytest.mark.parametrize("keep_start_values,grow_values,mru", [
    (False, "last_active", "last_active"), (True, "last_active", "last_active"),
    (False, "explored", "last_active"), (False, "explored", "explored")])
def test_iee_explores_from_last_active_values_and_grows_with_the_chosen_ones(keep_start_values, grow_values, mru):
    policy = iee(keep_start_values=keep_start_values, grow_values=grow_values, mru=mru)
    _, probe = fit(policy)
    assert_explore_freezes_active(policy, probe)
    start = {n: probe.initial[n] if keep_start_values else torch.zeros_like(v) for n, v in probe.initial.items()}
    # explore start, cycle 0: pruned units at their values when pruned (end of step 2), the
    # never-active ones at zero (or at their values at fit start with keep_start_values)
    before_prune, after_prune = probe.start[2]["masks"], probe.start[3]["masks"]
    e = EXPLORE[0][0]
    for n, keep in probe.start[e]["keep"].items():
        pruned = before_prune[n] & ~after_prune[n]
        expected = torch.where(pruned, probe.end[2][n], start[n])
        assert bool((expected[~keep & ~pruned] != 0).any()) == keep_start_values
        assert torch.equal(probe.start[e]["params"][n][~keep], expected[~keep])
    # explore start, cycle 1: pruned at 12 -> values at end of step 11; the others at the values
    # they had when last active (pruned at 3: end of step 2; never active: start values), not
    # at what exploration 0 made of them, unless mru=explored (the first implementation)
    e, p = EXPLORE[1][0], PRUNE[1]
    for n, keep in probe.start[e]["keep"].items():
        pruned = probe.start[p - 1]["keep"][n] & ~probe.start[p]["keep"][n]
        pruned_before = probe.start[2]["masks"][n] & ~probe.start[3]["masks"][n]
        if mru == "explored":
            others = probe.end[GROW[0] - 1][n]
        else:
            others = torch.where(pruned_before, probe.end[2][n], start[n])
        expected = torch.where(pruned, probe.end[p - 1][n], others)
        assert torch.equal(probe.start[e]["params"][n][~keep], expected[~keep])
    # grow: grown units carry their explored values or their last-active ones (what exploration
    # started from); the rest are masked again; MRU values change only with mru=explored
    for c, g in enumerate(GROW):
        e = EXPLORE[c][0]
        for n, keep in probe.start[g]["keep"].items():
            explored = ~probe.start[g - 1]["keep"][n]
            grown = keep & explored
            assert grown.any()
            source = probe.end[g - 1][n] if grow_values == "explored" else probe.start[e]["params"][n]
            assert torch.equal(probe.start[g]["params"][n][grown], source[grown])
            assert not torch.equal(probe.end[g - 1][n][grown], probe.start[e]["params"][n][grown])  # they differ
            assert bool((probe.start[g]["params"][n][explored & ~keep] == 0).all())
            mru_now = probe.end[g - 1][n] if mru == "explored" else probe.start[e]["params"][n]
            assert torch.equal(probe.start[g]["mru"][n][explored], mru_now[explored])
            assert bool((probe.before_step[g][n][explored] == probe.start[g]["params"][n][explored]).all())
            assert bool((probe.momentum[g][n][explored] == 0).all())  # fresh optimizer state


def test_iee_grow_init_zero_explores_from_zero():
    policy = iee(grow_init="zero")
    _, probe = fit(policy)
    for c, g in enumerate(GROW):
        e = EXPLORE[c][0]
        for n, keep in probe.start[e]["keep"].items():
            assert bool((probe.start[e]["params"][n][~keep] == 0).all())  # the exploration space starts at zero
            grown = probe.start[g]["keep"][n] & ~keep
            assert grown.any() and bool((probe.start[g]["params"][n][grown] == 0).all())  # last active: zero


class Snapshots(L.Callback):
    """BN statistics at every batch start; parameters and BN statistics seen by validation."""

    def __init__(self, policy):
        self.policy, self.bn, self.val = policy, {}, {}

    @staticmethod
    def _bn(pl_module):
        return {k: v.clone() for k, v in pl_module.model.state_dict().items() if "running" in k}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.bn[trainer.global_step] = self._bn(pl_module)

    def on_validation_start(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        phase = self.policy.phase(trainer.global_step - 1, STEPS)
        self.val[trainer.global_step] = {"bn": self._bn(pl_module), "phase": phase, "params": params}


def test_iee_exploration_leaves_bn_statistics_and_validation_scores_the_masked_network():
    policy = iee()
    snaps = Snapshots(policy)
    _, probe = fit(policy, extra=[snaps], val_batches=2)
    for c, g in enumerate(GROW):
        e = EXPLORE[c][0]
        assert any(not torch.equal(snaps.bn[e + 1][k], snaps.bn[e][k]) for k in snaps.bn[e])  # exploring moves them
        assert all(torch.equal(snaps.bn[g][k], snaps.bn[e][k]) for k in snaps.bn[e])  # the grow puts them back
    # epoch 1 ends after step 16, inside the second exploration (steps 15-17)
    val = snaps.val[17]
    assert val["phase"] == "explore" and 16 in EXPLORE[1]
    assert all(torch.equal(val["bn"][k], snaps.bn[EXPLORE[1][0]][k]) for k in val["bn"])
    keep = probe.start[16]["keep"]
    for n, k in keep.items():
        assert bool((val["params"][n][~k] == 0).all())              # Θ_P masked for validation
        assert torch.equal(val["params"][n][k], probe.end[16][n][k])  # Θ_K as trained
        assert torch.equal(probe.start[17]["params"][n], probe.end[16][n])  # exploration resumes intact
        assert bool((probe.start[17]["params"][n][~k] != 0).any())


@pytest.mark.parametrize("seed", [0, 1])
def test_iee_growing_does_not_raise_the_training_loss(seed):
    """The property IEE rests on, for the default (last-active values): inserting the grown units
    does not raise the loss compared with inserting the same units at zero, averaged over the
    training set and the run's grows (within 1e-3 of a loss of ~2.2: early in training the
    last-active values are small). Explored values fail it at 98 % sparsity: see
    scripts/probes/iee_grow_probe.py and the README's DST section."""
    dm = DigitsDataModule(image_size=8, batch_size=64, seed=seed)
    dm.setup("fit")
    batches = list(torch.utils.data.DataLoader(dm.train_set, batch_size=512))
    policy = iee()
    meter = GrowLoss(policy, batches)
    fit(policy, seed=seed, extra=[meter])
    assert [r[0] for r in meter.rows] == list(GROW)
    with_values = sum(r[1] for r in meter.rows) / len(meter.rows)
    at_zero = sum(r[2] for r in meter.rows) / len(meter.rows)
    assert with_values <= at_zero + 1e-3, meter.rows


def test_iee_without_explore_grows_by_dense_gradient_with_mru_values_and_never_freezes():
    policy = iee(explore=False)
    _, probe = fit(policy)
    g, p = GROW[0], PRUNE[0]
    for n, keep in probe.start[g]["keep"].items():
        before = probe.start[g - 1]["keep"][n]
        grown = keep & ~before
        # Θ_P ranked by |∂L/∂w| summed over the Q steps (6, 7, 8) in which Θ_K trained
        signal = sum(probe.grads[t][n].abs() for t in EXPLORE[0])
        expected = torch.zeros_like(before).flatten()
        expected[torch.topk(torch.where(before, -1.0, signal).flatten(), int(grown.sum())).indices] = True
        assert torch.equal(grown, expected.view_as(grown))
        pruned = probe.start[p - 1]["masks"][n] & ~probe.start[p]["masks"][n]
        mru = torch.where(pruned, probe.end[p - 1][n], 0.0)  # never unmasked in between
        assert grown.any() and torch.equal(probe.start[g]["params"][n][grown], mru[grown])
        assert bool((probe.start[g]["params"][n][pruned & grown] != 0).all())  # regrown with their old values
    for t in sum(EXPLORE, ()):
        assert not all(bool(m.all()) for m in probe.start[t]["masks"].values())  # nothing unmasked
        keep = probe.start[t]["keep"]
        assert any(not torch.equal(probe.end[t][n][k], probe.start[t]["params"][n][k]) for n, k in keep.items())


def test_iee_without_freeze_trains_active_during_explore():
    policy = iee(freeze_active=False)
    _, probe = fit(policy)
    t = EXPLORE[0][1]
    keep = probe.start[t]["keep"]
    assert any(not torch.equal(probe.end[t][n][k], probe.start[t]["params"][n][k]) for n, k in keep.items())


def test_iee_channels_keep_group_counts_and_flops_and_freeze_active():
    policy = iee(target="flops")  # Taylor (BN) criterion by default
    module, probe = fit(policy, target="flops", budget=0.5)
    plan0 = probe.start[0]["plan"]
    assert plan0 and policy.criterion == "taylor"
    groups = ChannelGroups(module.model, module.example_input, ignored=[module.classifier])
    flops = FlopsModel(groups, module.example_input)
    macs0 = flops.macs(plan0)
    assert abs(1 - macs0 / flops.macs() - 0.5) <= 0.02
    for g in GROW + (STEPS - 1,):
        plan = probe.start[g]["plan"]
        assert {r: int(k.sum()) for r, k in plan.items()} == {r: int(k.sum()) for r, k in plan0.items()}
        assert flops.macs(plan) == macs0
    final = probe.start[STEPS - 1]
    implied = groups.param_masks(final["plan"])  # the masks are exactly what the plan implies
    for n, m in implied.items():
        if n in final["masks"]:
            assert torch.equal(final["masks"][n], m)
    assert any(not torch.equal(final["plan"][r], plan0[r]) for r in plan0)  # channels did move
    assert_explore_freezes_active(policy, probe)


def test_iee_turnover_record_recounts_each_grow_from_the_masks():
    """`train.turnover`: each grow's units split into those pruned in the same cycle, pruned in an
    earlier cycle and never active, recounted here from the probe's masks."""
    policy = iee()
    _, probe = fit(policy)
    rows = policy.report()["turnover"]["per_grow"]
    assert [r["cycle"] for r in rows] == [0, 1]
    layers = probe.start[PRUNE[0]]["keep"].keys()
    ever = {n: probe.start[1]["masks"][n].clone() for n in layers}  # the initial mask (made at step 0)
    for row, p, g in zip(rows, PRUNE, GROW):
        before_prune = {n: probe.start[p - 1]["masks"][n] for n in layers}  # no exploration is open then
        after_prune, after_grow = probe.start[p]["keep"], probe.start[g]["keep"]
        grown = {n: after_grow[n] & ~after_prune[n] for n in layers}
        returning = sum(int((grown[n] & before_prune[n] & ~after_prune[n]).sum()) for n in layers)
        never = sum(int((grown[n] & ~ever[n]).sum()) for n in layers)
        assert row["grown"] == sum(int(x.sum()) for x in grown.values()) > 0
        assert (row["returning"], row["never_active"]) == (returning, never)
        assert row["returning"] + row["earlier"] + row["never_active"] == row["grown"]
        ever = {n: ever[n] | after_grow[n] for n in layers}
    assert rows[0]["earlier"] == 0  # nothing was pruned before the first cycle


def test_grow_loss_record_draws_its_batches_without_changing_the_run():
    """The grow-loss record every IEE run keeps (results.json train.grow_loss) draws its training
    batches itself; the run is bit-identical to one without it."""
    a, _ = fit(iee())
    meter = GrowLoss(n_batches=2, batch_size=128, seed=0)
    b, _ = fit(iee(), extra=[meter])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    report = meter.report()["train"]["grow_loss"]
    assert [r["step"] for r in report["per_grow"]] == list(GROW) and len(meter.batches) == 2
    assert report["mean_increase_vs_zero"] == pytest.approx(
        sum(r["loss"] - r["loss_at_zero"] for r in report["per_grow"]) / len(GROW))


def test_iee_phase_steps_is_h_j_q_and_the_cycles_follow_the_schedule():
    """`method.phase_steps` (the paper's H = J = Q): cycles are as many as fit before `stop`."""
    assert [IEE(phase_steps=3).phase(t, STEPS) for t in range(19)] == [iee().phase(t, STEPS) for t in range(19)]
    paper = IEE(phase_steps=150)
    assert paper.n_cycles(100_000) == 75_000 // 450 and (paper.h, paper.j, paper.q) == (150, 150, 150)
    assert IEE(phase_steps=50).n_cycles(100_000) == 75_000 // 150  # the paper's sensitivity: 50 / 150 / 300
    with pytest.raises(PruneLabError, match="phase_steps .* or the three phase lengths, not both"):
        IEE(phase_steps=50, estimate_steps=50, improve_steps=50, explore_steps=50)
    with pytest.raises(PruneLabError, match="phase_steps=0 must be an integer >= 1"):
        IEE(phase_steps=0)


def test_iee_never_active_values_reading_and_bad_values():
    assert IEE(never_active_values="start").keep_start_values and not IEE(never_active_values="zero").keep_start_values
    assert IEE().keep_start_values is False and IEE(keep_start_values=True).keep_start_values  # null: as configured
    with pytest.raises(PruneLabError, match="never_active_values='mru' is not one of: zero, start"):
        IEE(never_active_values="mru")
    with pytest.raises(PruneLabError, match="ranking=global .* needs target=params and no N:M pattern"):
        IEE(ranking="global", pattern="2:4")


def test_iee_global_ranking_prunes_the_globally_smallest_and_keeps_the_total_count():
    """ranking=global: Ω_t of all active weights go, the smallest |w| of the whole network (so the
    layer-wise split may drift from ERK), and as many come back at the grow: the budget stays exact."""
    policy = iee(ranking="global")
    _, probe = fit(policy)
    initial = counts(probe.start[0]["masks"])
    sparse = [n for n, m in probe.start[0]["masks"].items() if not bool(m.all())]
    total = sum(initial[n] for n in sparse)
    for g in GROW + (STEPS - 1,):
        assert sum(counts(probe.start[g]["masks"])[n] for n in sparse) == total
    for p in PRUNE:
        before, after = probe.start[p - 1]["keep"] or {n: probe.start[0]["masks"][n] for n in sparse}, \
            probe.start[p]["keep"]
        weights = probe.end[p - 1]
        removed = torch.cat([weights[n][before[n] & ~after[n]].abs() for n in sparse])
        kept = torch.cat([weights[n][after[n]].abs() for n in sparse])
        omega = policy.omega.fraction(p, STEPS)
        assert abs(removed.numel() - round(omega * total)) <= len(sparse)  # a layer keeps its last unit
        assert float(removed.max()) <= float(kept.min())
