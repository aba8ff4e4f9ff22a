"""Models: a registry of CIFAR-sized networks plus torchvision/timm behind one ``create_model``."""

from prune_lab.models.registry import build_from_spec, classifier_of, create_model, list_models, register_model

# Imported for their @register_model side effect.
from prune_lab.models import cifar_resnet, logreg, vgg, wide_resnet  # noqa: E402,F401  isort: skip

__all__ = ["build_from_spec", "classifier_of", "create_model", "list_models", "register_model"]
