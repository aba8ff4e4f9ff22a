"""UniPTS (METHODS.md §2) and its post-training baselines: decoding, objective, fitness, DST,
calibration data, and end-to-end runs through the real config."""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import FAST, compose_cfg
from prune_lab.callbacks import DynamicSparsity
from prune_lab.callbacks.distillation import BaseDecayedKL, MatchedPlainKL, PlainKL
from prune_lab.callbacks.search import AllocationFitness
from prune_lab.data import DigitsDataModule
from prune_lab.errors import PruneLabError
from prune_lab.methods.unipts import ReducingRegrowingGA, decode_genome
from prune_lab.models import create_model
from prune_lab.module import PruneLabModule
from prune_lab.pipeline import run
from prune_lab.sparsity import calibration_batches, exact_counts, prunable_weights
from test_pipeline import run_fast, zero_fraction

TINY_GA = ["method.population=4", "method.generations=2", "method.parents=2", "method.search_samples=256"]


def resnet8():
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_channels=1)


def numels(model) -> dict[str, int]:
    return {n: w.numel() for n, w in prunable_weights(model).items()}


# -- decoding ------------------------------------------------------------------------------------
def test_decoding_gives_the_exact_global_sparsity_for_any_genome():
    numel = {**numels(resnet8()), "tiny.weight": 9}
    total = sum(numel.values())
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        budget = [0.5, 0.8, 0.9, 0.95, 0.97, 0.3][trial % 6]
        scale = [0.1, 1.0, 5.0, 50.0][trial % 4]  # large scales concentrate the regrowth: capping kicks in
        genome = scale * torch.randn(len(numel), generator=g, dtype=torch.float64)
        pruned = decode_genome(genome, numel, budget)
        assert sum(pruned.values()) == round(budget * total)
        assert all(0 <= pruned[n] <= numel[n] for n in numel)


def test_decoding_follows_the_reduce_then_regrow_formula():
    numel = numels(resnet8())
    # shares near numel_l/N keep every layer above 0, so no regrowth is handed on
    genome = torch.tensor([float(v) for v in numel.values()], dtype=torch.float64).log()
    genome += torch.linspace(-0.5, 0.5, len(numel), dtype=torch.float64)
    share = torch.softmax(genome, 0)
    regrown = 0.05 * sum(numel.values())
    pruned = decode_genome(genome, numel, 0.9)
    for i, (n, size) in enumerate(numel.items()):
        expected = 0.95 - regrown * float(share[i]) / size
        assert expected > 0
        assert abs(pruned[n] / size - expected) <= 1.0 / size + 1e-12


