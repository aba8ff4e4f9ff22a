"""Does a hub classifier prune? One model through the steps a run takes, without Lightning.

`check_model` builds a torchvision or timm classifier, finds the smallest input size it accepts,
and runs the two reference methods as `train.py` runs them, on random data:

- `l1_filter` (budget 0.5 of FLOPs): the structured pre-check (`checks.check_structured`), L1
  filter scores, the FLOPs-target plan, its masks, two masked SGD steps, the deployed model
  (`export.deployable`); the deployed model must compute what the masked one does, be smaller,
  cost what the FLOPs model predicted (torch's counter) and meet the budget.
- `magnitude` (budget 0.9 of weights): the unstructured masks, two masked SGD steps; the
  sparsity of the prunable weights must be the budget.

A refusal (`PruneLabError`, one line, before any training) is a result like a pass; anything
else (a traceback, outputs that differ, a budget missed) is a failure. Used by the zoo tests and
`scripts/zoo.py`, which writes the table in docs/guides/model-zoo.md.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from prune_lab import checks
from prune_lab.errors import PruneLabError
from prune_lab.export import deployable
from prune_lab.models import classifier_of, create_model
from prune_lab.report import model_costs, pruned_costs
from prune_lab.sparsity import (ChannelGroups, FlopsModel, MaskSet, count_flops, count_params, masks_from_scores,
                                solve_flops_target)
from prune_lab.sparsity.importance import Magnitude

# timm: the common families, in the sizes a CPU runs in seconds (pretrained=False: no download)
TIMM_MODELS = ("resnet18", "resnet34", "resnet50", "resnext26ts", "resnext50_32x4d", "efficientnet_b0",
               "efficientnet_b1", "efficientnet_lite0", "mobilenetv3_small_100", "mobilenetv3_large_100",
               "convnext_atto", "convnext_nano", "convnext_tiny", "regnetx_002", "regnetx_004", "regnety_002",
               "regnety_004", "ghostnet_100", "ghostnetv2_100")
SIZES = (32, 64, 128, 224, 299)  # tried in order; the first a model runs on is the one it is checked at
FLOPS_BUDGET, PARAMS_BUDGET = 0.5, 0.9
FLOPS_TOL, PARAMS_TOL = 0.02, 0.005  # the pipeline's budget_met tolerances (pipeline.py)
CLASSES, BATCH, STEPS = 10, 4, 2


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def build(source: str, name: str):
    torch.manual_seed(0)
    return create_model(name, num_classes=CLASSES, source=source)


def input_size(model, name: str, sizes=SIZES) -> tuple[int, str]:
    """The smallest square input in `sizes` the model runs on, and why the smaller ones did not
    (the pipeline's one-line refusal, `checks.check_forward`, at the first size tried)."""
    first = None
    for px in sizes:
        try:
            checks.check_forward(SimpleNamespace(model=SimpleNamespace(name=name)), SimpleNamespace(name="synthetic"),
                                 model, torch.randn(1, 3, px, px))
            return px, "" if first is None else one_line(first)
        except PruneLabError as e:
            first = first or e
    raise first


def _train_steps(model, masks: MaskSet, px: int) -> None:
    """What fine-tuning does to a masked model, briefly: train-mode forward (auxiliary heads,
    batch-norm statistics), loss, masked gradients, step, masks enforced. Gradients are clipped:
    at 32 px a random-init network's last batch norms see 1x1 maps of a tiny batch, and
    unclipped steps blow the weights up (the check is about shapes and masks, not learning)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 3, px, px, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        masks.mask_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        masks.apply()
    model.eval()


def check_l1_filter(model, px: int, name: str = "model", budget: float = FLOPS_BUDGET) -> dict:
    x1 = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(2))
    cfg = SimpleNamespace(method=SimpleNamespace(target="flops", name="l1_filter"), model=SimpleNamespace(name=name),
                          budget=budget)
    checks.check_structured(cfg, model, x1)  # the run's refusals before training: no groups, budget out of reach
    groups = ChannelGroups(model, x1, ignored=[classifier_of(model)[1]])
    flops = FlopsModel(groups, x1)
    scores = groups.scores(Magnitude(p=1, group_reduction="first").channel_scorer())
    plan = solve_flops_target(groups, flops, scores, budget, "uniform", 1, FLOPS_TOL)
    masks = MaskSet(model)
    for n, keep in groups.param_masks(plan).items():
        masks.set(n, keep)
    masks.set_channel_plan(plan)
    masks.apply()
    _train_steps(model, masks, px)
    final = deployable(model, masks, x1)
    x = torch.randn(BATCH, 3, px, px, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked, deployed = model(x), final(x)
    diff = float((masked - deployed).abs().max())
    scale = float(masked.abs().max()) or 1.0
    # the run's own measure (results.json): the masked model at full size counts as the dense one
    reduction = pruned_costs(model, final, x1, model_costs(model, x1))["flops_reduction"]
    measured, predicted = count_flops(final, x1), flops.macs(plan)
    problems = []
    if not diff <= 1e-4 * max(scale, 1.0):
        problems.append(f"deployed outputs differ from the masked model's by {diff:.3g} (scale {scale:.3g})")
    if measured != predicted:
        problems.append(f"FLOPs model predicted {predicted} MACs, torch counts {measured}")
    if abs(reduction - budget) > FLOPS_TOL:
        problems.append(f"FLOPs reduction {reduction:.3f} misses budget {budget}")
    if count_params(final) >= count_params(model):
        problems.append("the deployed model is not smaller")
    return {"status": "fail" if problems else "ok", "reason": "; ".join(problems), "groups": len(groups),
            "grouped_conv_groups": sum(s > 1 for s in groups.slices), "flops_reduction": round(reduction, 4),
            "max_abs_diff": diff, "params_dense": count_params(model), "params_deployed": count_params(final)}


def check_magnitude(model, px: int, budget: float = PARAMS_BUDGET) -> dict:
    masks = MaskSet(model)
    params = {n: p for n, p in model.named_parameters() if n in masks.prunable}
    for n, keep in masks_from_scores(Magnitude().weight_scores(params), budget, "uniform").items():
        masks.set(n, keep)
    masks.apply()
    _train_steps(model, masks, px)
    x1 = torch.randn(1, 3, px, px)
    sparsity = pruned_costs(model, model, x1, model_costs(model, x1))["sparsity"]  # results.json's measure
    ok = abs(sparsity - budget) <= PARAMS_TOL
    return {"status": "ok" if ok else "fail", "sparsity": round(sparsity, 5),
            "reason": "" if ok else f"sparsity {sparsity:.4f} misses budget {budget}"}


def _guarded(fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except PruneLabError as e:  # a refusal must be one line, as the pipeline prints it
        msg = str(e).strip()
        out = {"status": "refused", "reason": msg} if "\n" not in msg else \
            {"status": "fail", "reason": f"a refusal of several lines: {one_line(e)}"}
    except Exception as e:  # a traceback a user would see: the sweep records it as a failure
        out = {"status": "fail", "reason": f"{type(e).__name__}: {one_line(e)}"}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def check_model(source: str, name: str, sizes=SIZES, methods=("l1_filter", "magnitude")) -> dict:
    """{"model", "source", "input_px", "note", "params", per method {"status": ok|refused|fail, "reason", ...}}.

    A FLOPs budget out of reach at the smallest input is tried again at 224 px: what a layer
    costs depends on the input (Swin pads 8x8 tokens to 14x14 windows, so at 32 px attention,
    which no plan shrinks, outweighs the MLPs); the result then says which size it holds for."""
    row = {"model": name, "source": source}
    try:
        model = build(source, name)
        row["params"] = count_params(model)
        row["input_px"], row["note"] = input_size(model, name, sizes)
    except PruneLabError as e:
        return {**row, **{m: {"status": "refused", "reason": one_line(e)} for m in methods}}
    except Exception as e:
        return {**row, **{m: {"status": "fail", "reason": f"{type(e).__name__}: {one_line(e)}"} for m in methods}}
    px = row["input_px"]
    for i, method in enumerate(methods):
        fresh = model if i == 0 else build(source, name)
        if method == "magnitude":
            row[method] = _guarded(check_magnitude, fresh, px)
            continue
        row[method] = _guarded(check_l1_filter, fresh, px, name)
        if row[method]["status"] == "refused" and "out of reach" in row[method]["reason"] and px < 224:
            retry = _guarded(check_l1_filter, build(source, name), 224, name)
            row[method] = {**retry, "px": 224, "at_input_px": row[method]["reason"]} if retry["status"] == "ok" \
                else row[method]
    return row
