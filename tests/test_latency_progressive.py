"""A progressive latency plan (method.prune_steps > 1, HALP's schedule): the Stepwise schedule,
earlier steps' channels kept removed by the greedy, the saliency read from the training steps in
between, its state carried by checkpoints, and a real run's record."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity import OneShot, Stepwise
from prune_lab.sparsity.importance import Magnitude
from prune_lab.sparsity.latency import LatencyTable
from prune_lab.sparsity.latency_allocation import solve_latency_target

sys.path.insert(0, str(Path(__file__).parent))
from test_latency import fake_timing, model_and_groups  # noqa: E402,F401  (the fixture is used by name)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stepwise_slices_the_budget_and_one_step_is_the_one_shot_prune():
    one, shot = Stepwise(steps=1, every=40), OneShot()
    for step in range(200):
        assert one.is_update(step, 200) == shot.is_update(step, 200)
        assert one.fraction(step, 200) == shot.fraction(step, 200)
    four = Stepwise(steps=4, every=10)
    updates = [(s, four.fraction(s, 100)) for s in range(100) if four.is_update(s, 100)]
    assert updates == [(0, 0.25), (10, 0.5), (20, 0.75), (30, 1.0)]
    assert four.fraction(95, 100) == 1.0
    four.check(31)
    with pytest.raises(PruneLabError, match=r"last of 4 prune steps every 10 optimizer steps \(step 30\) falls "
                                            r"outside this run's 30 steps"):
        four.check(30)


def test_earlier_steps_channels_stay_removed_whatever_the_new_values(fake_timing, tmp_path):
    """`start`: each group first loses the channels an earlier step removed (scored lowest), even
    when the new saliency would keep them and even at a lower target."""
    _, x, groups = model_and_groups()
    table = LatencyTable(groups, x, batch_size=4, points=4, cache_dir=tmp_path)
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    g = torch.Generator().manual_seed(0)
    first, _ = solve_latency_target(groups, table, scores, 0.4, "halp", round_to=4,
                                    values=[torch.rand(s, generator=g) for s in groups.sizes], min_keep=0.25)
    gone = [~first[r] for r in groups.roots]
    later_scores = [torch.where(d, torch.full_like(s, -1.0), s) for d, s in zip(gone, scores)]
    start = [int(d.sum()) for d in gone]
    flipped = [torch.where(d, torch.full((len(d),), 10.0), torch.zeros(len(d))) for d in gone]  # now worth most
    for target in (0.2, 0.4, 0.6):
        plan, predicted = solve_latency_target(groups, table, later_scores, target, "halp", round_to=4,
                                               values=flipped, min_keep=0.25, start=start)
        assert predicted >= target
        for r, d in zip(groups.roots, gone):
            assert not bool((plan[r] & d).any()), (target, r)  # nothing regrows
    # without `start` the flipped values bring the removed channels back
    plan, _ = solve_latency_target(groups, table, scores, 0.4, "halp", round_to=4, values=flipped, min_keep=0.25)
    assert any(bool((plan[r] & d).any()) for r, d in zip(groups.roots, gone))


def test_saliency_accumulates_between_steps_and_travels_in_the_checkpoint_state():
    from prune_lab.callbacks import MaskUpdate

    model, x, _ = model_and_groups()
    cb = MaskUpdate(budget=0.3, target="latency", latency={}, schedule=Stepwise(steps=3, every=5))
    assert cb.accumulates_saliency
    want = {}
    for seed in range(2):
        torch.manual_seed(seed)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(torch.randn(4, *x.shape[1:])), torch.tensor([0, 1, 2, 3])).backward()
        cb._add_saliency(model)
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                s = (m.weight * m.weight.grad + m.bias * m.bias.grad).detach() ** 2
                want[n] = want.get(n, 0) + s
    assert set(cb.saliency) == set(want) and all(torch.allclose(cb.saliency[n], want[n]) for n in want)
    again = MaskUpdate(budget=0.3, target="latency", latency={}, schedule=Stepwise(steps=3, every=5))
    again.load_state_dict(cb.state_dict())
    assert all(torch.equal(again.saliency[n], cb.saliency[n]) for n in want)
    assert not MaskUpdate(budget=0.3, target="latency", latency={}).accumulates_saliency  # one-shot: extra passes
    with pytest.raises(PruneLabError, match="method.depth=true needs a one-shot plan"):
        MaskUpdate(budget=0.3, target="latency", latency={}, depth=True, schedule=Stepwise(steps=2, every=5))


def test_progressive_latency_run_records_its_steps_and_never_regrows(tmp_path, dense_dir, monkeypatch):
    """A real l1_filter run in 3 steps: the earlier steps are solved on the table (a third and two
    thirds of the budget), the last one measured; kept counts never grow; later steps read the
    saliency of the training steps since the previous one (no extra pass over the data), and nothing
    is accumulated after the last prune step."""
    import json

    from prune_lab.callbacks.latency_plan import LatencyPlanning
    from test_pipeline import run_fast

    added = []
    original = LatencyPlanning._add_saliency
    monkeypatch.setattr(LatencyPlanning, "_add_saliency", lambda self, model: (added.append(1), original(self, model)))
    res, out = run_fast(tmp_path, dense_dir, "method=l1_filter", "method.target=latency", "budget=0.1",
                        "method.prune_steps=3", "method.prune_every=4", f"latency.table_cache={tmp_path / 'tables'}")
    plan = res["latency_plan"]
    assert plan["steps"] == 3 and plan["monotone"] is True
    steps = plan["earlier_steps"]
    assert [s["budget"] for s in steps] == pytest.approx([0.1 / 3, 0.2 / 3])
    kept = [s["kept"] for s in steps] + [{r: len(k) for r, k in json.loads((out / "model.json").read_text())
                                          ["channel_plan"].items()}]
    assert all(kept[i + 1][r] <= kept[i][r] for i in range(2) for r in kept[0])
    assert len(added) == 8  # each optimizer step before the last prune step (step 8) adds its saliency, none after
    assert plan["rounds"][0]["asked"] == 0.1 and plan["measured_reduction"] is not None


def test_latency_rank_taylor_removes_the_lowest_taylor_channels(fake_timing, tmp_path, monkeypatch):
    """latency_rank=taylor: within a group the channels with the smallest Taylor values go (HALP
    ranks the neurons it packs by the same saliency); the default keeps the method's L1 order."""
    from types import SimpleNamespace

    from prune_lab.callbacks import MaskUpdate
    from prune_lab.models import classifier_of
    from prune_lab.sparsity import ChannelGroups, MaskSet
    from prune_lab.sparsity import latency as latency_mod

    monkeypatch.setattr(latency_mod, "served_ms", lambda models, x, lat: {k: 1.0 for k in models})
    monkeypatch.setattr(latency_mod, "measured_reduction",
                        lambda model, plan, x, lat, skip=(): {"dense_ms": 1.0, "pruned_ms": 0.6, "reduction": 0.4})
    model, x, groups = model_and_groups()
    g = torch.Generator().manual_seed(3)
    taylor = [torch.rand(s, generator=g) for s in groups.sizes]
    monkeypatch.setattr(MaskUpdate, "_taylor_values", lambda self, m, gr: [t.clone() for t in taylor])
    scores = groups.scores(Magnitude(p=1).channel_scorer())
    plans = {}
    for rank in ("criterion", "taylor"):
        module = SimpleNamespace(model=model, classifier=classifier_of(model)[1], example_input=x,
                                 device=torch.device("cpu"), masks=MaskSet(model),
                                 _trainer=SimpleNamespace(default_root_dir=str(tmp_path / rank), is_global_zero=True))
        cb = MaskUpdate(budget=0.4, target="latency", latency_rank=rank,
                        latency=dict(batch_size=4, table_points=4, table_cache=str(tmp_path / "t")))
        plans[rank] = cb._latency_plan(module, groups, scores, 0.4)
    cut = 0
    for root, t, s in zip(groups.roots, taylor, scores):
        for rank, order in (("taylor", t), ("criterion", s)):
            keep = plans[rank][root]
            if 0 < int(keep.sum()) < keep.numel():
                assert order[keep].min() >= order[~keep].max(), (rank, root)
                cut += rank == "taylor"
    assert cut > 0
    with pytest.raises(PruneLabError, match="latency_rank=taylor ranks channels by the Taylor values"):
        MaskUpdate(budget=0.4, target="latency", latency_rank="taylor", latency_importance="criterion", latency={})


def test_method_halp_is_the_progressive_taylor_ranked_latency_plan(tmp_path, dense_dir):
    """`method=halp` composes l1_filter's pipeline with HALP's choices (latency target, 10 slices
    every 40 steps, Taylor values as knapsack value and as ranking); a run too short for its
    schedule is refused before anything trains, naming the knobs."""
    from hydra.utils import instantiate

    from conftest import FAST, compose_cfg
    from prune_lab.pipeline import run

    cfg = compose_cfg(["experiment=fashion_mnist", "method=halp", "budget=0.5"], tmp_path / "a", dense_dir)
    cb = instantiate(cfg.method.callbacks.prune)
    assert (cfg.method.name, cb.target, cb.allocation, cb.latency_importance, cb.latency_rank) == \
        ("halp", "latency", "halp", "taylor", "taylor")
    assert cb.schedule == Stepwise(steps=10, every=40)
    cfg = compose_cfg([*FAST, "method=halp", "budget=0.3"], tmp_path / "b", dense_dir)
    with pytest.raises(PruneLabError, match=r"last of 10 prune steps every 40 optimizer steps .* method.prune_steps"):
        run(cfg)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
