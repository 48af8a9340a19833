"""Class-balanced sampling of source images (GTA5, SYNTHIA), as in the official code.

:func:`compute_class_lists` reads every label map once and records which train IDs each image
contains (the official ``gtav_label_info.p``, stored here as JSON). The draw picks a class, then
the next image of that class's shuffled list (cycling and reshuffling when exhausted), so rare
classes are seen as often as common ones. ``mode="uniform"`` picks the class uniformly among the
classes that occur; ``mode="official"`` uses the official weights ``1 / log(1.01 + p_c)``, ``p_c``
the share of class ``c`` among the classes of the images drawn so far in the current sub-epoch of
3000 draws.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .io import check_file

__all__ = ["compute_class_lists", "save_class_lists", "load_class_lists",
           "class_balanced_indices", "class_balanced_draws", "ClassBalancedSampler", "make_class_balanced"]

_FORMAT = "fada-class-lists-v1"
_SUB_EPOCH = 3000

_worker_dataset = None  # per worker process only: threads of one process share it


def _init_worker(dataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset


def _dataset_classes(ds, index: int) -> list[int]:
    train_ids = ds.load_label(index)
    present = np.unique(train_ids)
    return [int(c) for c in present if c < ds.num_classes]


def _classes_of(index: int) -> list[int]:
    return _dataset_classes(_worker_dataset, index)


def compute_class_lists(dataset, num_workers: int = 0, progress: bool = False) -> dict:
    """Per-class image lists of a :class:`~.datasets.SegmentationDataset` (labels read once).

    Returns a JSON-able dict: ``num_classes``, ``class_names``, ``files`` (sample names),
    ``label_to_files`` (for each train ID, the names of the images that contain it) and
    ``file_to_labels`` (for each name, its sorted train IDs).
    """
    n = len(dataset.samples)
    if num_workers and num_workers > 1 and n > 1:
        with ProcessPoolExecutor(num_workers, initializer=_init_worker,
                                 initargs=(dataset,)) as pool:
            it = pool.map(_classes_of, range(n), chunksize=max(1, n // (8 * num_workers)))
            per_file = list(_progress(it, n, progress))
    else:
        per_file = [_dataset_classes(dataset, i) for i in _progress(range(n), n, progress)]
    names = [s.name for s in dataset.samples]
    label_to_files: list[list[str]] = [[] for _ in range(dataset.num_classes)]
    for name, classes in zip(names, per_file):
        for c in classes:
            label_to_files[c].append(name)
    return {
        "format": _FORMAT,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "files": names,
        "label_to_files": label_to_files,
        "file_to_labels": dict(zip(names, per_file)),
    }


def _progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is an examples dependency
        return iterable
    return tqdm(iterable, total=total, desc="labels", unit="img")


def save_class_lists(lists: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(lists, f)
    os.replace(tmp, path)


def load_class_lists(path: str) -> dict:
    check_file(path, "class-list file")
    with open(path, "r", encoding="utf-8") as f:
        lists = json.load(f)
    if lists.get("format") != _FORMAT or "label_to_files" not in lists:
        raise ValueError(f"{path} is not a class-list file written by make_gta5_class_lists.py")
    return lists


def class_balanced_indices(lists: dict, names: Sequence[str], num_samples: int, seed: int = 0,
                           mode: str = "uniform") -> list[int]:
    """``num_samples`` indices into ``names``, drawn class-balanced from ``lists``.

    Files of the lists that are not in ``names`` (for example outside a list file) are skipped;
    classes with no remaining file are never drawn.
    """
    return [index for _, index in class_balanced_draws(lists, names, num_samples, seed, mode)]


def class_balanced_draws(lists: dict, names: Sequence[str], num_samples: int, seed: int = 0,
                         mode: str = "uniform") -> list[tuple[int, int]]:
    """As :func:`class_balanced_indices`, with the drawn class: ``[(class, index), ...]``."""
    if mode not in ("uniform", "official"):
        raise ValueError(f"mode must be 'uniform' or 'official', got {mode!r}")
    position = {n: i for i, n in enumerate(names)}
    per_class = [[position[f] for f in files if f in position] for files in lists["label_to_files"]]
    classes = [c for c, files in enumerate(per_class) if files]
    if not classes:
        raise ValueError("no image of the class lists is in this data set; were the lists "
                         "computed for another data set?")
    file_classes = {position[f]: cs for f, cs in lists["file_to_labels"].items() if f in position}
    rng = np.random.default_rng(seed)
    queues = {c: [] for c in classes}
    num_classes = len(per_class)
    counts = np.zeros(num_classes)
    out: list[tuple[int, int]] = []
    for k in range(int(num_samples)):
        if mode == "uniform":
            c = classes[int(rng.integers(len(classes)))]
        else:
            if k % _SUB_EPOCH == 0:
                counts[:] = 0
            share = counts / counts.sum() if counts.sum() > 0 else counts
            w = np.zeros(num_classes)
            w[classes] = 1.0 / np.log(1.0 + 1e-2 + share[classes])
            c = int(rng.choice(num_classes, p=w / w.sum()))
        if not queues[c]:
            queues[c] = list(rng.permutation(per_class[c]))
        index = int(queues[c].pop())
        out.append((c, index))
        if mode == "official":
            counts[file_classes.get(index, [])] += 1
    return out


class ClassBalancedSampler(Sampler[int]):
    """A sampler over a data set's distinct samples (``names``), class-balanced per epoch.

    Each epoch draws ``num_samples`` indices with seed ``seed + epoch``; call
    :meth:`set_epoch` to change the draw (as with ``DistributedSampler``).
    """

    def __init__(self, lists: dict, names: Sequence[str], num_samples: int, seed: int = 0,
                 mode: str = "uniform"):
        self.lists, self.names = lists, list(names)
        self.num_samples, self.seed, self.mode = int(num_samples), int(seed), mode
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(class_balanced_indices(self.lists, self.names, self.num_samples,
                                           self.seed + self.epoch, self.mode))

    def __len__(self) -> int:
        return self.num_samples


def make_class_balanced(dataset, lists, num_samples: int, seed: int = 0,
                         mode: str = "uniform"):
    """Re-index ``dataset`` (a :class:`~.datasets.SegmentationDataset`) in place to a
    class-balanced draw of ``num_samples`` items and return it; ``lists`` a dict or JSON path."""
    if isinstance(lists, (str, os.PathLike)):
        lists = load_class_lists(lists)
    dataset.indices = class_balanced_indices(lists, dataset.names, num_samples, seed, mode)
    return dataset
