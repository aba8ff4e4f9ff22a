"""scikit-learn's bundled 8x8 handwritten digits: a real dataset that needs no download."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from prune_lab.data.base import ClassificationDataModule, TensorImageDataset
from prune_lab.errors import PruneLabError


class DigitsDataModule(ClassificationDataModule):
    """The 1797 UCI digits shipped with scikit-learn, as 1-channel images.

    Pixel values (0..16) are scaled to [0, 1], upsampled from 8x8 to
    ``image_size`` with bilinear interpolation once at setup, and normalised
    with the training split's mean and std. The 60/20/20 train/val/test split
    is stratified by class and depends only on ``split_seed``, so runs with
    different training seeds are evaluated on the same images. No augmentation.
    """

    tensor_data = True

    def __init__(self, image_size: int = 16, split_seed: int = 0, **base) -> None:
        super().__init__(**base)
        if int(image_size) < 8:
            raise PruneLabError(f"data.image_size={image_size} must be >= 8 (the digits are 8x8)")
        self.name = "digits"
        self.num_classes = 10
        self.channels = 1
        self.image_size = int(image_size)
        self.split_seed = int(split_seed)
        self.mean: Optional[float] = None
        self.std: Optional[float] = None

    def split_indices(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stratified 60/20/20 train/val/test indices for ``labels``."""
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(labels))
        rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=self.split_seed)
        # 25% of the remaining 80% is 20% of the whole.
        train, val = train_test_split(rest, test_size=0.25, stratify=labels[rest], random_state=self.split_seed)
        return np.sort(train), np.sort(val), np.sort(test)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return  # Lightning calls setup once per stage; the data never changes.
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(bunch.target.astype(np.int64))
        if self.image_size != 8:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

        train, val, test = self.split_indices(bunch.target)
        train_images = images[train]
        # Statistics from train only, so val/test stay unseen.
        self.mean = float(train_images.mean())
        self.std = float(train_images.std())
        images = (images - self.mean) / self.std

        self.train_set = TensorImageDataset(images[train], labels[train])
        self.val_set = TensorImageDataset(images[val], labels[val])
        self.test_set = TensorImageDataset(images[test], labels[test])
