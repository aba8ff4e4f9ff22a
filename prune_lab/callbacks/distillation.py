"""The distillation capability: a teacher–student loss added to the training loss.

`Distillation` is generic: it takes the frozen teacher from the module's teacher slot
(`pl_module.teacher`, the dense reference the pipeline puts there) and appends
`weight · loss(student, teacher, progress)` to `pl_module.loss_terms`. The loss object, chosen by
config, decides what is compared: `Outputs` carries a network's logits and, for losses that set
`uses_features`, the outputs of paired layers recorded by forward hooks; `progress` is the
fraction of training done (per step, or per epoch for losses with `per_epoch`), so schedules mean
the same at any run length. Losses: `BaseDecayedKL` / `PlainKL` (UniPTS), `SimilarityPreserving`
(SP-KD, linear over-parameterization); by name from `LOSSES` or as objects (`_target_`).

Layer pairing is by module path: `student_layers` (default "blocks": the output of every
residual block, found by class name `*Block`/`*Bottleneck`; "stages": the output of the last block
of each stage; or a list of paths), `teacher_layers` (default: the same paths). A pruned or
expanded student keeps its block paths, so the default pairs block i with block i.

At the first training step the callback measures ‖∇θ(weight · loss)‖ / ‖∇θ CE‖ over the
student's parameters (two extra backward passes, once) and logs it (`train/distill_ce_grad_ratio`,
results.json `distill.grad_ratio_first_step`): how strongly the teacher pulls against the labels.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from prune_lab.errors import PruneLabError

log = logging.getLogger("prune_lab")


@dataclass
class Outputs:
    """What a distillation loss sees of one network for one batch."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


def _logits(x) -> torch.Tensor:
    return x.logits if isinstance(x, Outputs) else x


# -- losses ------------------------------------------------------------------------------
class BaseDecayedKL:
    """UniPTS's base-decayed objective (METHODS.md §2, [code]):

        loss = KL(log_softmax(z_s)/τ ‖ softmax(z_t/T)) summed · T² / B,  τ = τ0 · decay^(ref_epochs · progress)

    Its gradient is (T²/τ)(softmax(z_s) − softmax(z_t/T))/B: a soft-target cross-entropy whose
    weight grows from T²/τ0 = 2 to 5.4 over training (T = 4, τ0 = 8, decay 0.99, 100 epochs).
    """

    name = "base_decayed"
    per_epoch = True  # τ_e changes once per epoch, as in the released code

    def __init__(self, temperature: float = 4.0, tau0: float = 8.0, decay: float = 0.99, ref_epochs: float = 100):
        if not temperature > 0 or not tau0 > 0 or not 0 < decay <= 1:
            raise PruneLabError(f"distillation temperature={temperature}, tau0={tau0}, decay={decay}: "
                                "temperature and tau0 must be > 0 and decay in (0, 1]")
        self.temperature, self.tau0, self.decay, self.ref_epochs = float(temperature), float(tau0), decay, ref_epochs

    def tau(self, progress: float) -> float:
        return self.tau0 * self.decay ** (self.ref_epochs * progress)

    def __call__(self, student, teacher, progress: float = 0.0) -> torch.Tensor:
        student, teacher = _logits(student), _logits(teacher)
        log_p_student = F.log_softmax(student, dim=1) / self.tau(progress)
        p_teacher = F.softmax(teacher.detach() / self.temperature, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="sum") * self.temperature ** 2 / student.shape[0]


class PlainKL(BaseDecayedKL):
    """The same objective with τ ≡ 1 (UniPTS's "plain KD" ablation): gradient weight T² = 16,
    3–8× the base-decayed one, so this ablation also changes the effective step size."""

    name = "plain"

    def tau(self, progress: float) -> float:
        return 1.0


