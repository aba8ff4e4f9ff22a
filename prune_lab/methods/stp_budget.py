"""What STP's budget measures (`method.target`): the FLOPs reduction, or the latency reduction a
per-layer LatencyTable predicts (prune_lab/sparsity/latency.py). The subnet space applies the
measure (`SubnetSpace.reduction`); here are the pieces that differ beyond it: the refusal of an
unreachable latency budget, the uniform-width ablation's plan, and the latency record of the
chosen subnet (predicted beside measured).
"""
from __future__ import annotations

import torch

from prune_lab.errors import PruneLabError
from prune_lab.sparsity.latency import LatencyTable, measured_reduction
from prune_lab.sparsity.latency_allocation import solve_latency_target
from prune_lab.sparsity.structure import solve_flops_target
from prune_lab.sparsity.subnet import SubnetSpace


def check_latency_reachable(most: float, budget: float, widths, table: LatencyTable) -> None:
    """`most`: the largest predicted latency reduction in the space (the pool's, which always holds
    the smallest subnet)."""
    if most < budget:
        raise PruneLabError(f"budget={budget} (latency) is not reachable by stp: the smallest subnets of "
                            f"method.widths={list(widths)} remove at most {most:.3f} of the predicted latency "
                            f"({table.predict_ms(None):.3f} ms dense); lower the budget")


def uniform_width_plan(space: SubnetSpace, scores: list[torch.Tensor], budget: float, tolerance: float,
                       table: LatencyTable | None = None) -> dict[str, torch.Tensor]:
    """The ablation without search: full depth and the same fraction of every channel group, solved
    for the budget (not limited to the width grid), cut in the importance order of `scores`. With a
    table (target=latency): the uniform FLOPs fraction bisected until the table's predicted latency
    reduction is the closest to the budget, as the FLOPs solve is the closest to its budget."""
    if table is None:
        return solve_flops_target(space.groups, space.flops, scores, budget, "uniform", tolerance=tolerance)
    plan, predicted = solve_latency_target(space.groups, table, scores, budget, allocation="flops",
                                           distribution="uniform")
    if abs(predicted - budget) > tolerance:
        raise PruneLabError(f"budget={budget} (latency) is not reachable by uniform width within ±{tolerance} "
                            f"(closest predicted reduction: {predicted:.3f}); give a larger "
                            "method.callbacks.stp.tolerance or use the search")
    return plan


def latency_record(table: LatencyTable, model, example_input, latency: dict, plan: dict[str, torch.Tensor],
                   skipped: list[str]) -> dict:
    """The table's predicted latency reduction of the chosen subnet beside the one measured on it
    as results.json measures (a shrunk CPU copy, timed interleaved with the dense model). STP does
    not re-solve on a measured miss: the search picks in the table's band, and the check of the
    measured latency against the budget is the pipeline's."""
    predicted = 1.0 - table.predict_ms(plan, skipped) / table.predict_ms(None)
    measured = measured_reduction(model, plan, example_input, latency, skipped)
    return {"estimated_latency_reduction": predicted, "measured_latency_reduction": measured["reduction"],
            "latency_ms": {"dense": measured["dense_ms"], "pruned": measured["pruned_ms"]},
            "latency_table": table.describe()}
