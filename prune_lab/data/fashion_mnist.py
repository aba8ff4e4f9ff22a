"""Fashion-MNIST: 70,000 real 28x28 clothing images, offline through Debian's package.

The evidence benchmark of prune_lab (`experiment=fashion_mnist`): large enough (10,000 test
images: one image is 0.01 points) and hard enough (dense CNNs land near 90-93 %) that methods
can be told apart, small enough to train on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import os
import shutil
from typing import Optional

import torch
import torch.nn.functional as F
from torchvision.datasets import FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file

from prune_lab.data.base import ClassificationDataModule, TensorImageDataset, stratified_split
from prune_lab.data.cifar import NET_TIMEOUT, _one_line, _socket_timeout, _unreachable
from prune_lab.errors import PruneLabError

# Where `apt-get install dataset-fashion-mnist` puts the four gzipped idx files.
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# torchvision's names for the four files (without .gz), train images first.
FILES = tuple(os.path.splitext(name)[0] for name, _ in FashionMNIST.resources)


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST (Xiao et al. 2017) in torchvision's idx format.

    Sources, in order: the four idx files (gzipped or not) in ``root`` (or in torchvision's
    download layout ``root/FashionMNIST/raw``); ``system_dir`` (Debian's package); torchvision's
    download when ``download`` and the network allow; otherwise one line naming both routes.
    Gzipped files are decompressed once into ``root/FashionMNIST/raw`` and read with torchvision's
    idx readers.

    Splits: ``val_size`` images carved from the 60,000 training images (stratified by class,
    fixed by ``split_seed``), then ``train_size`` of the rest (stratified, fixed; null: all of
    them) for CPU budgets; the official 10,000 as test, read only for the final number. Images
    are scaled to [0, 1], resized to ``image_size`` once (bilinear, antialiased) and normalised
    with the training subset's mean and std. No augmentation.
    """

    tensor_data = True

    name = "fashion_mnist"
    num_classes = 10
    channels = 1

    def __init__(self, root: Optional[str] = None, download: bool = True, image_size: int = 28,
                 train_size: Optional[int] = None, val_size: int = 5000, split_seed: int = 0,
                 system_dir: str = DEBIAN_DIR, **base) -> None:
        super().__init__(**base)
        if int(image_size) < 8:
            raise PruneLabError(f"data.image_size={image_size} must be >= 8")
        if int(val_size) < 1:
            raise PruneLabError(f"data.val_size={val_size} must be >= 1: validation is carved from the "
                                "training images (the test set is only for the final number)")
        if train_size is not None and int(train_size) < 1:
            raise PruneLabError(f"data.train_size={train_size} must be a positive integer or null (all)")
        self.root = os.path.abspath(os.path.expanduser(str(root or "data/fashion_mnist")))
        self.download = bool(download)
        self.image_size = int(image_size)
        self.train_size = None if train_size is None else int(train_size)
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.system_dir = str(system_dir)
        self.mean: Optional[float] = None
        self.std: Optional[float] = None

    # ------------------------------------------------------------ on disk

    @property
    def raw_folder(self) -> str:
        """torchvision's layout (where its download and our decompressed copies live)."""
        return os.path.join(self.root, "FashionMNIST", "raw")

    def _readable(self) -> Optional[list[str]]:
        """Paths of the four plain idx files, if all are present somewhere readable."""
        paths = []
        for name in FILES:
            found = [os.path.join(d, name) for d in (self.root, self.raw_folder) if os.path.isfile(os.path.join(d, name))]
            if not found:
                return None
            paths.append(found[0])
        return paths

    def _gzipped_in(self, folder: str) -> Optional[list[str]]:
        paths = [os.path.join(folder, name + ".gz") for name in FILES]
        return paths if all(os.path.isfile(p) for p in paths) else None

    def _decompress(self, sources: list[str]) -> None:
        os.makedirs(self.raw_folder, exist_ok=True)
        for src, name in zip(sources, FILES):
            dst = os.path.join(self.raw_folder, name)
            if os.path.isfile(dst):
                continue
            tmp = f"{dst}.tmp{os.getpid()}"
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            os.replace(tmp, dst)  # atomic: a concurrent job never reads half a file

    def check(self) -> None:
        """Find the files (decompressing or downloading them if needed) or stop with one line."""
        if self._readable():
            return
        why = "data.download=false"
        try:
            for folder in (self.root, self.raw_folder, self.system_dir):
                sources = self._gzipped_in(folder)
                if sources:
                    self._decompress(sources)
                    return
            if self.download:
                url = FashionMNIST.mirrors[0]
                reason = _unreachable(url)
                if reason is None:
                    with _socket_timeout(NET_TIMEOUT):
                        FashionMNIST(self.root, train=True, download=True)
                    if self._readable():
                        return
                    why = "the download did not provide the files"
                else:
                    why = f"it could not be downloaded ({reason}; offline?)"
        except (OSError, EOFError, RuntimeError) as err:
            why = f"reading or fetching failed ({_one_line(err)})"
        raise PruneLabError(
            f"Fashion-MNIST not found in {self.root} nor in {self.system_dir}, and {why}: "
            f"install Debian's package (apt-get install dataset-fashion-mnist), or place "
            f"{', '.join(n + '.gz' for n in FILES)} (gzipped or not) in {self.root}"
        )

    def prepare_data(self) -> None:
        self.check()

    # ------------------------------------------------------------- splits

    def split_indices(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) indices into the official training set, both stratified and fixed by split_seed."""
        n = len(labels)
        if self.val_size >= n:
            raise PruneLabError(f"data.val_size={self.val_size} must be below the {n} training images")
        rest, val = stratified_split(labels, self.val_size, self.split_seed)
        if self.train_size is not None and self.train_size < len(rest):
            _, keep = stratified_split(labels[rest], self.train_size, self.split_seed + 1)
            rest = rest[keep]
        elif self.train_size is not None and self.train_size > len(rest):
            raise PruneLabError(f"data.train_size={self.train_size} exceeds the {len(rest)} training images left "
                                f"after data.val_size={self.val_size}; lower it or set null (all)")
        return rest.sort().values, val.sort().values

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0).unsqueeze(1)
        if self.image_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return  # Lightning calls setup once per stage; build once
        # decompression is atomic per file, so ranks that all run setup under DDP cannot clash
        self.check()
        paths = self._readable()
        try:
            train_x, train_y, test_x, test_y = (read_image_file(paths[0]), read_label_file(paths[1]),
                                                read_image_file(paths[2]), read_label_file(paths[3]))
        except Exception as err:
            raise PruneLabError(f"Fashion-MNIST files in {os.path.dirname(paths[0])} are unreadable or corrupt "
                                f"({_one_line(err)}): delete them and run again") from None
        if len(train_x) != len(train_y) or len(test_x) != len(test_y):
            raise PruneLabError(f"Fashion-MNIST files in {os.path.dirname(paths[0])} disagree: "
                                f"{len(train_x)}/{len(train_y)} train and {len(test_x)}/{len(test_y)} test images/labels")
        train_idx, val_idx = self.split_indices(train_y)
        train_images = self._prepare(train_x[train_idx])
        # statistics from the training subset only, so val and test stay unseen
        self.mean, self.std = float(train_images.mean()), float(train_images.std())

        def norm(x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.std

        self.train_set = TensorImageDataset(norm(train_images), train_y[train_idx])
        self.val_set = TensorImageDataset(norm(self._prepare(train_x[val_idx])), train_y[val_idx])
        self.test_set = TensorImageDataset(norm(self._prepare(test_x)), test_y)