class MatchedPlainKL(BaseDecayedKL):
    """Plain KD (τ ≡ 1) at the base-decayed objective's effective step: a constant τ equal to the
    harmonic mean of τ(progress) over training, so the gradient weight T²/τ is constant at the
    base-decayed weight's average over training (T = 4, τ0 = 8, 0.99, 100 epochs: 3.45, against
    2.0 → 5.4). It isolates what the ablation is about: the growing weight vs a constant one.

    Why not match at every epoch: the base-decayed gradient is (T²/τ_e)(softmax(z_s) −
    softmax(z_t/T))/B, exactly plain KD's gradient scaled by 1/τ_e, so plain KD weighted by 1/τ_e
    per epoch *is* the base-decayed objective and the ablation would compare a method with itself.
    """

    name = "plain_matched"

    def tau(self, progress: float) -> float:
        # 1/τ averaged over progress in [0, 1]: ∫ d^(-r·p)/τ0 dp = (d^(-r) − 1) / (τ0 · r · ln(1/d))
        rate = self.ref_epochs * math.log(1.0 / self.decay)
        mean_inverse = (math.exp(rate) - 1.0) / (self.tau0 * rate) if rate > 0 else 1.0 / self.tau0
        return 1.0 / mean_inverse


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
    """SP-KD (Tung & Mori, ICCV 2019): the similarity-preserving loss over layer pairs.

    The callback's `weight` is the paper's γ (3000 in the over-parameterization recipe).
    `reduction`: "mean" (default) averages over the pairs, so γ is a per-pair weight and keeps the
    meaning it has in the paper's one-pair setting however many pairs are matched (27 residual blocks
    on ResNet-56 would otherwise multiply it by 27); "sum" adds them up (γ per pair, total grows with
    the number of pairs).
    """

    uses_features = True

    def __init__(self, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise PruneLabError(f"SP-KD reduction='{reduction}' is not one of: mean, sum")
        self.reduction = reduction

    def __call__(self, student: Outputs, teacher: Outputs, progress: float = 0.0) -> torch.Tensor:
        if len(student.features) != len(teacher.features) or not student.features:
            raise PruneLabError("SP-KD needs the same non-zero number of student and teacher layers")
        total = sum(similarity_preserving_loss(s.float(), t.float()) for s, t in zip(student.features, teacher.features))
        return total / len(student.features) if self.reduction == "mean" else total


LOSSES = {"base_decayed": BaseDecayedKL, "plain": PlainKL, "plain_matched": MatchedPlainKL}


# -- the callback ----------------------------------------------------------------------------
def residual_blocks(model: nn.Module) -> list[str]:
    """Paths of the outermost modules whose class name says they are residual blocks."""
    names = [n for n, m in model.named_modules() if n and type(m).__name__.endswith(("Block", "Bottleneck"))]
    return [n for n in names if not any(n.startswith(f"{o}.") for o in names)]


def stage_outputs(model: nn.Module) -> list[str]:
    """Paths of the last residual block of each stage (blocks that share a parent module)."""
    last: dict[str, str] = {}
    for n in residual_blocks(model):
        last[n.rpartition(".")[0]] = n
    return list(last.values())


PAIRINGS = {"blocks": residual_blocks, "stages": stage_outputs}


def grad_norm_ratio(term: torch.Tensor, reference: torch.Tensor, params: list[torch.Tensor]) -> float:
    """‖∇ term‖ / ‖∇ reference‖ over `params` (graph kept for the training step's own backward)."""
    def norm(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None))
    return float(norm(term) / norm(reference).clamp_min(1e-30))


