"""Tests for prune_lab.data: splits, shapes, on-disk formats, offline errors, shuffling."""

from __future__ import annotations

import inspect
import pickle
import socket
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torchvision import datasets
from torchvision.datasets import utils as tv_utils

from prune_lab.data import (
    DATASETS,
    CIFAR10DataModule,
    CIFAR100DataModule,
    ClassificationDataModule,
    DigitsDataModule,
    ImageNetDataModule,
    SyntheticDataModule,
)
from prune_lab.data import cifar as cifar_mod
from prune_lab.errors import PruneLabError


def _assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def test_registry_names_and_classes():
    assert set(DATASETS) == {"digits", "fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic"}
    for name, cls in DATASETS.items():
        assert issubclass(cls, ClassificationDataModule)
    assert DigitsDataModule().name == "digits"


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(image_size=16, split_seed=0, batch_size=64)
    dm.setup("fit")
    return dm


def test_digits_splits(digits):
    sizes = [len(digits.train_set), len(digits.val_set), len(digits.test_set)]
    assert sum(sizes) == 1797
    assert abs(sizes[0] / 1797 - 0.6) < 0.01 and abs(sizes[1] / 1797 - 0.2) < 0.01
    train, val, test = (set(part.tolist()) for part in digits.split_indices(load_digits().target))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 1797
    for split in (digits.train_set, digits.val_set, digits.test_set):
        assert set(split.labels.tolist()) == set(range(10))  # stratified: every class in every split


def test_digits_deterministic_and_seed_independent(digits):
    other = DigitsDataModule(image_size=16, split_seed=0, seed=123)  # run seed must not move the split
    other.setup()
    for a, b in ((digits.train_set, other.train_set), (digits.test_set, other.test_set)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    moved = DigitsDataModule(split_seed=1)
    moved.setup()
    assert not torch.equal(moved.test_set.labels, digits.test_set.labels)


def test_digits_shapes_and_normalisation(digits):
    image, label = digits.train_set[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)
    assert abs(float(digits.train_set.images.mean())) < 1e-4
    assert abs(float(digits.train_set.images.std()) - 1.0) < 1e-3
    assert digits.example_input(2).shape == (2, 1, 16, 16)
    x, y = next(iter(digits.val_dataloader()))
    assert x.shape == (64, 1, 16, 16) and y.dtype == torch.int64


# ---------------------------------------------------------------- CIFAR


@pytest.fixture
def fake_md5(monkeypatch):
    # Fake files cannot match torchvision's published md5 sums; make the
    # integrity checks test file presence only, everything else stays real.
    monkeypatch.setattr(tv_utils, "check_md5", lambda *args, **kwargs: True)


def _pixel(label: int) -> int:
    return 10 + 20 * label  # distinct per label, so an image tells its label


def _images(labels: list[int]) -> np.ndarray:
    return np.stack([np.full(3072, _pixel(l % 12), dtype=np.uint8) for l in labels])


def _dump(path, obj) -> None:
    # Real CIFAR files are Python-2 pickles whose str keys load as str under
    # torchvision's encoding="latin1"; str keys here reproduce that.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root, per_batch: int = 6, n_test: int = 10) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    k = 0
    for b in range(1, 6):
        labels = [(k + i) % 10 for i in range(per_batch)]
        k += per_batch
        _dump(folder / f"data_batch_{b}", {"data": _images(labels), "labels": labels, "batch_label": f"b{b}"})
    labels = [i % 10 for i in range(n_test)]
    _dump(folder / "test_batch", {"data": _images(labels), "labels": labels})
    _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})


def write_cifar100(root, n_train: int = 40, n_test: int = 10) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [(7 * i) % 100 for i in range(n)]
        _dump(folder / name, {"data": _images(fine), "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]})
    _dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                            "coarse_label_names": [f"c{i}" for i in range(20)]})


