"""Base class shared by every image-classification data module in prune_lab."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from prune_lab.errors import PruneLabError


class TensorImageDataset(Dataset):
    """Images already held in memory as one float32 tensor (N, C, H, W) plus labels.

    Labels come back as plain ``int`` so every data module yields the same
    ``(float32 image, int label)`` pairs, whatever its storage.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.float().contiguous()
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class BatchedTensors(Dataset):
    """Our loaders' view of a dataset held as tensors: a batch is one indexing op (DataLoader's
    `__getitems__` protocol) instead of a Python call and a collation per image, on whatever
    device the tensors live (`data.on_device`). The batches are those of the per-image path,
    element for element; `dm.train_set` itself stays a plain per-image dataset for other code."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    @classmethod
    def of(cls, dataset: Dataset) -> Optional["BatchedTensors"]:
        """The view of a TensorImageDataset (or a Subset of one, e.g. a calibration subset); None
        for datasets that decode or transform per image."""
        if isinstance(dataset, TensorImageDataset):
            return cls(dataset.images, dataset.labels)
        if isinstance(dataset, Subset):
            inner = cls.of(dataset.dataset)
            if inner is not None:
                idx = torch.as_tensor(dataset.indices, dtype=torch.long)
                return cls(inner.images[idx], inner.labels[idx])
        return None

    def to(self, device: torch.device) -> "BatchedTensors":
        return BatchedTensors(self.images.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return self.images[idx], self.labels[idx]


def whole_batch(batch):
    """Collation of a batch `BatchedTensors` already assembled: none."""
    return batch


class TransformSubset(Dataset):
    """A subset of a dataset of PIL images, with its own transform.

    Lets train and validation share one loaded copy of a training file while
    using different transforms (augmentation for train, none for val).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Optional[Callable]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


def calibration_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """`size` samples drawn with replacement by a generator seeded with `seed` (post-training
    methods see only these), or the whole set when it is not larger than `size`.

    A Subset keeps the dataset's own transform, so train augmentation still applies.
    """
    if len(dataset) <= size:
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randint(len(dataset), (size,), generator=generator).tolist())


