"""A fixed, class-stratified slice of a held-out split, for searches and fitness functions.

Selection (STP's KD-guided search, elite ranking) must read held-out *training* images — the
data module's `val_set`, carved from the training data — never the test set. The slice is drawn
in a seeded random order so it does not depend on how the split happens to be sorted.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Subset


def known_labels(dataset: Dataset) -> torch.Tensor | None:
    """Every label of `dataset` without loading an image, where the dataset keeps them
    (`labels`/`targets`, through Subsets and TransformSubsets); None otherwise."""
    for attr in ("labels", "targets"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels) == len(dataset):
            return torch.as_tensor(labels).long()
    base = getattr(dataset, "dataset", None)  # torch's Subset
    base = getattr(dataset, "base", None) if base is None else base  # prune_lab's TransformSubset
    indices = getattr(dataset, "indices", None)
    if base is not None and indices is not None:
        labels = known_labels(base)
        if labels is not None:
            return labels[torch.as_tensor(list(indices)).long()]
    return None


def stratified_indices(dataset: Dataset, size: int, seed: int = 0, num_classes: int | None = None) -> list[int]:
    """Indices of `size` samples of `dataset` (all of it if smaller) with class proportions as in
    the whole split (largest-remainder rounding). Without stored labels, samples are read in a
    seeded random order and each of `num_classes` classes takes up to an equal share until `size`
    are found."""
    n = len(dataset)
    if size >= n:
        return list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    labels = known_labels(dataset)
    if labels is not None:
        classes, counts = torch.unique(labels, return_counts=True)
        exact = counts.double() * size / n
        quota = exact.floor().long()
        for i in torch.argsort(exact - quota, descending=True, stable=True)[: size - int(quota.sum())]:
            quota[i] += 1
        left = dict(zip(classes.tolist(), quota.tolist()))
        picked = []
        for i in order:
            c = int(labels[i])
            if left[c] > 0:
                left[c] -= 1
                picked.append(i)
        return sorted(picked)
    quota = math.ceil(size / num_classes) if num_classes else size
    taken: dict[int, int] = {}
    picked, spare = [], []
    for i in order:
        c = int(dataset[i][1])
        if taken.get(c, 0) < quota:
            taken[c] = taken.get(c, 0) + 1
            picked.append(i)
            if len(picked) == size:
                break
        else:
            spare.append(i)
    return sorted((picked + spare)[:size])


def stratified_slice(dataset: Dataset, size: int, seed: int = 0, num_classes: int | None = None) -> Subset:
    return Subset(dataset, stratified_indices(dataset, size, seed, num_classes))