def _check_items(dataset, mean, std) -> None:
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
        expected = (torch.tensor([_pixel(label % 12) / 255.0] * 3) - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(image[:, 0, 0], expected, atol=1e-5), (i, label)
        assert torch.allclose(image, image[:, :1, :1].expand_as(image))


def test_cifar10_real_format(tmp_path, fake_md5):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, val_size=8, augment=False, batch_size=4)
    dm.check()
    dm.setup("fit")
    assert (dm.name, dm.num_classes, dm.channels, dm.image_size) == ("cifar10", 10, 3, 32)
    assert len(dm.train_set) == 22 and len(dm.val_set) == 8 and len(dm.test_set) == 10
    for split in (dm.train_set, dm.val_set, dm.test_set):
        _check_items(split, dm.mean, dm.std)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert dm.val_set.base is dm.train_set.base  # one loaded copy, two transforms

    again = CIFAR10DataModule(root=str(tmp_path), download=False, val_size=8, seed=99)
    again.setup()
    assert again.val_set.indices == dm.val_set.indices
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_cifar_augment_and_val_size_zero_refused(tmp_path, fake_md5):
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, val_size=5, augment=True)
    dm.setup()
    assert dm.val_set is not dm.test_set and len(dm.train_set) == 25
    image, label = dm.train_set[3]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    # Validation images are never augmented.
    _check_items(dm.val_set, dm.mean, dm.std)
    with pytest.raises(PruneLabError, match="val_size=0 must be >= 1: validation is carved from the training"):
        CIFAR10DataModule(root=str(tmp_path), val_size=0)
    with pytest.raises(PruneLabError):
        CIFAR10DataModule(root=str(tmp_path), val_size=30).setup()


def test_cifar100_real_format(tmp_path, fake_md5):
    write_cifar100(tmp_path)
    dm = CIFAR100DataModule(root=str(tmp_path), download=False, val_size=10, augment=False)
    dm.check()
    dm.setup()
    assert dm.num_classes == 100 and len(dm.train_set) == 30 and len(dm.val_set) == 10
    labels = [dm.train_set[i][1] for i in range(len(dm.train_set))]
    assert labels == [(7 * i) % 100 for i in dm.train_set.indices]
    _check_items(dm.train_set, dm.mean, dm.std)
    _check_items(dm.test_set, dm.mean, dm.std)


