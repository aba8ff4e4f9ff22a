"""Layer-wise reconstruction of a pruned model (the POT-style post-training baseline).

Each pruned layer, in order, gets its kept weights (and bias) re-fitted with Adam so that its
output on calibration data matches the dense layer's output: min ‖f(W⊙M; x) − f_dense(x_dense)‖².
The mask M stays fixed. By default x is the input the layer receives in the *already
reconstructed* pruned network (`inputs="pruned"`), so later layers also absorb the error of
earlier ones, as post-training toolkits do; `inputs="dense"` fits every layer on the dense
network's activations independently. Pure torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class StopForward(Exception):
    """Raised by a capture hook: nothing after the layer of interest needs computing."""


def forward_until_stopped(model: nn.Module, batches) -> None:
    """Run every calibration batch through `model`; a hook that has seen what it needs raises
    StopForward, which ends that batch's forward early."""
    for x, _ in batches:
        try:
            model(x)
        except StopForward:
            pass


@torch.no_grad()
def _capture(model: nn.Module, layer: nn.Module, batches, want_output: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's inputs (and outputs) over all batches, in eval mode."""
    ins, outs = [], []

    def hook(_mod, args, out):
        ins.append(args[0].detach())
        if want_output:
            outs.append(out.detach())
        raise StopForward

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        forward_until_stopped(model, batches)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(ins), (torch.cat(outs) if want_output else None)


def reconstruct_layers(dense: nn.Module, pruned: nn.Module, masks: dict[str, torch.Tensor], batches,
                       steps: int = 300, lr: float = 1e-3, batch_size: int = 64, inputs: str = "pruned",
                       seed: int = 0, on_layer=None) -> dict[str, dict]:
    """Re-fit every masked layer of `pruned` (weights `masks`: name → keep-mask) in place.

    Returns per layer the output MSE before and after ({"before": .., "after": ..}).
    `on_layer(name)` is called after each layer (a progress bar).
    """
    if inputs not in ("pruned", "dense"):
        raise ValueError(f"inputs={inputs!r}; choose one of: pruned, dense")
    dense_layers, pruned_layers = dict(dense.named_modules()), dict(pruned.named_modules())
    generator = torch.Generator().manual_seed(seed)
    report = {}
    for weight_name, keep in masks.items():
        name = weight_name.rsplit(".", 1)[0] if "." in weight_name else ""
        layer, dense_layer = pruned_layers[name], dense_layers[name]
        x_dense, target = _capture(dense, dense_layer, batches, want_output=True)
        x = x_dense if inputs == "dense" else _capture(pruned, layer, batches, want_output=False)[0]
        keep = keep.to(layer.weight.device, layer.weight.dtype)
        weight = (layer.weight.detach() * keep).clone().requires_grad_(True)
        params = {"weight": weight}
        if getattr(layer, "bias", None) is not None:
            params["bias"] = layer.bias.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam(params.values(), lr=lr)

        def loss_on(idx):
            masked = {**params, "weight": params["weight"] * keep}
            return F.mse_loss(functional_call(layer, masked, (x[idx],)), target[idx])

        with torch.no_grad():
            before = float(loss_on(torch.arange(len(x))))
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator).to(x.device)
                optimizer.zero_grad(set_to_none=True)
                loss_on(idx).backward()
                optimizer.step()
        with torch.no_grad():
            after = float(loss_on(torch.arange(len(x))))
            if after <= before:  # never leave a layer worse than plain magnitude pruning left it
                layer.weight.copy_(params["weight"] * keep)
                if "bias" in params:
                    layer.bias.copy_(params["bias"])
            else:
                after = before
        report[weight_name] = {"before": before, "after": after}
        if on_layer is not None:
            on_layer(weight_name)
    return report
