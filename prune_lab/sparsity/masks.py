"""MaskSet: binary masks for a model's parameters, kept as buffers so checkpoints carry them.

A mask exists for every parameter (all ones at first). Only masks that are not all ones are
*active* and get enforced, so a dense run pays nothing. The budget of `target: params` methods
counts the weights of conv and linear layers (`prunable_weights`), stem and classifier included.
Structured methods additionally record a channel plan: for each dependency-group root, which
output channels are kept; it is what the exporter replays to shrink the model physically. When a
callback has already shrunk the bound model by that plan (`plan_applied`), the plan stays here
only to describe the result relative to the full architecture (`model.json`), not to be replayed.
"""
from __future__ import annotations

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights a `target: params` budget counts: every conv and linear weight."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, PRUNABLE_TYPES):
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    return out


def _key(name: str) -> str:
    # buffer names may not contain dots
    return name.replace(".", "__")


class MaskSet(nn.Module):
    """Masks of one model's parameters. Bind it to the model; it never owns the model."""

    PARAM = "m__"
    CHANNEL = "ch__"
    REMOVED = "rm__"

    def __init__(self, model: nn.Module):
        super().__init__()
        self._params: dict[str, nn.Parameter] = {}
        self.prunable: list[str] = []
        self.active: set[str] = set()
        self._cache = None
        # True when the bound model is already physically shrunk by `channel_plan`; not a buffer:
        # whoever shrinks (MaskUpdate in `setup`) sets it again on resume, before weights load
        self.plan_applied = False
        self.bind(model)
        for name, p in self._params.items():
            self.register_buffer(self.PARAM + _key(name), torch.ones_like(p, dtype=torch.bool))

    def bind(self, model: nn.Module) -> None:
        """Point the masks at `model`'s parameters (after a deepcopy or a device move)."""
        self._params = dict(model.named_parameters())
        self.prunable = list(prunable_weights(model))
        self._cache = None

    # -- masks --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, self.PARAM + _key(name))

    def __contains__(self, name: str) -> bool:
        return hasattr(self, self.PARAM + _key(name))

    def set(self, name: str, mask: torch.Tensor, sparse: bool | None = None) -> None:
        """`sparse`: whether the mask has a zero, when the caller knows it (a mask set every step must
        not read the device back to find out); None: read it."""
        buf = self[name]
        if mask.shape != buf.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, expected {tuple(buf.shape)}")
        buf.copy_(mask.to(device=buf.device, dtype=torch.bool))
        self._cache = None
        if not sparse if sparse is not None else bool(buf.all()):
            self.active.discard(name)
        else:
            self.active.add(name)

    def reset(self) -> None:
        for name in list(self.active):
            self[name].fill_(True)
        self.active.clear()
        self._cache = None
        for key in [k for k, _ in self.named_buffers() if k.startswith((self.CHANNEL, self.REMOVED))]:
            delattr(self, key)
        self.plan_applied = False

    # -- enforcement --------------------------------------------------------------------
    def _enforced(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Active parameters and their masks in the parameters' dtype, cached until a mask changes:
        the per-step multiply is then one fused multi-tensor kernel, no bool→float conversions.
        `bind` drops the cache (after a device or memory-layout change of the model)."""
        if self._cache is None or any(p.device != m.device for p, m in zip(*self._cache)):
            names = sorted(self.active)
            params = [self._params[n] for n in names]
            # empty_like: the mask takes the parameter's dtype, device and memory layout (channels-last too)
            self._cache = (params, [torch.empty_like(p).copy_(self[n]) for n, p in zip(names, params)])
        return self._cache

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked entries of the parameters (after every optimizer step)."""
        params, masks = self._enforced()
        if params:
            torch._foreach_mul_(params, masks)

    @torch.no_grad()
    def mask_grads(self) -> None:
        params, masks = self._enforced()
        pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear momentum-like state of pruned entries so they do not push against the mask."""
        by_id = {id(p): n for n, p in self._params.items()}
        for p, state in optimizer.state.items():
            name = by_id.get(id(p))
            if name not in self.active:
                continue
            for v in state.values():
                if torch.is_tensor(v) and v.shape == p.shape:
                    v.mul_(self[name])

    # -- channel plan (structured methods) ------------------------------------------------
    def set_channel_plan(self, plan: dict[str, torch.Tensor], applied: bool = False) -> None:
        """`plan[root_module_name]` is a bool vector over the root's output channels (True = kept).

        `applied`: the bound model is already physically shrunk by this plan (see `plan_applied`).
        """
        self.plan_applied = applied
        for key in [k for k, _ in self.named_buffers() if k.startswith(self.CHANNEL)]:
            delattr(self, key)
        for root, keep in plan.items():
            self.register_buffer(self.CHANNEL + _key(root), keep.to(torch.bool).clone())
        self._channel_names = {self.CHANNEL + _key(r): r for r in plan}

    @property
    def channel_plan(self) -> dict[str, torch.Tensor]:
        names = getattr(self, "_channel_names", {})
        return {names.get(k, k[len(self.CHANNEL):].replace("__", ".")): v
                for k, v in self.named_buffers() if k.startswith(self.CHANNEL)}

    def set_removed(self, modules: list[str]) -> None:
        """Modules the deployed model drops entirely (e.g. residual blocks a subnet skips); their
        parameters should be masked to zero too, so the masked model computes the same."""
        for key in [k for k, _ in self.named_buffers() if k.startswith(self.REMOVED)]:
            delattr(self, key)
        for name in modules:
            self.register_buffer(self.REMOVED + _key(name), torch.ones((), dtype=torch.bool))

    @property
    def removed(self) -> list[str]:
        return [k[len(self.REMOVED):].replace("__", ".") for k, _ in self.named_buffers() if k.startswith(self.REMOVED)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Plan buffers exist only after a structured update: create them before loading.
        for full_key, value in state_dict.items():
            if full_key.startswith((prefix + self.CHANNEL, prefix + self.REMOVED)):
                key = full_key[len(prefix):]
                if not hasattr(self, key):
                    self.register_buffer(key, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self.active = {n for n in self._params if n in self and not bool(self[n].all())}
        self._cache = None

    # -- distributed -----------------------------------------------------------------------
    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Make every rank hold rank `src`'s masks and channel plan (no-op outside DDP).

        Decisions are already computed from identical inputs on every rank; broadcasting makes
        identity a guarantee rather than a consequence of that.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for key, buf in self.named_buffers():
            as_bytes = buf.to(torch.uint8)  # gloo cannot broadcast bool tensors
            dist.broadcast(as_bytes, src)
            buf.copy_(as_bytes.to(buf.dtype))
        self.active = {n for n in self._params if n in self and not bool(self[n].all())}
        self._cache = None

    # -- reading ------------------------------------------------------------------------
    def density(self) -> dict[str, float]:
        """Fraction of nonzero entries per prunable weight (read from the weights, not the masks)."""
        return {n: float(self._params[n].count_nonzero()) / self._params[n].numel() for n in self.prunable}

    def sparsity(self) -> float:
        """Zero fraction over all prunable weights: what a `target: params` budget means."""
        total = sum(self._params[n].numel() for n in self.prunable)
        nonzero = sum(int(self._params[n].count_nonzero()) for n in self.prunable)
        return 1.0 - nonzero / max(total, 1)