def test_cifar_archive_is_extracted_without_network(tmp_path, monkeypatch, fake_md5):
    staging, root = tmp_path / "staging", tmp_path / "root"
    write_cifar10(staging)
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    def no_network(*args, **kwargs):
        raise AssertionError("network used although the archive was present")

    monkeypatch.setattr(cifar_mod, "_unreachable", no_network)
    monkeypatch.setattr(tv_utils, "_urlretrieve", no_network)
    dm = CIFAR10DataModule(root=str(root), download=True, val_size=5, augment=False)
    dm.prepare_data()
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    dm.setup()
    _check_items(dm.val_set, dm.mean, dm.std)

    # Extraction is local, so it also works with download=False.
    other = tmp_path / "other"
    other.mkdir()
    (other / "cifar-10-python.tar.gz").write_bytes((root / "cifar-10-python.tar.gz").read_bytes())
    CIFAR10DataModule(root=str(other), download=False).check()
    assert (other / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(PruneLabError) as err:
        CIFAR100DataModule(root=str(tmp_path), download=False).check()
    message = _assert_one_line(err)
    assert str(tmp_path) in message and "cifar-100-python.tar.gz" in message and "download=false" in message


def test_cifar_offline_error_is_fast_and_one_line(tmp_path):
    if cifar_mod._unreachable(datasets.CIFAR10.url, timeout=5) is None:
        pytest.skip("this machine is online; the offline path would start a real 170 MB download")
    root = tmp_path / "empty"
    start = time.monotonic()
    with pytest.raises(PruneLabError) as err:
        CIFAR10DataModule(root=str(root), download=True).check()
    assert time.monotonic() - start < 30
    message = _assert_one_line(err)
    assert str(root) in message and "cifar-10-python.tar.gz" in message and "offline?" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


def test_cifar_stalled_server_times_out(tmp_path, monkeypatch):
    # A server that accepts connections but never answers (the socket below
    # listens and is never served): real urllib + TLS code must give up.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.CIFAR10, "url", f"https://127.0.0.1:{port}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar_mod, "NET_TIMEOUT", 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(PruneLabError) as err:
            CIFAR10DataModule(root=str(tmp_path), download=True).check()
    finally:
        server.close()
    assert time.monotonic() - start < 5
    assert "cifar-10-python.tar.gz" in _assert_one_line(err)


def test_probe_gives_up_on_hanging_name_lookup(monkeypatch):
    # Name resolution ignores socket timeouts; simulate a resolver that hangs.
    def hanging_lookup(*args, **kwargs):
        time.sleep(5)
        raise OSError("resolver gave up")  # what a real one ends with; the probe thread then exits quietly

    monkeypatch.setattr(cifar_mod.socket, "create_connection", hanging_lookup)
    start = time.monotonic()
    reason = cifar_mod._unreachable("https://example.invalid/x.tar.gz", timeout=0.3)
    assert time.monotonic() - start < 2 and "no answer from example.invalid:443" in reason


# ---------------------------------------------------------------- ImageNet

COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def write_imagefolder(root, val_classes=tuple(COLOURS)) -> None:
    for split, classes, n in (("train", tuple(COLOURS), 3), ("val", val_classes, 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), COLOURS[name]).save(folder / f"{name}_{i}.JPEG", quality=95)


def test_imagenet_imagefolder(tmp_path):
    write_imagefolder(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), image_size=32, batch_size=4, val_size=3)
    assert dm.num_classes == 3  # inferred from train/ before setup
    dm.check()
    dm.setup()
    # val/ is the test split; validation is carved from train/, one image per class (stratified)
    assert len(dm.train_set) == 6 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    assert sorted(dm.val_set[i][1] for i in range(3)) == [0, 1, 2]
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert int(image.mean(dim=(1, 2)).argmax()) == label  # colour channel == class index
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]


def test_imagenet_val_with_missing_class_keeps_train_labels(tmp_path):
    write_imagefolder(tmp_path, val_classes=("ant", "cat"))
    dm = ImageNetDataModule(root=str(tmp_path), image_size=32, val_size=3)
    dm.setup()
    assert sorted({label for _, label in dm.test_set.samples}) == [0, 2]


def test_imagenet_errors(tmp_path):
    with pytest.raises(PruneLabError) as err:
        ImageNetDataModule(root=str(tmp_path / "nowhere")).check()
    message = _assert_one_line(err)
    assert "train/<class>/*.JPEG" in message and str(tmp_path / "nowhere") in message
    write_imagefolder(tmp_path)
    with pytest.raises(PruneLabError) as err:
        ImageNetDataModule(root=str(tmp_path), num_classes=1000)
    assert "num_classes" in _assert_one_line(err)
    assert ImageNetDataModule(root=str(tmp_path), num_classes=3).num_classes == 3


# ---------------------------------------------------------------- synthetic + shuffling


def test_synthetic_deterministic():
    a, b, c = (SyntheticDataModule(num_samples=20, num_classes=4, channels=2, image_size=8, seed=s) for s in (1, 1, 2))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.train_set.images, b.train_set.images) and torch.equal(a.val_set.labels, b.val_set.labels)
    assert not torch.equal(a.train_set.images, c.train_set.images)
    image, label = a.train_set[0]
    assert image.shape == (2, 8, 8) and 0 <= label < 4 and len(a.val_set) == 5
    assert a.example_input(3).shape == (3, 2, 8, 8)


def _epoch_order(dm, epoch):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return torch.cat([x.flatten(1) for x, _ in loader])


