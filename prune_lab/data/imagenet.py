"""ImageNet (or any ImageFolder-shaped dataset) from a local train/ + val/ tree."""

from __future__ import annotations

import os
from typing import Optional

from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from prune_lab.data.base import ClassificationDataModule, TransformSubset, stratified_split
from prune_lab.errors import PruneLabError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _class_dirs(folder: str) -> list[str]:
    """Sorted class sub-folder names, the same order ImageFolder uses."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


class _FixedClassFolder(ImageFolder):
    """ImageFolder that uses a given class->index map instead of its own folders.

    The validation tree may lack some classes; indexing it by its own folders
    would then shift every later label and silently ruin accuracy.
    """

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs) -> None:
        self._given = dict(class_to_idx)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory):  # noqa: D102 - ImageFolder hook
        return sorted(self._given, key=self._given.get), dict(self._given)


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet-style data: ``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``.

    ``val/`` is the test split (the official ImageNet test labels are not
    public), read only for the final number; validation is ``val_size`` images
    carved from ``train/`` (stratified by class, fixed by ``split_seed``, eval
    transforms), so every choice a run makes reads training images only.
    Labels are the sorted train class-folder names; val is indexed with the
    same map. ``num_classes=None`` takes the count from ``train/`` (1000 if it
    is absent); an explicit value that disagrees with ``train/`` is an error.
    Train: RandomResizedCrop + horizontal flip; eval: Resize(size*256/224) +
    CenterCrop. Any ImageFolder tree (ImageNet-100, Imagenette...) works.
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        num_classes: Optional[int] = None,
        val_size: int = 10000,
        split_seed: int = 0,
        **base,
    ) -> None:
        super().__init__(**base)
        if int(val_size) < 1:
            raise PruneLabError(f"data.val_size={val_size} must be >= 1: validation is carved from train/ "
                                "(val/ is the test split, only for the final number)")
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        if int(image_size) < 8:
            raise PruneLabError(f"data.image_size={image_size} must be >= 8")
        self.name = "imagenet"
        self.channels = 3
        self.image_size = int(image_size)
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.train_dir = os.path.join(self.root, "train")
        self.val_dir = os.path.join(self.root, "val")
        # Read the class count now: the model is built from it before setup().
        found = len(_class_dirs(self.train_dir)) if os.path.isdir(self.train_dir) else 0
        if num_classes is not None and found and int(num_classes) != found:
            raise PruneLabError(
                f"data.num_classes={num_classes} but {self.train_dir} has {found} class folders; "
                f"set data.num_classes={found} or null"
            )
        self.num_classes = found or int(num_classes if num_classes is not None else 1000)

    def _layout_error(self, problem: str) -> PruneLabError:
        return PruneLabError(
            f"ImageNet {problem}: expected {self.root}/train/<class>/*.JPEG and {self.root}/val/<class>/*.JPEG "
            f"(or set data.root=<folder holding train/ and val/>)"
        )

    def check(self) -> None:
        """Check the folder layout without scanning every image."""
        for split, folder in (("train", self.train_dir), ("val", self.val_dir)):
            if not os.path.isdir(folder):
                raise self._layout_error(f"{split} folder {folder} not found")
            classes = _class_dirs(folder)
            if not classes:
                # The raw ImageNet val archive is flat; it must be sorted into class folders first.
                raise self._layout_error(f"{split} folder {folder} has no class sub-folders")
        extra = sorted(set(_class_dirs(self.val_dir)) - set(_class_dirs(self.train_dir)))
        if extra:
            raise self._layout_error(f"val has {len(extra)} class folders not in train (e.g. {extra[0]!r})")

    def prepare_data(self) -> None:
        self.check()

    def make_transform(self, train: bool) -> T.Compose:
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            return T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        resize = int(self.image_size * 256 / 224)  # the usual 256 -> 224 centre-crop ratio
        return T.Compose([T.Resize(resize), T.CenterCrop(self.image_size), T.ToTensor(), normalize])

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return  # scanning a million files once is enough
        self.check()
        try:
            # images stay PIL here; the train and validation subsets apply their own transforms
            train = ImageFolder(self.train_dir)
            test = _FixedClassFolder(self.val_dir, train.class_to_idx, transform=self.make_transform(train=False))
        except (FileNotFoundError, OSError) as err:
            raise self._layout_error(" ".join(str(err).split())) from None
        if len(train.classes) != self.num_classes:
            raise PruneLabError(
                f"{self.train_dir} now has {len(train.classes)} classes but the model was sized for "
                f"{self.num_classes}; rebuild the data module"
            )
        if len(test) == 0:
            raise self._layout_error(f"val folder {self.val_dir} has no images")
        if self.val_size >= len(train):
            raise PruneLabError(f"data.val_size={self.val_size} must be below the {len(train)} images in {self.train_dir}")
        train_idx, val_idx = stratified_split(train.targets, self.val_size, self.split_seed)
        self.train_set = TransformSubset(train, train_idx, self.make_transform(train=True))
        self.val_set = TransformSubset(train, val_idx, self.make_transform(train=False))
        self.test_set = test
