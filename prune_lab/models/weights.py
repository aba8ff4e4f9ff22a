"""Loading weights from local files into a freshly built model.

Every failure here is something the user can fix (wrong path, wrong file, weights for another
architecture or class count), so each one becomes a one-line PruneLabError instead of the
multi-page traceback that ``torch.load``/``load_state_dict`` would print.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from prune_lab.errors import PruneLabError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def looks_like_path(weights: str | os.PathLike) -> bool:
    """True when ``weights`` names a file rather than a hub tag such as ``DEFAULT``.

    A missing file must still be recognised as a path so the user hears "no such file" rather
    than "unknown weights enum"; hence the suffix/separator test instead of only ``exists()``.
    """
    if isinstance(weights, os.PathLike):
        return True
    text = str(weights)
    return (
        text.lower().endswith(WEIGHT_SUFFIXES)
        or "/" in text
        or os.sep in text
        or text.startswith("~")
        or Path(text).exists()
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (plain, Lightning or {"model": sd})."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PruneLabError(f"weights file '{path}' does not exist (or is not a file)")
    suffix = file.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise PruneLabError(
            f"weights file '{path}' has unsupported suffix '{suffix}'; use one of: "
            + ", ".join(WEIGHT_SUFFIXES)
        )
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as err:
            raise PruneLabError(f"weights file '{path}' is not a readable safetensors file: {_one_line(err)}") from err
    try:
        # weights_only=True: a checkpoint is data, it must not be able to run code on load.
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler fails on junk with arbitrary error types
        if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
            found = re.search(r"GLOBAL (\S+)", str(err))
            culprit = f" ({found.group(1)})" if found else ""
            raise PruneLabError(
                f"weights file '{path}' holds Python objects beyond tensors and plain containers{culprit}, "
                "e.g. OmegaConf/numpy hyper-parameters; save a plain state_dict or a .safetensors file instead"
            ) from err
        raise PruneLabError(
            f"weights file '{path}' could not be loaded with torch.load(weights_only=True): {_one_line(err)}"
        ) from err
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        # Lightning checkpoint: the LightningModule holds the network as ``self.model``; other
        # entries (loss modules, teachers) are not part of the architecture we are loading.
        sd = dict(obj["state_dict"])
        inner = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        sd = inner or sd
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = dict(obj["model"])
    elif isinstance(obj, Mapping):
        sd = dict(obj)
    else:
        raise PruneLabError(
            f"weights file '{path}' holds a {type(obj).__name__}; expected a state_dict, "
            "a Lightning checkpoint with 'state_dict', or a dict with 'model'"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PruneLabError(
            f"weights file '{path}' is not a state_dict: entry '{bad[0]}' is not a tensor "
            "(expected a state_dict, a Lightning checkpoint with 'state_dict', or a dict with 'model')"
        )
    # DistributedDataParallel wraps the network as ``module``; its checkpoints are otherwise identical.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str, classifier: str | None) -> None:
    """Strictly load ``state_dict`` into ``model``, explaining any mismatch in one line.

    ``classifier`` is the name of the final layer, so a class-count mismatch (the most common
    mistake: ImageNet weights into a CIFAR model) can be reported as exactly that.
    """
    own = model.state_dict()
    for key, tensor in state_dict.items():
        if key in own and own[key].shape != tensor.shape:
            layer = key.rsplit(".", 1)[0]
            what = "classifier" if classifier is not None and layer == classifier else "layer"
            hint = (
                " (weights for a different num_classes)"
                if what == "classifier"
                else " (weights from a different architecture, width or a pruned model?)"
            )
            raise PruneLabError(
                f"{origin}: {what} '{layer}' parameter '{key}' has shape {tuple(tensor.shape)} in the file "
                f"but {tuple(own[key].shape)} in the model{hint}"
            )
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from the file (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} file keys not in the model (e.g. '{unexpected[0]}')")
        raise PruneLabError(f"{origin} does not match the model: " + "; ".join(parts))
    load_plain(model, state_dict)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_plain(model: nn.Module, state_dict: dict, strict: bool = True):
    """`model.load_state_dict` for a state dict read from a file without PyTorch's per-module metadata
    (safetensors keeps tensors only): the model's own module versions are attached, as a state dict
    saved by `torch.save` would carry them. Modules that check their version when loading (torchvision's
    MNASNet refuses None) then load as they would from their own state dict."""
    if getattr(state_dict, "_metadata", None) is None:
        from collections import OrderedDict

        state_dict = OrderedDict(state_dict)
        state_dict._metadata = getattr(model.state_dict(), "_metadata", None)
    return model.load_state_dict(state_dict, strict=strict)
