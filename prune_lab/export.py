"""The deployed model: masks folded in, channels physically removed, saved without pickle.

`model.safetensors` holds the weights, `model.json` the plan to rebuild them (architecture spec
+ the channels each group keeps), `model.pt2` a `torch.export` program that loads with plain
`torch.export.load`. `load_model(run_dir)` rebuilds the model from the first two.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prune_lab.models import build_from_spec
from prune_lab.models.weights import load_plain
from prune_lab.sparsity import MaskSet, shrink
from prune_lab.sparsity.measure import inference_copy


def deployable(model: nn.Module, masks: MaskSet, example_input: torch.Tensor) -> nn.Module:
    """An eval-mode CPU copy of `model` with masks applied and the channel plan (if any) removed."""
    final = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for name, p in final.named_parameters():
            if name in masks.active:
                p.mul_(masks[name].cpu())
    plan = masks.channel_plan
    if plan and not masks.plan_applied:  # a model shrunk during training is not shrunk twice
        final = shrink(final, {k: v.cpu() for k, v in plan.items()}, example_input.cpu())
    remove_modules(final, masks.removed)
    return final.eval()


def remove_modules(model: nn.Module, names: list[str]) -> None:
    """Replace the named modules by identities (residual blocks a subnet skips)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.Sequential):
            parent[int(child)] = nn.Identity()
        else:
            setattr(parent, child, nn.Identity())


def save_model(run_dir: Path, model: nn.Module, spec: dict, plan: dict[str, torch.Tensor],
               example_input: torch.Tensor, removed: list[str] = (), fold_bn: bool = False,
               channels_last: bool = False) -> None:
    """model.safetensors + model.json (the model as built, BN separate) and model.pt2: the program
    as served (`served_program`), so timing the deliverable times what results.json's latency measured."""
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run_dir / "model.safetensors"))
    meta = {
        "schema": 1,
        "arch": spec,
        "input_shape": list(example_input.shape[1:]),
        # channels each group keeps, by root module (original indices); empty when unstructured
        "channel_plan": {root: keep.nonzero().flatten().tolist() for root, keep in plan.items()},
        "channel_sizes": {root: int(keep.numel()) for root, keep in plan.items()},
        "removed_modules": list(removed),
        "layers": {n: list(p.shape) for n, p in model.named_parameters()},
    }
    (run_dir / "model.json").write_text(json.dumps(meta, indent=1))
    torch.export.save(served_program(model, example_input, fold_bn, channels_last), str(run_dir / "model.pt2"))


def served_program(model: nn.Module, example_input: torch.Tensor, fold_bn: bool = False,
                   channels_last: bool = False) -> torch.export.ExportedProgram:
    """`model` exported as results.json's latency serves it (`inference_copy`): every BatchNorm
    that follows a conv/linear folded when `fold_bn`, conv weights stored channels-last when
    `channels_last` (the run's `latency.*`). The weights' layout survives export and load and
    decides the kernels (oneDNN runs NHWC for NHWC weights even on an NCHW input), so
    `torch.export.load(...).module()` called on a plain tensor runs what was measured. Batch is dynamic."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    x = example_input[:1].expand(2, *example_input.shape[1:]).contiguous().cpu()
    served = inference_copy(model.cpu(), channels_last=channels_last and x.dim() == 4, fold_bn=fold_bn)[0]
    return torch.export.export(served, (x,), dynamic_shapes=({0: batch},))


def load_model(run_dir: str | Path) -> nn.Module:
    """Rebuild a run's deployed model from model.json + model.safetensors (no pickle)."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "model.json").read_text())
    model = build_from_spec(meta["arch"])
    if meta["channel_plan"]:
        plan = {}
        for root, kept in meta["channel_plan"].items():
            keep = torch.zeros(meta["channel_sizes"][root], dtype=torch.bool)
            keep[kept] = True
            plan[root] = keep
        model = shrink(model, plan, torch.zeros(1, *meta["input_shape"]))
    remove_modules(model, meta.get("removed_modules", []))
    load_plain(model, load_file(str(run_dir / "model.safetensors")))
    return model.eval()
