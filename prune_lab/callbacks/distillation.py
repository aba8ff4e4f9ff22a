"""The distillation capability: a teacher–student loss added to the module's training loss.

`Distillation` fills the module's teacher slot (by default with a frozen copy of the model as
it enters training: for post-training methods, the dense reference) and registers a loss term.
The loss itself is a pluggable object `loss(student_logits, teacher_logits, progress)` with
`progress` the fraction of training done, so schedules mean the same at any run length; pick one
by name from `LOSSES` or pass an object through config (`_target_`).
"""
from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F

from prune_lab.errors import PruneLabError


class BaseDecayedKL:
    """UniPTS's base-decayed objective (METHODS.md §2, [code]):

        loss = KL(log_softmax(z_s)/τ ‖ softmax(z_t/T)) summed · T² / B,  τ = τ0 · decay^(ref_epochs · progress)

    Its gradient is (T²/τ)(softmax(z_s) − softmax(z_t/T))/B: a soft-target cross-entropy whose
    weight grows from T²/τ0 = 2 to 5.4 over training (T = 4, τ0 = 8, decay 0.99, 100 epochs).
    """

    name = "base_decayed"

    def __init__(self, temperature: float = 4.0, tau0: float = 8.0, decay: float = 0.99, ref_epochs: float = 100):
        if not temperature > 0 or not tau0 > 0 or not 0 < decay <= 1:
            raise PruneLabError(f"distillation temperature={temperature}, tau0={tau0}, decay={decay}: "
                                "temperature and tau0 must be > 0 and decay in (0, 1]")
        self.temperature, self.tau0, self.decay, self.ref_epochs = float(temperature), float(tau0), decay, ref_epochs

    def tau(self, progress: float) -> float:
        return self.tau0 * self.decay ** (self.ref_epochs * progress)

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, progress: float) -> torch.Tensor:
        log_p_student = F.log_softmax(student, dim=1) / self.tau(progress)
        p_teacher = F.softmax(teacher.detach() / self.temperature, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="sum") * self.temperature ** 2 / student.shape[0]


class PlainKL(BaseDecayedKL):
    """The same objective with τ ≡ 1 (UniPTS's "plain KD" ablation)."""

    name = "plain"

    def tau(self, progress: float) -> float:
        return 1.0


LOSSES = {"base_decayed": BaseDecayedKL, "plain": PlainKL}


class Distillation(L.Callback):
    """Add `weight · loss(student, teacher)` to every training step.

    Args:
        loss: a name in `LOSSES` (built with `temperature`) or a loss object.
        temperature: T of the named losses.
        weight: factor on the distillation term.
        label_weight: factor on the label cross-entropy (0: the objective uses no labels).
        teacher_mode: "train" (BN of the teacher uses batch statistics, as UniPTS does) or "eval".
    """

    def __init__(self, loss="base_decayed", temperature: float = 4.0, weight: float = 1.0, label_weight: float = 1.0,
                 teacher_mode: str = "train"):
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise PruneLabError(f"unknown distillation loss (kd) '{loss}'; choose one of: {', '.join(LOSSES)}")
            loss = LOSSES[loss](temperature=temperature)
        if teacher_mode not in ("train", "eval"):
            raise PruneLabError(f"teacher_mode '{teacher_mode}' is not one of: train, eval")
        self.loss, self.weight, self.label_weight, self.teacher_mode = loss, float(weight), float(label_weight), teacher_mode
        self._progress = 0.0

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        if pl_module.teacher is None:
            masks, params = pl_module.masks, dict(pl_module.model.named_parameters())
            if any(bool((params[n][~masks[n]] == 0).all()) for n in masks.active):
                raise RuntimeError("Distillation copies the teacher when fit starts, but the model is already "
                                   "pruned; set module.teacher before pruning or prune in a fit hook")
            # setup runs before a checkpoint is restored, so a resumed run gets the same teacher
            pl_module.teacher = copy.deepcopy(pl_module.model)
        if self.term not in pl_module.loss_terms:
            pl_module.loss_terms.append(self.term)
        pl_module.label_loss_weight = self.label_weight

    def on_train_epoch_start(self, trainer, pl_module):
        teacher = pl_module.teacher.to(pl_module.device)
        teacher.train(self.teacher_mode == "train")
        # tied to the fraction of training: τ_e = τ0·0.99^(100·e/E) reproduces the paper's per-epoch
        # schedule at E = 100 epochs and stretches it over any other length
        self._progress = trainer.current_epoch / max(int(trainer.max_epochs or 1), 1)

    def term(self, module, batch, logits):
        with torch.no_grad():
            teacher_logits = module.teacher(batch[0])
        loss = self.weight * self.loss(logits, teacher_logits, self._progress)
        module.log("train/kd", loss, on_step=False, on_epoch=True, sync_dist=True)
        if hasattr(self.loss, "tau"):
            module.log("train/kd_tau", self.loss.tau(self._progress), on_step=False, on_epoch=True)
        return loss
