"""Data modules: every dataset prune_lab trains on, behind one LightningDataModule API."""

from prune_lab.data.base import ClassificationDataModule
from prune_lab.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from prune_lab.data.digits import DigitsDataModule
from prune_lab.data.fashion_mnist import FashionMNISTDataModule
from prune_lab.data.imagenet import ImageNetDataModule
from prune_lab.data.synthetic import SyntheticDataModule

# Name used in configs and result tables -> class.
DATASETS: dict[str, type[ClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "imagenet": ImageNetDataModule,
    "synthetic": SyntheticDataModule,
}

__all__ = [
    "ClassificationDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "DATASETS",
]
