"""The test split is only for the final number: validation never overlaps it (by content) in any
data module, and search methods read no test image before the final test."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from prune_lab.data import (CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, FashionMNISTDataModule,
                            ImageNetDataModule, SyntheticDataModule)
from tests.conftest import compose_cfg
from tests.test_fashion_mnist import write_fashion


def digests(dataset) -> set[str]:
    out = set()
    for i in range(len(dataset)):
        image, _ = dataset[i]
        out.add(hashlib.sha1(np.ascontiguousarray(image.numpy().round(4)).tobytes()).hexdigest())
    return out


def write_cifar(root, cls, n_train=60, n_test=20):
    """Random (hence unique) images in the real pickle format."""
    rng = np.random.default_rng(0)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    key = "labels" if cls is CIFAR10DataModule.dataset_cls else "fine_labels"
    files = [(name, n_train // len(cls.train_list)) for name, _ in cls.train_list] + \
            [(name, n_test) for name, _ in cls.test_list]
    for name, n in files:
        labels = [i % 10 for i in range(n)]
        blob = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels}
        with open(folder / name, "wb") as f:
            pickle.dump(blob, f, protocol=2)
    meta = {"label_names": [str(i) for i in range(10)]} if key == "labels" else \
        {"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": [str(i) for i in range(20)]}
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump(meta, f, protocol=2)


def write_imagenet(root, classes=4, n_train=12, n_test=4, size=20, test_mark=255):
    """Random images; every test image (val/) has a marked top-left pixel: (test_mark, 0, 0)."""
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                if split == "val":
                    pixels[0, 0] = (test_mark, 0, 0)
                Image.fromarray(pixels).save(folder / f"{split}_{c}_{i}.png")


def built(name, tmp_path, fake_md5):
    if name == "digits":
        return DigitsDataModule()
    if name == "fashion_mnist":
        write_fashion(tmp_path / "fm")
        return FashionMNISTDataModule(root=str(tmp_path / "fm"), download=False, val_size=20,
                                      system_dir=str(tmp_path / "none"))
    if name in ("cifar10", "cifar100"):
        cls = CIFAR10DataModule if name == "cifar10" else CIFAR100DataModule
        write_cifar(tmp_path, cls.dataset_cls)
        return cls(root=str(tmp_path), download=False, val_size=10, augment=False)
    if name == "imagenet":
        write_imagenet(tmp_path)
        return ImageNetDataModule(root=str(tmp_path), image_size=16, val_size=8)
    return SyntheticDataModule(num_samples=64, image_size=8)


@pytest.mark.parametrize("name", ["digits", "fashion_mnist", "cifar10", "cifar100", "imagenet", "synthetic"])
def test_val_and_train_never_share_an_image_with_test(name, tmp_path, fake_md5):
    dm = built(name, tmp_path, fake_md5)
    dm.setup()
    test = digests(dm.test_set)
    assert len(test) == len(dm.test_set)  # the generated images are unique, so a shared hash is a shared image
    assert not digests(dm.val_set) & test
    assert not digests(dm.train_set) & test


@pytest.fixture
def fake_md5(monkeypatch):
    from torchvision.datasets import utils as tv_utils

    monkeypatch.setattr(tv_utils, "check_integrity", lambda *a, **k: True)
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.parametrize("method, extra", [
    pytest.param("unipts", ["method.population=4", "method.generations=2", "method.parents=2", "epochs=1"],
                 marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param("stp", ["epochs=1", *(f"method.callbacks.stp.{k}" for k in (
        "search_population=6", "search_generations=2", "search_parents=2", "pool_size=50", "search_images=8",
        "bn_images=16"))], marks=pytest.mark.slow),
])
def test_search_methods_read_no_test_image_before_the_final_test(method, extra, tmp_path, dense_dir, monkeypatch):
    import torchvision.datasets.folder as folder

    from prune_lab import pipeline

    write_imagenet(tmp_path / "imagenet")
    reads: list[str] = []
    original_loader, original_test = folder.pil_loader, pipeline._test

    def logged_loader(path):
        reads.append("test" if "/val/" in str(path) else "train")
        return original_loader(path)

    def logged_test(*args, **kwargs):
        reads.append("FINAL TEST")
        return original_test(*args, **kwargs)

    monkeypatch.setattr(folder, "pil_loader", logged_loader)
    monkeypatch.setattr(pipeline, "_test", logged_test)
    common = ["data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.image_size=16", "data.val_size=8",
              "data.batch_size=8", "data.num_workers=0", "model=resnet8", "dense.epochs=1", "latency.repeats=1",
              "latency.warmup=1", "callbacks.progress_bar.leave=false", "trainer.accelerator=cpu"]
    # the dense reference first (its own run, with its own final test), then the search method
    pipeline.run(compose_cfg([*common, "method=dense"], tmp_path / "dense_run", dense_dir))
    reads.clear()
    cfg = compose_cfg([*common, f"method={method}", "budget=0.5", "data.calibration_size=16", *extra],
                      tmp_path / "run", dense_dir)
    pipeline.run(cfg)
    assert "train" in reads and "FINAL TEST" in reads
    first_final = reads.index("FINAL TEST")
    assert "test" not in reads[:first_final], f"{reads[:first_final].count('test')} test images read before the final test"
    assert "test" in reads[first_final:]  # the final test does read them