# -- the objective -------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_cls,progress", [(BaseDecayedKL, 0.0), (BaseDecayedKL, 0.37), (PlainKL, 0.5)])
def test_objective_gradient_is_scaled_soft_target_cross_entropy(loss_cls, progress):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(16, 10, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 3 * torch.randn(16, 10, generator=g, dtype=torch.float64)
    loss = loss_cls(temperature=4.0)
    loss(student, teacher, progress).backward()
    tau = 8 * 0.99 ** (100 * progress) if loss_cls is BaseDecayedKL else 1.0
    expected = (16 / tau) * (torch.softmax(student.detach(), 1) - torch.softmax(teacher / 4, 1)) / 16
    torch.testing.assert_close(student.grad, expected)
    assert loss_cls(temperature=4.0).tau(0.0) == (8.0 if loss_cls is BaseDecayedKL else 1.0)
    if loss_cls is BaseDecayedKL:  # weight T²/τ grows from 2 to 5.4 over the paper's 100 epochs
        assert 16 / loss.tau(0.0) == pytest.approx(2.0) and 16 / loss.tau(0.99) == pytest.approx(5.41, abs=0.01)


def test_plain_kd_at_matched_step_has_the_base_decayed_average_gradient_weight():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(8, 10, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(8, 10, generator=g, dtype=torch.float64)
    base, plain, matched = BaseDecayedKL(), PlainKL(), MatchedPlainKL()

    def grad(loss, progress):
        s = student.clone().requires_grad_(True)
        loss(s, teacher, progress).backward()
        return s.grad

    # plain KD weighted by 1/τ_e at every epoch has exactly the base-decayed gradient: matching per
    # epoch would make the ablation compare the method with itself, hence the average
    for p in (0.0, 0.3, 0.9):
        torch.testing.assert_close(grad(base, p), grad(plain, p) / base.tau(p))
    weight = 16 / matched.tau(0.0)
    mean_base = sum(16 / base.tau((i + 0.5) / 10000) for i in range(10000)) / 10000
    assert weight == pytest.approx(mean_base, rel=1e-6) and weight == pytest.approx(3.45, abs=0.01)
    torch.testing.assert_close(grad(matched, 0.0), grad(matched, 0.8))  # constant over training
    torch.testing.assert_close(grad(matched, 0.5), grad(plain, 0.5) * weight / 16)


# -- fitness ---------------------------------------------------------------------------------------
def direct_fitness(model, pruned: dict[str, int], batches) -> float:
    """Independent re-computation: magnitude-prune each layer, re-estimate BN (plain average over
    the calibration batches, train mode), then top-1 in eval mode."""
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    with torch.no_grad():
        for n, k in pruned.items():
            w = params[n]
            if k:
                threshold_idx = w.abs().flatten().argsort(stable=True)[:k]
                w.view(-1)[threshold_idx] = 0
        for m in work.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        work.train()
        for x, _ in batches:
            work(x)
        work.eval()
        correct = sum(int((work(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def test_fitness_of_the_all_equal_genome_and_of_uniform_equal_direct_computation():
    model, batches = trained_digits_resnet8()
    numel = numels(model)
    fitness = AllocationFitness(model, list(numel), batches, noise_std=1e-6)
    all_equal = decode_genome(torch.ones(len(numel)), numel, 0.8)
    assert fitness(all_equal) == direct_fitness(model, all_equal, batches)
    uniform = exact_counts({n: 0.8 for n in numel}, numel, round(0.8 * sum(numel.values())))
    assert fitness(uniform) == direct_fitness(model, uniform, batches)
    # and the GA reports the same number for the all-equal genome it keeps every generation
    ga = ReducingRegrowingGA(population=3, generations=1, parents=2, seed=0)
    best, record = ga.search(numel, 0.8, fitness.many)
    assert record["all_equal_fitness"] == direct_fitness(model, all_equal, batches)
    assert record["best_fitness"] >= record["all_equal_fitness"]
    assert sum(best.values()) == round(0.8 * sum(numel.values()))


@functools.lru_cache(maxsize=1)
def trained_digits_resnet8():
    """A ResNet-8 with some skill on digits (accuracies not all at chance) and its calibration batches."""
    dm = DigitsDataModule(image_size=8, batch_size=128)
    dm.setup()
    model = resnet8()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in torch.utils.data.DataLoader(dm.train_set, batch_size=64, shuffle=False):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, calibration_batches(torch.utils.data.DataLoader(dm.train_set, batch_size=128))


@pytest.mark.parametrize("stack,channels_last", [(4, True), (3, False)])
def test_stacked_fitness_equals_one_by_one_for_random_genomes(stack, channels_last):
    """Candidates scored together (grouped convolutions, one BN re-estimation with the seeded
    1e-6 noise) get exactly the fitness each gets alone, incl. a last, smaller chunk."""
    model, batches = trained_digits_resnet8()
    numel = numels(model)
    g = torch.Generator().manual_seed(7)
    allocations = [decode_genome(torch.randn(len(numel), generator=g, dtype=torch.float64), numel, budget)
                   for budget in (0.5, 0.7, 0.8, 0.9, 0.6, 0.75)]
    kw = dict(noise_std=1e-6, seed=3, channels_last=channels_last)
    one = AllocationFitness(model, list(numel), batches, stack=1, **kw)
    together = AllocationFitness(model, list(numel), batches, stack=stack, eval_batch_size=512, **kw)
    singles = [one(a) for a in allocations]
    assert together.many(allocations) == singles
    assert len(set(singles)) > 2  # the genomes differ in fitness: equality is not trivially chance level
    # the BN statistics of a candidate inside the stack are its own: compare the last one re-estimated alone
    last = allocations[-1]
    one(last)
    alone = {n: b for n, b in one._network(1).named_buffers() if n.endswith("running_mean")}
    count = len(allocations) % stack or stack
    stacked = dict(together._network(count).named_buffers())
    for n, b in alone.items():
        torch.testing.assert_close(stacked[n].view(count, -1)[-1], b, rtol=1e-4, atol=1e-6)


def test_fitness_of_a_network_stacking_cannot_represent_falls_back_to_one_by_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    batches = [(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))) for _ in range(2)]
    numel = {"0.weight": 36, "5.weight": 12}
    allocations = [{"0.weight": k, "5.weight": 6} for k in (5, 20, 30)]
    fitness = AllocationFitness(model, list(numel), batches, stack=3)
    assert fitness.many(allocations) == [AllocationFitness(model, list(numel), batches)(a) for a in allocations]
    assert fitness.stack == 1


# -- dynamic sparse training ---------------------------------------------------------------------
def test_dst_straight_through_gradients_srste_decay_and_masks_follow_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    module = PruneLabModule(model, 3, torch.zeros(1, 6), optimizer=None)
    names = ["0.weight", "2.weight"]
    counts = {"0.weight": 20, "2.weight": 9}  # layer-wise sparsities as a search would leave them
    for n in names:
        w = dict(model.named_parameters())[n]
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[w.abs().flatten().argsort()[:counts[n]]] = False
        module.masks.set(n, keep.view_as(w))
    dst = DynamicSparsity(dynamic=True, decay=5e-5)
    dst.on_train_start(None, module)
    assert dst.pruned == counts
    params = dict(model.named_parameters())
    dense = {n: params[n].detach().clone() for n in names}
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    dst.on_train_batch_start(None, module, (x, y), 0)
    for n in names:  # forward sees W⊙M with M the top-|w| of each layer at the searched counts
        keep = module.masks[n]
        assert int((~keep).sum()) == counts[n]
        assert bool((dense[n].abs()[keep].min() >= dense[n].abs()[~keep].max()))
        torch.testing.assert_close(params[n].detach(), dense[n] * keep)
    F.cross_entropy(model(x), y).backward()
    # independent STE gradient: d loss / d (W⊙M), evaluated at the masked weights
    masked = {n: (dense[n] * module.masks[n]).requires_grad_(True) for n in names}
    out = torch.func.functional_call(model, {**{k: v.detach() for k, v in params.items()}, **masked}, (x,))
    ste = torch.autograd.grad(F.cross_entropy(out, y), [masked[n] for n in names])
    dst.on_before_optimizer_step(None, module, None)
    for n, g in zip(names, ste):
        keep = module.masks[n]
        torch.testing.assert_close(params[n].detach(), dense[n])  # dense weights are what the optimizer updates
        torch.testing.assert_close(params[n].grad, g + 5e-5 * dense[n] * ~keep)
        assert bool((params[n].grad[~keep] != 0).any())  # pruned weights do receive gradient

    with torch.no_grad():  # a pruned weight grows large: the next step's mask must keep it
        w = params["0.weight"]
        idx = int((~module.masks["0.weight"]).flatten().nonzero()[0])
        w.view(-1)[idx] = 10.0
    dst.on_train_batch_start(None, module, (x, y), 1)
    assert bool(module.masks["0.weight"].flatten()[idx])
    assert int((~module.masks["0.weight"]).sum()) == counts["0.weight"]
    dst.on_before_optimizer_step(None, module, None)
    dst.on_train_end(None, module)
    assert all(float((params[n] == 0).sum()) >= counts[n] for n in names)


# -- calibration data ----------------------------------------------------------------------------
def test_calibration_subset_size_and_determinism():
    def train_labels(**kw):
        dm = DigitsDataModule(image_size=8, batch_size=32, **kw)
        dm.setup()
        return dm, [int(dm.train_set[i][1]) for i in range(len(dm.train_set))]

    full, full_labels = train_labels()
    a, la = train_labels(calibration_size=300, seed=3)
    b, lb = train_labels(calibration_size=300, seed=3)
    c, lc = train_labels(calibration_size=300, seed=4)
    assert len(a.train_set) == 300 and a.train_set.indices == b.train_set.indices and la == lb
    assert a.train_set.indices != c.train_set.indices
    assert len(set(a.train_set.indices)) < 300  # drawn with replacement
    assert sum(len(y) for _, y in a.train_dataloader()) == 300
    big, _ = train_labels(calibration_size=10240)
    assert len(big.train_set) == len(full.train_set)  # smaller than the calibration size: the whole set
    assert len(a.val_set) == len(full.val_set) and len(a.test_set) == len(full.test_set)
    with pytest.raises(PruneLabError, match="calibration_size=0"):
        DigitsDataModule(calibration_size=0)


# -- end to end through the real config ------------------------------------------------------------
@pytest.mark.parametrize("method,overrides", [
    ("unipts", TINY_GA),
    ("unipts", [*TINY_GA, "method.search=false", "method.kd=plain_matched", "method.dst=false"]),
    ("oneshot_bnrecal", ["method.distribution=global"]),
    ("pot", ["method.steps=20", "method.samples=256", "method.distribution=global"]),
])
def test_post_training_methods_run_end_to_end(method, overrides, tmp_path, dense_dir):
    results, out = run_fast(tmp_path, dense_dir, f"method={method}", "budget=0.9", *overrides)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["method"] == method and on_disk["budget_met"] is True
    assert abs(zero_fraction(load_file(str(out / "model.safetensors"))) - 0.9) <= 0.005
    assert 0.0 <= results["pruned"]["top1"] <= 1.0
    if "method.distribution=global" in overrides:  # one global magnitude threshold: layers differ
        densities = [l["density"] for l in on_disk["layers"]]
        assert max(densities) - min(densities) > 0.05
    if method == "unipts":
        search = json.loads((out / "search.json").read_text())
        assert search["enabled"] == ("method.search=false" not in overrides)
        assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
        layers = {l["name"]: l for l in search["layers"]}
        dens = {l["name"] + ".weight": l["density"] for l in on_disk["layers"]}
        for n, l in layers.items():  # the trained model keeps the searched per-layer sparsity
            assert 1 - dens[n] == pytest.approx(l["sparsity"], abs=1.5 / l["numel"])
        if search["enabled"]:
            assert len(search["history"]) == 3 and search["evaluations"] >= 4
        # the searched and the uniform allocation, scored on the calibration set and on held-out validation
        for split in ("calibration", "validation"):
            assert set(search[split]) >= {"searched", "uniform"}
            assert all(0.0 <= search[split][k] <= 1.0 for k in ("searched", "uniform"))
        assert search["validation"]["samples"] > 0
        assert search["calibration"]["searched"] == search["best_fitness"]
        assert on_disk["search"]["validation"] == search["validation"]


def test_a_run_that_reuses_a_cached_search_equals_one_that_searched(tmp_path, dense_dir):
    """An ablation that changes only what follows the search (kd) reads the allocation another run
    searched; the run is bit-identical to the same ablation searching for itself."""
    cache = f"method.search_cache={tmp_path / 'cache'}"
    run_fast(tmp_path, dense_dir, "method=unipts", "budget=0.9", *TINY_GA, cache, name="first")
    run_fast(tmp_path, dense_dir, "method=unipts", "budget=0.9", *TINY_GA, cache, "method.kd=plain_matched",
             name="reused")
    run_fast(tmp_path, dense_dir, "method=unipts", "budget=0.9", *TINY_GA, "method.kd=plain_matched", name="own")
    first, reused, own = (json.loads((tmp_path / r / "search.json").read_text()) for r in ("first", "reused", "own"))
    assert first["cache"]["hit"] is False and reused["cache"] == {**first["cache"], "hit": True,
                                                                  "from": str(tmp_path / "first")}
    assert "cache" not in own
    assert reused["layers"] == own["layers"] and reused["history"] == own["history"]
    assert reused["calibration"] == own["calibration"] and reused["validation"] == own["validation"]
    wa, wb = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("reused", "own"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    a, b = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("reused", "own"))
    assert a["pruned"] == b["pruned"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_runs_that_need_the_same_search_at_once_search_it_once(tmp_path):
    """Two study jobs starting the same search together: one searches, the other waits and reads it."""
    import threading
    import time
    from types import SimpleNamespace

    from prune_lab.callbacks import LayerSparsitySearch

    calls = []

    class SlowSearcher:
        def hparams(self):
            return {"kind": "slow"}

        def search(self, numel, budget, evaluate):
            calls.append(threading.get_ident())
            time.sleep(0.5)
            return {n: k // 2 for n, k in numel.items()}, {"evaluations": 1}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))]
    numel = {"0.weight": 36, "4.weight": 192}
    results = []

    def one(name):
        search = LayerSparsitySearch(0.5, SlowSearcher(), cache_dir=str(tmp_path / "cache"))
        trainer = SimpleNamespace(world_size=1, default_root_dir=str(tmp_path / name))
        results.append(search._cached_search(trainer, model, numel, AllocationFitness(model, list(numel), batches),
                                             time.time()))

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1
    assert results[0][0] == results[1][0] == {"0.weight": 18, "4.weight": 96}
    assert sorted(r[1]["cache"]["hit"] for r in results) == [False, True]


def test_search_key_changes_with_weights_batches_and_settings():
    from prune_lab.callbacks.search import search_key

    model = resnet8()
    batches = [(torch.randn(4, 1, 8, 8), torch.arange(4))]
    key = search_key(model, batches, {"seed": 0})
    assert search_key(copy.deepcopy(model), [(x.clone(), y.clone()) for x, y in batches], {"seed": 0}) == key
    assert search_key(model, batches, {"seed": 1}) != key
    assert search_key(model, [(batches[0][0] + 1e-6, batches[0][1])], {"seed": 0}) != key
    changed = copy.deepcopy(model)
    next(b for n, b in changed.named_buffers() if n.endswith("running_var")).mul_(2)
    assert search_key(changed, batches, {"seed": 0}) != key


@pytest.mark.parametrize("override,message", [("method.kd=bogus", "kd"), ("method.dst=maybe", "dst"),
                                              ("data.calibration_size=-5", "calibration_size=-5")])
def test_bad_unipts_values_fail_before_training(override, message, tmp_path, dense_dir):
    out = tmp_path / "bad"
    with pytest.raises(PruneLabError, match=message):
        run(compose_cfg([*FAST, "method=unipts", override], out, dense_dir))
    assert not (out / "results.json").exists()


def test_warmup_cosine_schedule():
    from prune_lab.lr_schedules import warmup_cosine

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # warm-up given in epochs: the module supplies the run's epoch count (1 of 20 epochs = 5 of 100 steps)
    from functools import partial
    from prune_lab.module import make_scheduler

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(partial(warmup_cosine, warmup_epochs=1), opt, total_steps=100, epochs=20)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and lrs[5] == pytest.approx(1.0)


def test_a_resumed_search_keeps_its_record_for_results_json(tmp_path):
    """A run killed after its search and resumed from the checkpoint does not search again; its
    results.json["search"] must still hold the search's summary (it did not, before the record
    travelled in the checkpoint). Old checkpoints without it fall back to the run's search.json."""
    from types import SimpleNamespace

    from prune_lab.callbacks.search import LayerSparsitySearch

    searched = LayerSparsitySearch(budget=0.9, enabled=False)
    searched.done = True
    searched.record = {"enabled": True, "budget": 0.9, "evaluations": 12, "wall_s": 3.0,
                       "calibration": {"searched": 0.6, "uniform": 0.2},
                       "validation": {"searched": 0.5, "uniform": 0.2, "samples": 100}}
    state = torch.load(_roundtrip(searched.state_dict(), tmp_path), weights_only=True)
    resumed = LayerSparsitySearch(budget=0.9, enabled=False)
    resumed.load_state_dict(state)
    resumed.on_fit_start(SimpleNamespace(default_root_dir=str(tmp_path / "none")), None)  # no search
    assert resumed.report() == searched.report() and resumed.report()["search"]["calibration"]["searched"] == 0.6

    old = LayerSparsitySearch(budget=0.9, enabled=False)
    old.load_state_dict({"done": True, "wall_s": 3.0})  # a checkpoint from before
    (tmp_path / "search.json").write_text(json.dumps(searched.record))
    old.on_fit_start(SimpleNamespace(default_root_dir=str(tmp_path)), None)
    assert old.report() == searched.report()


def _roundtrip(state, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(state, path)  # checkpoints are loaded with weights_only=True: the record must survive that
    return path
