"""Model registry and the single entry point ``create_model`` for all model sources.

Three sources share one signature so a Hydra config can switch between them by changing
``source``: our own CIFAR-sized models ("prune_lab"), torchvision classification models and
timm models. Every model gets a JSON-able ``prune_lab_spec`` so checkpoints and reports can
record *which* architecture they hold and rebuild it without the config.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.models.weights import load_into, looks_like_path, read_state_dict

SOURCES = ("prune_lab", "torchvision", "timm")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn(num_classes, in_channels, **kwargs) -> nn.Module`` as ``name``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            # Silent replacement would make configs depend on import order.
            raise ValueError(f"model name '{name}' is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of the prune_lab models."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    source: str = "prune_lab",
    weights: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` from ``source`` and optionally load ``weights``.

    ``weights``: None (random init), a local ``.safetensors``/``.pt``/``.pth``/``.ckpt`` file,
    a torchvision weights enum name (``"DEFAULT"``, ``"IMAGENET1K_V2"``) or, for timm,
    ``"pretrained"``. Hub weights with a different class count get a freshly initialised
    classifier (the usual fine-tuning set-up); local files must match exactly.
    """
    if source not in SOURCES:
        raise PruneLabError(f"unknown model source '{source}'; choose one of: {', '.join(SOURCES)}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise PruneLabError(f"{arg}={value!r} must be a positive integer")
    num_classes, in_channels = int(num_classes), int(in_channels)
    if weights is not None and str(weights) == "auto":
        raise PruneLabError(
            "weights='auto' reached create_model; 'auto' is resolved by the pipeline, "
            "pass None, a file path or a hub weights name here"
        )
    kwargs = _plain(kwargs)
    weight_file = weights if weights is not None and looks_like_path(weights) else None
    hub_weights = None if weight_file is not None or weights is None else str(weights)

    if source == "prune_lab":
        model = _create_prune_lab(name, num_classes, in_channels, hub_weights, kwargs)
    elif source == "torchvision":
        model = _create_torchvision(name, num_classes, in_channels, hub_weights, kwargs)
    else:
        model = _create_timm(name, num_classes, in_channels, hub_weights, kwargs)

    if weight_file is not None:
        state_dict = read_state_dict(weight_file)
        try:
            head = classifier_of(model)[0]
        except PruneLabError:  # e.g. SqueezeNet's conv classifier: just no class-count hint
            head = None
        load_into(model, state_dict, f"weights file '{weight_file}'", head)
    model.prune_lab_spec = {
        "name": name,
        "source": source,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "kwargs": kwargs,
    }
    return model


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the architecture described by ``model.prune_lab_spec`` (random init, no weights)."""
    required = ("name", "source", "num_classes", "in_channels")
    missing = [key for key in required if key not in spec]
    if missing:
        raise PruneLabError(f"model spec lacks {', '.join(missing)}; it needs keys: {', '.join(required)}, kwargs")
    return create_model(
        spec["name"],
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        source=spec["source"],
        weights=None,
        **dict(spec.get("kwargs") or {}),
    )


def classifier_of(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the final classification layer (kept out of channel pruning): the last
    nn.Linear, or for a model without one the last nn.Conv2d (a convolutional classifier)."""
    named = dict(model.named_modules())
    # timm records the classifier's name for every model; trust it over guessing.
    timm_name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(timm_name, str) and isinstance(named.get(timm_name), nn.Linear):
        return timm_name, named[timm_name]
    for attr in ("fc", "classifier", "head"):
        module = named.get(attr)
        if isinstance(module, nn.Linear):
            return attr, module
        if isinstance(module, nn.Module):
            # Containers such as torchvision's VGG ``classifier`` Sequential end in the classifier.
            inner = [(f"{attr}.{n}", m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            if inner:
                return inner[-1]
    linears = [(n, m) for n, m in named.items() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    # a convolutional classifier (SqueezeNet: a 1x1 conv to the classes, then global pooling): the last conv
    convs = [(n, m) for n, m in named.items() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise PruneLabError(f"model {type(model).__name__} has no classifier: no nn.Linear and no nn.Conv2d layer")
    return convs[-1]


def _create_prune_lab(name: str, num_classes: int, in_channels: int, hub_weights: str | None, kwargs: dict) -> nn.Module:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PruneLabError(
            f"unknown model '{name}' for source prune_lab{hint}; choose one of: {', '.join(list_models())}"
        )
    if hub_weights is not None:
        raise PruneLabError(
            f"weights='{hub_weights}' is not a file path; prune_lab models load weights from a local "
            ".safetensors/.pt/.pth/.ckpt file"
        )
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [p for p in params if p not in ("num_classes", "in_channels")]
        for key in kwargs:
            if key not in accepted:
                raise PruneLabError(
                    f"model {name} does not accept argument '{key}'; accepted: {', '.join(accepted) or 'none'}"
                )
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _create_torchvision(name: str, num_classes: int, in_channels: int, hub_weights: str | None, kwargs: dict) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    _check_hub_name(name, "torchvision", available, "python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'")
    if in_channels != 3:
        raise PruneLabError(
            f"torchvision model {name} takes 3 input channels but the data has in_channels={in_channels}; "
            "use a prune_lab or timm model"
        )
    if hub_weights is None:
        return _main_head_only(_call_hub("torchvision", name, kwargs, torchvision.models.get_model, name,
                                         num_classes=num_classes, weights=None, **kwargs))

    enum = torchvision.models.get_model_weights(name)
    if hub_weights not in enum.__members__:
        raise PruneLabError(
            f"unknown torchvision weights '{hub_weights}' for {name}; choose one of: {', '.join(enum.__members__)} "
            "or a local weights file path"
        )
    chosen = enum[hub_weights]
    hub_classes = len(chosen.meta["categories"])
    try:
        # torchvision insists num_classes equals the weights' class count, so build it that way
        # and swap the classifier afterwards.
        model = _call_hub("torchvision", name, kwargs, torchvision.models.get_model, name, weights=chosen, **kwargs)
    except OSError as err:  # urllib's URLError and socket errors are OSErrors
        raise PruneLabError(
            f"could not download torchvision weights {name}/{hub_weights} (offline?); download {chosen.url} "
            "elsewhere and pass its path as weights=<file>"
        ) from err
    if num_classes != hub_classes:
        _replace_heads(model, hub_classes, num_classes)
    return _main_head_only(model)


def _main_head_only(model: nn.Module) -> nn.Module:
    """GoogLeNet and Inception v3 return (logits, auxiliary logits) in training, which every loss,
    distillation and search here reads as one tensor: their auxiliary heads (a training aid of the
    original ImageNet recipes, not part of the deployed classifier) are removed, so training and
    evaluation both see the main head's logits. Loaded hub weights keep the main network's values."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for head in ("aux1", "aux2", "AuxLogits"):  # GoogLeNet, Inception v3
            if getattr(model, head, None) is not None:
                setattr(model, head, None)
    return model


def _create_timm(name: str, num_classes: int, in_channels: int, hub_weights: str | None, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise PruneLabError("source=timm needs the optional package timm; install it with pip install 'prune_lab[hub]'") from err
    if not name.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name):
        family = re.split(r"[_\d.]", name, maxsplit=1)[0] or name
        how = f"python -c 'import timm; print(timm.list_models(\"*{family}*\"))'"
        _check_hub_name(name, "timm", timm.list_models(), how)
    if hub_weights not in (None, "pretrained"):
        raise PruneLabError(f"weights='{hub_weights}' for source timm must be None, 'pretrained' or a local file path")
    try:
        # timm re-initialises the head itself when num_classes differs from the pretrained one.
        return _call_hub(
            "timm", name, kwargs, timm.create_model, name,
            num_classes=num_classes, in_chans=in_channels, pretrained=hub_weights == "pretrained", **kwargs,
        )
    except OSError as err:  # huggingface_hub's offline errors subclass OSError
        raise PruneLabError(
            f"could not download timm weights for {name} (offline?); download them elsewhere and pass "
            "the file path as weights=<file>"
        ) from err


def _call_hub(source: str, name: str, kwargs: dict, fn: Callable[..., nn.Module], *args: Any, **call_kwargs: Any) -> nn.Module:
    try:
        return fn(*args, **call_kwargs)
    except TypeError as err:
        # Hub builders forward kwargs to the model constructor; a typo surfaces as TypeError.
        if not kwargs:
            raise
        raise PruneLabError(f"{source} model {name} rejected arguments {sorted(kwargs)}: {err}") from err


def _check_hub_name(name: str, source: str, available: Sequence[str], how_to_list: str) -> None:
    if name in available:
        return
    close = difflib.get_close_matches(name, available, n=3)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise PruneLabError(f"unknown model '{name}' for source {source}{hint}; list them with {how_to_list}")


def _replace_heads(model: nn.Module, old_classes: int, num_classes: int) -> None:
    """Swap the classifier (and auxiliary heads, e.g. Inception's) for fresh ``num_classes`` ones."""
    main, _ = classifier_of(model)
    targets = [main] + [
        n for n, m in model.named_modules()
        if "aux" in n.lower() and isinstance(m, nn.Linear) and m.out_features == old_classes
    ]
    for target in targets:
        old = model.get_submodule(target)
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _plain(value: Any) -> Any:
    """Turn Hydra's DictConfig/ListConfig (and tuples) into JSON-able dicts/lists for the spec."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise PruneLabError(f"model argument value {value!r} is not JSON-serialisable; use numbers, strings, lists or dicts")