def test_train_order_depends_only_on_seed_and_epoch():
    make = lambda seed: SyntheticDataModule(num_samples=40, image_size=4, batch_size=8, seed=seed)
    a, b = make(0), make(0)
    a.setup(), b.setup()
    assert torch.equal(_epoch_order(a, 3), _epoch_order(b, 3))  # e.g. a run resumed at epoch 3
    assert not torch.equal(_epoch_order(a, 3), _epoch_order(a, 4))
    assert sorted(a.train_dataloader().sampler) == list(range(40))  # a permutation, nothing dropped


def test_train_sampler_follows_attached_trainer():
    dm = SyntheticDataModule(num_samples=10, image_size=4, batch_size=2)
    dm.setup()
    seen = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        sampler = dm.train_dataloader().sampler
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
        seen += list(sampler)
    assert sorted(seen) == list(range(10))


def test_cifar_corrupt_files_are_one_line_error(tmp_path):
    write_cifar10(tmp_path)  # no fake_md5: the md5 sums cannot match
    dm = CIFAR10DataModule(root=str(tmp_path), download=False)
    dm.check()  # presence only
    with pytest.raises(PruneLabError) as err:
        dm.setup()
    assert str(tmp_path / "cifar-10-batches-py") in _assert_one_line(err)


# ---------------------------------------------------------------- configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_config_keys_are_constructor_arguments(name, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    cls = DATASETS[name]
    assert node._target_ == f"prune_lab.data.{cls.__name__}"
    accepted = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(ClassificationDataModule.__init__).parameters
    )
    assert set(node) - {"_target_"} <= accepted
    top = OmegaConf.create({"seed": 7, "paths": {"data_dir": str(tmp_path)}, "data": node})
    dm = instantiate(top.data)
    assert isinstance(dm, cls) and dm.seed == 7 and dm.name == name
    if hasattr(dm, "root"):
        assert dm.root.startswith(str(tmp_path))


# ---------------------------------------------------------------- batches cut from tensors

def _per_image_batches(dataset, sampler, batch_size):
    """What the loaders served before: one __getitem__ per image, default collation."""
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=list(sampler)))


@pytest.mark.parametrize("calibration_size", [None, 50])
def test_tensor_data_is_served_in_whole_batches_equal_to_the_per_image_path(calibration_size):
    dm = DigitsDataModule(image_size=8, batch_size=32, eval_batch_size=100, calibration_size=calibration_size)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    batched, per_image = list(loader), _per_image_batches(dm.train_set, loader.sampler, 32)
    assert len(batched) == len(per_image) > 1
    for (x, y), (x0, y0) in zip(batched, per_image):
        assert torch.equal(x, x0) and torch.equal(y, y0) and y.dtype == y0.dtype == torch.long
    for x, y in dm.val_dataloader():  # unshuffled, in order
        assert torch.equal(x, dm.val_set.images[: len(x)]) and torch.equal(y, dm.val_set.labels[: len(y)])
        break
    assert dm.train_set[0][0].shape == (1, 8, 8) and isinstance(dm.train_set[0][1], int)  # users' view unchanged


def test_on_device_is_refused_for_data_decoded_per_image_and_with_workers(tmp_path):
    with pytest.raises(PruneLabError) as err:
        CIFAR10DataModule(root=str(tmp_path), download=False, on_device=True)
    assert "on_device" in _assert_one_line(err) and "fashion_mnist" in str(err.value)
    with pytest.raises(PruneLabError) as err:
        DigitsDataModule(on_device=True, num_workers=2)
    assert "num_workers=0" in _assert_one_line(err)


def test_on_device_serves_tensors_on_the_trainer_device():
    dm = SyntheticDataModule(num_samples=40, image_size=4, batch_size=8, on_device=True)
    dm.setup()
    # a post-training step reads the loader before any trainer is attached: a CPU view, replaced later
    assert dm.train_dataloader().dataset.images.device.type == "cpu"
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=SimpleNamespace(root_device=torch.device("meta")))
    x, y = dm.train_dataloader().dataset.__getitems__([0, 1, 2])
    assert x.device.type == "meta" and y.device.type == "meta" and x.shape[0] == 3
