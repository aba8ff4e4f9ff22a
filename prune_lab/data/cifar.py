"""CIFAR-10 and CIFAR-100 from torchvision, with a fail-fast offline download."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Iterator, Optional

import torch
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets import utils as tv_utils

from prune_lab.data.base import ClassificationDataModule, TransformSubset, stratified_split
from prune_lab.errors import PruneLabError

# Seconds allowed for the reachability probe and for each socket operation of
# the download; an offline machine must be told so in seconds, not minutes.
NET_TIMEOUT = 10.0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no details"
    return f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urllib calls take no timeout argument; the process-wide
    # default is the only handle on them, so set it briefly and restore it.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unreachable(url: str, timeout: Optional[float] = None) -> Optional[str]:
    """Why ``url``'s server (or the configured proxy) cannot be reached, or None if it can.

    Runs in a daemon thread because name resolution ignores socket timeouts
    and can block for a long time behind a broken resolver or firewall.
    """
    timeout = NET_TIMEOUT if timeout is None else timeout
    target = urllib.parse.urlparse(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    where = urllib.parse.urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else target
    host = where.hostname or ""
    port = where.port or (443 if where.scheme == "https" else 80)
    outcome: dict = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=probe, name="prune_lab-net-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"no answer from {host}:{port} within {timeout:g} s"
    if "error" in outcome:
        return f"cannot connect to {host}:{port} ({_one_line(outcome['error'])})"
    return None


class _CIFARDataModule(ClassificationDataModule):
    """Shared CIFAR logic; subclasses pick the torchvision class and statistics."""

    dataset_cls: type = datasets.CIFAR10
    label = "CIFAR"
    mean: tuple = ()
    std: tuple = ()

    def __init__(
        self,
        root: str | None = None,
        download: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        **base,
    ) -> None:
        super().__init__(**base)
        if int(val_size) < 1:
            raise PruneLabError(f"data.val_size={val_size} must be >= 1: validation is carved from the training "
                                "images (the test set is only for the final number)")
        self.root = os.path.abspath(os.path.expanduser(str(root or f"data/{self.name}")))
        self.download = bool(download)
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.augment = bool(augment)
        self.channels = 3
        self.image_size = 32

    # ------------------------------------------------------------ on disk

    @property
    def data_folder(self) -> str:
        """The extracted folder torchvision reads (``cifar-10-batches-py`` etc.)."""
        return os.path.join(self.root, self.dataset_cls.base_folder)

    def _missing_files(self) -> list[str]:
        cls = self.dataset_cls
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [n for n in names if not os.path.isfile(os.path.join(self.data_folder, n))]

    def _not_found(self, why: str) -> PruneLabError:
        cls = self.dataset_cls
        return PruneLabError(
            f"{self.label} not found in {self.root} and {why}: place {cls.filename} ({cls.url}) in "
            f"{self.root}, or set data.root=<folder holding {cls.base_folder}>"
        )

    def _fetch(self) -> Optional[str]:
        """Extract a local archive or download one; returns why it failed, or None."""
        cls = self.dataset_cls
        archive = os.path.join(self.root, cls.filename)
        try:
            if tv_utils.check_integrity(archive, cls.tgz_md5):
                tv_utils.extract_archive(archive, self.root)
                return None
            if not self.download:
                if os.path.exists(archive):
                    return f"its {cls.filename} is incomplete or corrupt (md5 mismatch) and data.download=false"
                return "data.download=false"
            reason = _unreachable(cls.url)
            if reason is not None:
                return f"could not be downloaded ({reason}; offline?)"
            os.makedirs(self.root, exist_ok=True)
            with _socket_timeout(NET_TIMEOUT):
                tv_utils.download_and_extract_archive(cls.url, self.root, filename=cls.filename, md5=cls.tgz_md5)
            return None
        except Exception as err:  # anything here means "no usable data": report it in one line
            return f"could not be downloaded or extracted ({_one_line(err)})"

    def check(self) -> None:
        """Make sure the extracted data is in ``root``, extracting or downloading it if allowed.

        Only file presence is checked here; torchvision verifies md5 sums when
        ``setup`` loads the files.
        """
        if not self._missing_files():
            return
        reason = self._fetch()
        missing = self._missing_files()
        if reason is None and missing:
            reason = f"{self.dataset_cls.filename} did not provide {self.dataset_cls.base_folder}/{missing[0]}"
        if reason is not None:
            raise self._not_found(reason)

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, before setup on all.
        self.check()

    # ------------------------------------------------------------- splits

    def make_transform(self, train: bool) -> T.Compose:
        normalize = T.Normalize(self.mean, self.std)
        if train and self.augment:
            return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        return T.Compose([T.ToTensor(), normalize])

    def split_indices(self, labels) -> tuple[list[int], list[int]]:
        """Deterministic (train, val) indices into the official training set, stratified by class."""
        if self.val_size >= len(labels):
            raise PruneLabError(f"data.val_size={self.val_size} must be below the {len(labels)} training images")
        train, val = stratified_split(labels, self.val_size, self.split_seed)
        return train.tolist(), val.tolist()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return  # Lightning calls setup once per stage; build once.
        if self._missing_files():
            # No download here: under DDP every rank runs setup, only one runs prepare_data.
            raise self._not_found("setup() ran before check()/prepare_data()")
        try:
            # Images stay PIL here; each split applies its own transform.
            full_train = self.dataset_cls(self.root, train=True, download=False)
            test = self.dataset_cls(self.root, train=False, download=False)
        except Exception as err:
            raise PruneLabError(
                f"{self.label} files in {self.data_folder} are unreadable or corrupt ({_one_line(err)}): "
                f"delete that folder and run again to re-extract or re-download"
            ) from None
        eval_tf = self.make_transform(train=False)
        self.test_set = TransformSubset(test, range(len(test)), eval_tf)
        train_idx, val_idx = self.split_indices(full_train.targets)
        self.train_set = TransformSubset(full_train, train_idx, self.make_transform(train=True))
        self.val_set = TransformSubset(full_train, val_idx, eval_tf)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50k train / 10k test, 32x32 RGB, 10 classes) via ``torchvision.datasets.CIFAR10``.

    Validation is a fixed ``val_size`` subset of the official training set,
    stratified by class and chosen by ``split_seed`` (independent of the run
    seed), never augmented; the test set is only read for the final number. ``root`` is the folder
    that holds (or will hold) ``cifar-10-batches-py``.
    """

    dataset_cls = datasets.CIFAR10
    name, num_classes, label = "cifar10", 10, "CIFAR-10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels, 100 classes) via ``torchvision.datasets.CIFAR100``.

    Same splits and transforms as :class:`CIFAR10DataModule`; ``root`` holds
    (or will hold) ``cifar-100-python``.
    """

    dataset_cls = datasets.CIFAR100
    name, num_classes, label = "cifar100", 100, "CIFAR-100"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
