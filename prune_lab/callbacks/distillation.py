"""The distillation capability: a teacher–student loss added to the training loss.

`Distillation` is generic: it takes the frozen teacher from the module's teacher slot
(`pl_module.teacher`, the dense reference the pipeline puts there), records the outputs of
matched student/teacher layers with forward hooks, and appends `weight · loss(student, teacher)`
to `pl_module.loss_terms`. What is compared is the loss object's business, chosen by config:
a loss is any callable `loss(student: Outputs, teacher: Outputs, progress: float) -> Tensor`,
where `Outputs` holds the logits and the paired layers' outputs (in pairing order) and
`progress` is the fraction of training done (for losses with a schedule).

Layer pairing is by module path: `student_layers` (default: the output of every residual
block, found by class name `*Block`/`*Bottleneck`), `teacher_layers` (default: the same paths).
A pruned or expanded student keeps its block paths, so the default pairs block i with block i.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from prune_lab.errors import PruneLabError


@dataclass
class Outputs:
    """What a distillation loss sees of one network for one batch."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


# -- losses ------------------------------------------------------------------------------
def similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """b×b row-L2-normalised Gram matrix of a batch of features (any shape after the batch dim)."""
    q = features.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖G_teacher − G_student‖²_F / b²: compares batch-to-batch similarities, so the two feature maps
    may have any channel counts (and spatial sizes)."""
    b = student.shape[0]
    return (similarity_matrix(teacher) - similarity_matrix(student)).pow(2).sum() / b ** 2


class SimilarityPreserving:
    """SP-KD (Tung & Mori, ICCV 2019): Σ over layer pairs of the similarity-preserving loss.

    The callback's `weight` is the paper's γ (3000 in the over-parameterization recipe).
    """

    def __call__(self, student: Outputs, teacher: Outputs, progress: float = 0.0) -> torch.Tensor:
        if len(student.features) != len(teacher.features) or not student.features:
            raise PruneLabError("SP-KD needs the same non-zero number of student and teacher layers")
        return sum(similarity_preserving_loss(s.float(), t.float())
                   for s, t in zip(student.features, teacher.features))


# -- the callback ----------------------------------------------------------------------------
def residual_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost modules whose class name says they are residual blocks."""
    names = [n for n, m in model.named_modules() if n and type(m).__name__.endswith(("Block", "Bottleneck"))]
    return [n for n in names if not any(n.startswith(f"{o}.") for o in names)]


class Distillation(L.Callback):
    """Adds `weight · loss(student, teacher)` to the training loss.

    Args:
        loss: the loss object (e.g. `SimilarityPreserving()`).
        weight: its weight in the total loss (SP-KD: γ).
        student_layers / teacher_layers: module paths whose outputs are paired, in order;
            null = every residual block (teacher: the student's paths).
        enabled: false turns the callback into a no-op (the method's `spkd=false` ablation).
    """

    def __init__(self, loss, weight: float = 1.0, student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, enabled: bool = True):
        self.loss, self.weight, self.enabled = loss, float(weight), bool(enabled)
        self.student_layers = list(student_layers) if student_layers else None
        self.teacher_layers = list(teacher_layers) if teacher_layers else None
        self._hooks: list = []
        self._seen: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._term = None

    def on_fit_start(self, trainer, pl_module):
        if not self.enabled:
            return
        if pl_module.teacher is None:
            raise PruneLabError("distillation needs a teacher in the module's teacher slot (pl_module.teacher); "
                                "the pipeline puts the dense reference there")
        # after setup: the student is in its final training form (shrunk, expanded) and on its device
        pl_module.teacher = pl_module.teacher.to(pl_module.device).eval()
        student = self.student_layers or residual_blocks(pl_module.model)
        teacher = self.teacher_layers or student
        if not student or len(student) != len(teacher):
            raise PruneLabError(f"distillation layer pairing is empty or uneven (student {student}, teacher "
                                f"{teacher}); set the student_layers/teacher_layers module paths")
        self.pairs = list(zip(student, teacher))
        for role, model, names in (("student", pl_module.model, student), ("teacher", pl_module.teacher, teacher)):
            modules = dict(model.named_modules())
            for n in names:
                if n not in modules:
                    raise PruneLabError(f"distillation: the {role} has no module '{n}'")
                self._hooks.append(modules[n].register_forward_hook(self._record(role, n)))
        self._term = self.loss_term
        pl_module.loss_terms.append(self._term)

    def _record(self, role: str, name: str):
        def hook(module, inputs, output):
            self._seen[role][name] = output
        return hook

    def loss_term(self, pl_module, batch, logits) -> torch.Tensor:
        """Called by training_step after the student's forward, whose hooked outputs are recorded."""
        with torch.no_grad():
            teacher_logits = pl_module.teacher(batch[0])
        student = Outputs(logits, [self._seen["student"][s] for s, _ in self.pairs])
        teacher = Outputs(teacher_logits, [self._seen["teacher"][t] for _, t in self.pairs])
        trainer = pl_module.trainer
        progress = trainer.global_step / max(int(trainer.estimated_stepping_batches), 1)
        value = self.weight * self.loss(student, teacher, progress)
        for seen in self._seen.values():
            seen.clear()  # do not keep the batch's activations alive until the next one
        pl_module.log("train/distill", value, on_step=False, on_epoch=True, sync_dist=True)
        return value

    def on_fit_end(self, trainer, pl_module):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._term is not None and self._term in pl_module.loss_terms:
            pl_module.loss_terms.remove(self._term)
        self._term = None
