"""Fashion-MNIST: the idx format on small generated files (gzipped or not), the source order,
the one-line error, the splits; and the real files from Debian's package when installed."""
from __future__ import annotations

import gzip
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from prune_lab.data import FashionMNISTDataModule
from prune_lab.data.fashion_mnist import DEBIAN_DIR, FILES
from prune_lab.errors import PruneLabError


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx format as LeCun's page defines it: 0, 0, type 0x08 (ubyte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train: int = 200, n_test: int = 50, gz: bool = True, seed: int = 0) -> dict:
    """Images whose pixels encode (split, index): every image is unique and traceable."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = 0 if split == "train" else 255
        images[:, 0, 1:3] = np.stack([np.arange(n) // 256, np.arange(n) % 256], 1)
        labels = np.arange(n) % 10
        data[split] = (images, labels)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(arr)
            name = f"{split}-{kind}"
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(raw)
            else:
                (folder / name).write_bytes(raw)
    return data


def module(root, **kw) -> FashionMNISTDataModule:
    kw.setdefault("system_dir", str(Path(root) / "no-system-dir"))
    kw.setdefault("download", False)
    kw.setdefault("val_size", 20)
    kw.setdefault("image_size", 28)
    return FashionMNISTDataModule(root=str(root), **kw)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_in_root_are_read(tmp_path, gz):
    data = write_fashion(tmp_path, gz=gz)
    dm = module(tmp_path)
    dm.check()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (180, 20, 50)
    # the test split is exactly the t10k file, in order, normalised with train statistics
    expected = (torch.from_numpy(data["t10k"][0]).float() / 255 - dm.mean) / dm.std
    assert torch.allclose(dm.test_set.images[:, 0], expected, atol=1e-5)
    assert dm.test_set.labels.tolist() == data["t10k"][1].tolist()
    # val is stratified: 2 images of each of the 10 classes
    assert Counter(dm.val_set.labels.tolist()) == {c: 2 for c in range(10)}


def test_system_dir_is_the_second_source_and_is_decompressed_once(tmp_path):
    write_fashion(tmp_path / "debian")
    dm = module(tmp_path / "root", system_dir=str(tmp_path / "debian"))
    dm.check()
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert sorted(os.listdir(raw)) == sorted(FILES)
    stamp = (raw / FILES[0]).stat().st_mtime_ns
    module(tmp_path / "root", system_dir=str(tmp_path / "debian")).check()
    assert (raw / FILES[0]).stat().st_mtime_ns == stamp
    dm.setup()
    assert len(dm.test_set) == 50


def test_root_wins_over_system_dir(tmp_path):
    write_fashion(tmp_path / "root", n_test=30, seed=1)
    write_fashion(tmp_path / "debian", n_test=50, seed=2)
    dm = module(tmp_path / "root", system_dir=str(tmp_path / "debian"))
    dm.check()
    dm.setup()
    assert len(dm.test_set) == 30


def test_missing_files_name_both_routes_in_one_line(tmp_path):
    with pytest.raises(PruneLabError) as err:
        module(tmp_path / "empty").check()
    msg = str(err.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "empty") in msg and "train-images-idx3-ubyte.gz" in msg and "data.download=false" in msg


def test_splits_are_fixed_by_split_seed_not_run_seed(tmp_path):
    write_fashion(tmp_path)
    a, b, c = module(tmp_path, seed=0, train_size=100), module(tmp_path, seed=5, train_size=100), \
        module(tmp_path, seed=0, train_size=100, split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.images, b.val_set.images) and torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(a.val_set.images, c.val_set.images)
    assert len(a.train_set) == 100 and Counter(a.train_set.labels.tolist()) == {k: 10 for k in range(10)}


def test_resize_and_bad_sizes(tmp_path):
    write_fashion(tmp_path)
    dm = module(tmp_path, image_size=16)
    dm.setup()
    assert dm.train_set.images.shape[1:] == (1, 16, 16) and dm.example_input(2).shape == (2, 1, 16, 16)
    assert abs(float(dm.train_set.images.mean())) < 1e-4  # normalised with train statistics
    with pytest.raises(PruneLabError, match="val_size=0 must be >= 1"):
        module(tmp_path, val_size=0)
    with pytest.raises(PruneLabError, match="train_size=500 exceeds"):
        module(tmp_path, train_size=500).setup()


def test_real_files_from_debian_package(tmp_path):
    if not os.path.isdir(DEBIAN_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"{DEBIAN_DIR} missing: .ci/run installs dataset-fashion-mnist")
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    dm = FashionMNISTDataModule(root=str(tmp_path), download=False, image_size=16, train_size=20000)
    dm.check()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20000, 5000, 10000)
    assert Counter(dm.test_set.labels.tolist()) == {k: 1000 for k in range(10)}