class Distillation(L.Callback):
    """Adds `weight · loss(student, teacher)` to the training loss.

    Args:
        loss: a loss object (e.g. `SimilarityPreserving()`) or a name in `LOSSES` (built with
            `temperature`).
        weight: its weight in the total loss (SP-KD: γ).
        temperature: T of the named KL losses.
        label_weight: factor on the label cross-entropy (0: the objective uses no labels).
        teacher_mode: "eval", or "train" (the teacher's BN uses batch statistics, as in UniPTS).
        student_layers / teacher_layers: module paths whose outputs are paired, in order, or
            "blocks" (every residual block; also null) or "stages" (the last block of each stage);
            teacher null = the student's paths. Only for feature losses.
        enabled: false turns the callback into a no-op (ablations such as `spkd=false`).
    """

    def __init__(self, loss, weight: float = 1.0, temperature: float = 4.0, label_weight: float = 1.0,
                 teacher_mode: str = "eval", student_layers: list[str] | None = None,
                 teacher_layers: list[str] | None = None, enabled: bool = True):
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise PruneLabError(f"unknown distillation loss (kd) '{loss}'; choose one of: {', '.join(LOSSES)}")
            loss = LOSSES[loss](temperature=temperature)
        if teacher_mode not in ("train", "eval"):
            raise PruneLabError(f"teacher_mode '{teacher_mode}' is not one of: train, eval")
        self.loss, self.weight, self.enabled = loss, float(weight), bool(enabled)
        self.label_weight, self.teacher_mode = float(label_weight), teacher_mode
        for layers in (student_layers, teacher_layers):
            if isinstance(layers, str) and layers not in PAIRINGS:
                raise PruneLabError(f"distillation layers='{layers}' is not one of: {', '.join(PAIRINGS)}, "
                                    "or a list of module paths")
        self.student_layers = student_layers if isinstance(student_layers, str) else list(student_layers or []) or None
        self.teacher_layers = teacher_layers if isinstance(teacher_layers, str) else list(teacher_layers or []) or None
        self.grad_ratio: float | None = None  # ‖∇ distillation‖ / ‖∇ CE‖ at the first step
        self.pairs: list[tuple[str, str]] = []
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
        pl_module.teacher = pl_module.teacher.to(pl_module.device).train(self.teacher_mode == "train")
        pl_module.label_loss_weight = self.label_weight
        self._term = self.loss_term
        pl_module.loss_terms.append(self._term)
        self.pairs = []
        if not getattr(self.loss, "uses_features", False):
            return
        def paths(layers, model):
            return PAIRINGS[layers](model) if isinstance(layers, str) else layers
        student = paths(self.student_layers or "blocks", pl_module.model)
        teacher = paths(self.teacher_layers, pl_module.teacher) if self.teacher_layers else student
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
        if getattr(self.loss, "per_epoch", False):
            progress = trainer.current_epoch / max(int(trainer.max_epochs or 1), 1)
        else:
            progress = trainer.global_step / max(int(trainer.estimated_stepping_batches), 1)
        value = self.weight * self.loss(student, teacher, progress)
        if self.grad_ratio is None and trainer.global_step == 0 and trainer.world_size == 1 and value.requires_grad:
            ce = F.cross_entropy(logits, batch[1], label_smoothing=pl_module.label_smoothing)
            params = [p for p in pl_module.model.parameters() if p.requires_grad]
            self.grad_ratio = grad_norm_ratio(value, ce, params)
            pl_module.log("train/distill_ce_grad_ratio", self.grad_ratio, on_step=False, on_epoch=True)
            log.info("distillation: ‖∇ distill‖/‖∇ CE‖ = %.3g at the first step (%d layer pairs)",
                     self.grad_ratio, len(self.pairs))
        for seen in self._seen.values():
            seen.clear()  # do not keep the batch's activations alive until the next one
        pl_module.log("train/distill", value, on_step=False, on_epoch=True, sync_dist=True)
        if hasattr(self.loss, "tau"):
            pl_module.log("train/kd_tau", self.loss.tau(progress), on_step=False, on_epoch=True)
        return value

    def state_dict(self):
        return {"grad_ratio": self.grad_ratio}

    def load_state_dict(self, state):
        self.grad_ratio = state.get("grad_ratio")

    def report(self) -> dict:
        """results.json["distill"]: the loss, its pairing and weight, the first-step gradient ratio."""
        if not self.enabled:
            return {}
        return {"distill": {"loss": type(self.loss).__name__, "weight": self.weight,
                            "reduction": getattr(self.loss, "reduction", None), "pairs": [list(p) for p in self.pairs],
                            "grad_ratio_first_step": self.grad_ratio}}

    def on_fit_end(self, trainer, pl_module):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._term is not None and self._term in pl_module.loss_terms:
            pl_module.loss_terms.remove(self._term)
        self._term = None