def stratified_split(labels, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest, held-out) index tensors: `holdout` indices drawn stratified by class, fixed by `seed`.

    Validation and search slices are carved this way so every class is represented in
    proportion; when stratification is impossible (a class with one image, or fewer held-out
    images than classes, as in tiny test trees) the draw is a plain seeded permutation.
    """
    from sklearn.model_selection import train_test_split

    labels = torch.as_tensor(labels).cpu().numpy()
    index = list(range(len(labels)))
    try:
        rest, held = train_test_split(index, test_size=int(holdout), stratify=labels, random_state=int(seed))
    except ValueError:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(int(seed))).tolist()
        held, rest = order[: int(holdout)], order[int(holdout):]
    return torch.as_tensor(sorted(rest), dtype=torch.long), torch.as_tensor(sorted(held), dtype=torch.long)


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch (Lightning's stateful-loader protocol).

    `state_dict()` records the sampler's epoch and how many batches of it were served. The data
    module stores it in every checkpoint and gives it back to the first training loader it makes
    on resume (Lightning builds the loader, and an iterator of it, before it restores its loops,
    so its own stateful-loader hand-over comes too late): that loader's iterator then starts after
    the batches already trained on, with the same per-epoch order (the sampler draws it from
    `(seed, epoch)`), without loading the skipped ones. Creating the iterator of a resumed epoch
    leaves the global torch RNG as it was: in the uninterrupted run that draw (DataLoader's base
    seed) happened at the start of the epoch, before the checkpoint.
    Random augmentation inside worker processes (num_workers > 0) is not part of the state, so
    a mid-epoch resume is exact when the workers draw no random numbers (digits, num_workers=0).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already served)

    def __iter__(self):
        resume, self._resume = self._resume, None
        if resume is None or resume[1] >= len(self):  # a fresh epoch (also after an epoch-end checkpoint)
            return self._counted(super().__iter__(), 0)
        return self._resumed(*resume)

    def _resumed(self, epoch: int, skip: int):
        # a generator: runs at the first next(), after Lightning set the sampler's epoch
        if int(getattr(self.sampler, "epoch", 0)) != epoch:
            raise RuntimeError(f"resuming epoch {epoch} of the training data, but the sampler is at epoch "
                               f"{getattr(self.sampler, 'epoch', 0)}")
        indices = list(iter(self.sampler))[skip * self.batch_size:]
        rest = DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, drop_last=self.drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=self.collate_fn)
        state = torch.get_rng_state()
        iterator = iter(rest)
        torch.set_rng_state(state)
        yield from self._counted(iterator, skip)

    def _counted(self, iterator, start: int):
        self.served = start
        for batch in iterator:
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "served": int(self.served)}

    # Lightning's hand-over, when it happens before the iterator is made (reloaded loaders)

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["served"]))


class ClassificationDataModule(L.LightningDataModule):
    """Train/val/test image classification data for one dataset.

    Subclasses set ``name``, ``num_classes``, ``channels`` and ``image_size``
    (square images) in ``__init__`` so models can be built before ``setup``,
    and fill ``train_set``/``val_set``/``test_set`` in ``setup``.

    Shuffling goes through a ``DistributedSampler`` even on one device: its
    order depends only on ``(seed, epoch)``, so a run resumed from a checkpoint
    sees the same batches as an uninterrupted one. The trainer must be built
    with ``use_distributed_sampler=False`` so Lightning keeps this sampler
    (it still calls ``set_epoch`` on it every epoch).

    ``calibration_size`` (post-training mode): when set, ``train_set`` is
    replaced by a calibration subset of that many samples (see
    ``calibration_subset``) the moment a subclass assigns it, so every dataset
    supports it without code of its own; val and test are untouched.
    """

    name: str = "base"
    tensor_data: bool = False  # the splits are TensorImageDatasets (no per-image decoding or transforms)
    num_classes: int = 0
    channels: int = 0
    image_size: int = 0

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        calibration_size: Optional[int] = None,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise PruneLabError(f"data.batch_size={batch_size} must be a positive integer")
        if eval_batch_size is not None and int(eval_batch_size) < 1:
            raise PruneLabError(f"data.eval_batch_size={eval_batch_size} must be a positive integer or null")
        if int(num_workers) < 0:
            raise PruneLabError(f"data.num_workers={num_workers} must be >= 0")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else None
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        if calibration_size is not None and (isinstance(calibration_size, bool) or int(calibration_size) < 1):
            raise PruneLabError(f"data.calibration_size={calibration_size} must be a positive integer or null "
                                "(null: the whole train set)")
        self.calibration_size = None if calibration_size is None else int(calibration_size)
        # the data as tensors on the training device (a GPU: no host-to-device copy per batch)
        self.on_device = bool(on_device)
        if self.on_device and not self.tensor_data:
            raise PruneLabError(f"data.on_device=true: {type(self).__name__} decodes or transforms images one by one; "
                                "only data held as tensors can live on the device (digits, fashion_mnist, synthetic)")
        if self.on_device and self.num_workers:
            raise PruneLabError(f"data.on_device=true needs data.num_workers=0 (got {num_workers}): the batches "
                                "are cut from tensors on the device, in the training process")
        self._views: dict = {}
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self._resume_loader: Optional[dict] = None

    # position in the training epoch, kept in checkpoints (see ResumableLoader)
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        loader = trainer.train_dataloader if trainer is not None and trainer.state.fn == "fit" else None
        return {"train_loader": loader.state_dict()} if isinstance(loader, ResumableLoader) else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume_loader = state.get("train_loader")

    @property
    def train_set(self) -> Optional[Dataset]:
        return self._train_set

    @train_set.setter
    def train_set(self, dataset: Optional[Dataset]) -> None:
        # the whole training split's size, also when a calibration subset replaces it (training cost
        # is counted in epochs of the whole split)
        self.full_train_size = 0 if dataset is None else len(dataset)
        if dataset is not None and self.calibration_size is not None:
            dataset = calibration_subset(dataset, self.calibration_size, self.seed)
        self._train_set = dataset

    # ------------------------------------------------------------------ API

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A zero batch shaped like the model input (for tracing, FLOP counts)."""
        return torch.zeros(batch_size, self.channels, self.image_size, self.image_size)

    def check(self) -> None:
        """Raise PruneLabError (one line) if the data is not available.

        Called by the pipeline before any training, so a missing dataset is
        reported in seconds rather than after the model has been built.
        """

    def setup(self, stage: Optional[str] = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------- dataloaders

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _require(self, dataset: Optional[Dataset], split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{split}_set is not built: call setup() first")
        return dataset

    def _loader_kwargs(self) -> dict:
        return dict(
            num_workers=self.num_workers,
            # Re-spawning workers every epoch costs seconds on big datasets.
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available() and not self.on_device,
        )

    def _served(self, dataset: Dataset) -> tuple[Dataset, dict]:
        """What a loader reads and its extra arguments: the batched tensor view where the dataset is
        held as tensors (moved to the trainer's device with `on_device`), else the dataset itself."""
        trainer = getattr(self, "trainer", None)
        # on_device: the trainer's device, known only once a trainer is attached (a post-training step
        # reads the calibration loader before); a view made for another device is replaced
        device = trainer.strategy.root_device if self.on_device and trainer is not None else torch.device("cpu")
        key = id(dataset)
        if key not in self._views or self._views[key][0] is not dataset or self._views[key][1] != device:
            view = BatchedTensors.of(dataset)
            self._views[key] = (dataset, device, None if view is None else view.to(device))
        view = self._views[key][2]
        return (dataset, {}) if view is None else (view, {"collate_fn": whole_batch})

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_set, "train")
        world_size, rank = self._world()
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=self.seed, drop_last=False
        )
        # A final batch of one sample crashes BatchNorm in training mode
        # ("Expected more than 1 value per channel"); drop it only then.
        per_device = self.per_device_batch_size(world_size)
        drop_last = len(sampler) > per_device and len(sampler) % per_device == 1
        served, extra = self._served(dataset)
        loader = ResumableLoader(
            served, batch_size=per_device, sampler=sampler, drop_last=drop_last, **self._loader_kwargs(), **extra
        )
        if self._resume_loader is not None:  # the first loader after a restore is the trainer's
            loader.load_state_dict(self._resume_loader)
            self._resume_loader = None
        return loader

    def per_device_batch_size(self, world_size: int) -> int:
        """`batch_size` is the global batch: learning rates and step counts then mean the same
        thing on one device and on N (DESIGN.md §6)."""
        if self.batch_size % world_size:
            raise PruneLabError(f"data.batch_size={self.batch_size} is not divisible by the {world_size} devices; "
                                f"it is the global batch, split evenly across devices")
        return self.batch_size // world_size

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        served, extra = self._served(dataset)
        return DataLoader(
            served, batch_size=self.eval_batch_size or self.batch_size, shuffle=False, **self._loader_kwargs(), **extra
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.val_set, "val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.test_set, "test"))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes}, "
            f"channels={self.channels}, image_size={self.image_size}, batch_size={self.batch_size})"
        )
