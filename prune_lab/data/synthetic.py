"""Random tensors with random labels, for speed and plumbing tests only."""

from __future__ import annotations

from typing import Optional

import torch

from prune_lab.data.base import ClassificationDataModule, TensorImageDataset
from prune_lab.errors import PruneLabError


class SyntheticDataModule(ClassificationDataModule):
    """Standard-normal images with uniformly random labels; nothing to learn.

    Meant for throughput benchmarks and pipeline tests, never for accuracy:
    labels are independent of the images. Train has ``num_samples`` examples,
    val and test ``max(1, num_samples // 4)`` each, all drawn from a generator
    seeded with ``seed`` so the same seed always gives the same data.
    """

    tensor_data = True

    def __init__(
        self,
        num_samples: int = 512,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        **base,
    ) -> None:
        super().__init__(**base)
        for key, value in (("num_samples", num_samples), ("num_classes", num_classes),
                           ("channels", channels), ("image_size", image_size)):
            if int(value) < 1:
                raise PruneLabError(f"data.{key}={value} must be a positive integer")
        self.name = "synthetic"
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.image_size = int(image_size)

    def _split(self, generator: torch.Generator, n: int) -> TensorImageDataset:
        shape = (n, self.channels, self.image_size, self.image_size)
        images = torch.randn(shape, generator=generator)
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        return TensorImageDataset(images, labels)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        eval_n = max(1, self.num_samples // 4)
        self.train_set = self._split(generator, self.num_samples)
        self.val_set = self._split(generator, eval_n)
        self.test_set = self._split(generator, eval_n)
