"""Class-balanced sampling of source images (GTA5, SYNTHIA), exactly as the official code.

The official ``GTA5DataSet`` / ``synthiaDataSet`` (``core/datasets/gta5.py``, ``synthia.py``) build
their training list once, from per-class image lists (``gtav_label_info.p``: for each train ID the
images containing it, and for each image its train IDs):

* the list has ``(int(MAX_ITER * BATCH_SIZE / 3000) + 1) * 3000`` entries, drawn in blocks of
  3000; at the start of a block the class counts are reset;
* each draw picks class ``c`` with probability proportional to ``1 / log(1.01 + p_c)``, ``p_c``
  being class ``c``'s share of all class occurrences (each drawn image adds one to each class it
  contains) so far in the block (all classes equal at the start of a block);
* then the next image of class ``c``'s list: the lists start in their stored order; when one is
  exhausted it is shuffled and the position restarts at ``len % (len - 1)`` (that is 1: the first
  image of the new order is skipped, a quirk kept here);
* the DataLoader shuffles the finished list (``shuffle=True`` on one GPU; with DDP
  ``DistributedSampler`` gives rank ``r`` the positions ``r, r + W, ...`` of a permutation shared by
  all ranks). The official ranks each build their list from their own unseeded random state; here
  the list is seeded and shared by the ranks, so a W-GPU run sees per iteration the images a
  1-GPU run with the same global batch sees (each rank's images are distributed as officially).

:func:`class_balanced_draws` reproduces the draw with numpy's ``RandomState`` in the official
order (``choice(K, p=w)``, ``shuffle``), so for the same seed and lists it returns the official list
itself (tests/examples/test_sampling.py checks this against a transcription). Two cases the
official code cannot run are defined here: a class with no image is never drawn (the official code
raises IndexError; a warning says which), a class with one image restarts at position 0 (official:
ZeroDivisionError).

:func:`compute_class_lists` reads every label map once (the official ``generate_*_label_info.py``),
stored as JSON; :func:`load_class_lists` also reads the official pickles. :func:`source_draw_list`
is what training calls: ``"auto"`` computes the lists on first use (progress bar) and caches them
beside the data (or the outputs when the data folder is read-only).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from .io import check_file

__all__ = ["compute_class_lists", "save_class_lists", "load_class_lists", "num_official_draws",
           "class_balanced_indices", "class_balanced_draws", "ClassBalancedSampler",
           "source_draw_list", "class_lists_cache_name", "BLOCK_SIZE"]

_FORMAT = "fada-class-lists-v1"
BLOCK_SIZE = 3000  # the official SUB_EPOCH_SIZE

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
    ``label_to_files`` (for each train ID, the names of the images that contain it, in the data
    set's order) and ``file_to_labels`` (for each name, its sorted train IDs).
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
    return tqdm(iterable, total=total, desc="class lists (labels read once)", unit="img")


def save_class_lists(lists: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(lists, f)
    os.replace(tmp, path)


class _PlainUnpickler(pickle.Unpickler):
    """The official label-info pickles hold only lists, dicts, str and int: refuse anything else."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a class-list pickle")


def _from_official_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        label_to_file, file_to_label = _PlainUnpickler(f).load()
    from .labels import class_names

    k = len(label_to_file)
    try:
        names = list(class_names(k))
    except ValueError:
        names = [f"class_{i}" for i in range(k)]
    return {"format": _FORMAT, "num_classes": k, "class_names": names, "files": list(file_to_label),
            "label_to_files": [list(files) for files in label_to_file],
            "file_to_labels": {f: sorted(int(c) for c in cs) for f, cs in file_to_label.items()}}


def load_class_lists(path: str) -> dict:
    """Class lists from JSON (:func:`save_class_lists`) or an official pickle
    (``gtav_label_info.p`` / ``synthia_label_info.p``, whose list order gives the official draw)."""
    check_file(path, "class-list file")
    if str(path).endswith((".p", ".pkl", ".pickle")):
        return _from_official_pickle(path)
    with open(path, "r", encoding="utf-8") as f:
        lists = json.load(f)
    if lists.get("format") != _FORMAT or "label_to_files" not in lists:
        raise ValueError(f"{path} is not a class-list file written by make_gta5_class_lists.py")
    return lists


def num_official_draws(num_images: int) -> int:
    """Length of the official list for ``num_images`` = MAX_ITER x BATCH_SIZE images."""
    return (int(num_images / BLOCK_SIZE) + 1) * BLOCK_SIZE


def class_balanced_draws(lists: dict, names: Sequence[str], num_images: int,
                         seed: int = 0) -> list[tuple[int, int]]:
    """The official class-balanced list as ``[(class, index into names), ...]``.

    ``num_images``: MAX_ITER x BATCH_SIZE; the list has :func:`num_official_draws` entries.
    Files of the lists that are not in ``names`` (outside a list file) are left out.
    """
    position = {n: i for i, n in enumerate(names)}
    per_class = [[position[f] for f in files if f in position] for files in lists["label_to_files"]]
    k = len(per_class)
    empty = [c for c in range(k) if not per_class[c]]
    if len(empty) == k:
        raise ValueError("no image of the class lists is in this data set; were the lists "
                         "computed for another data set?")
    if empty:
        names_of = lists.get("class_names") or [str(c) for c in range(k)]
        warnings.warn(f"class-balanced sampling: classes {empty} ({', '.join(names_of[c] for c in empty)}) "
                      f"occur in no image and are never drawn", stacklevel=3)
    file_classes = [np.zeros(0, dtype=np.int64)] * len(names)
    for f, cs in lists["file_to_labels"].items():
        if f in position:
            file_classes[position[f]] = np.asarray(cs, dtype=np.int64)
    rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)
    ind = [0] * k
    out: list[tuple[int, int]] = []
    for _ in range(num_official_draws(num_images) // BLOCK_SIZE):
        counts = np.zeros(k)
        for _ in range(BLOCK_SIZE):
            total = counts.sum()
            share = counts.copy() if total == 0 else counts / total
            w = 1 / np.log(1 + 1e-2 + share)
            if empty:
                w[empty] = 0.0
            w = w / w.sum()
            # rng.choice(k, p=w) without its argument checks: the same one uniform draw, the
            # same cdf search, so the same class (and stream) at a fraction of the cost.
            cdf = w.cumsum()
            cdf /= cdf[-1]
            c = int(cdf.searchsorted(rng.random_sample(), side="right"))
            members = per_class[c]
            if ind[c] > len(members) - 1:
                rng.shuffle(members)
                ind[c] = ind[c] % (len(members) - 1) if len(members) > 1 else 0
            index = members[ind[c]]
            ind[c] += 1
            out.append((c, index))
            counts[file_classes[index]] += 1
    return out


def class_balanced_indices(lists: dict, names: Sequence[str], num_images: int, seed: int = 0) -> list[int]:
    """The indices of :func:`class_balanced_draws`."""
    return [index for _, index in class_balanced_draws(lists, names, num_images, seed)]


class ClassBalancedSampler(Sampler[int]):
    """A sampler over a data set's distinct samples (``names``): the official class-balanced list
    for ``num_images``, in a random order (the official DataLoader's ``shuffle=True``).

    Each epoch draws anew with seed ``seed + epoch``; call :meth:`set_epoch` to change it.
    """

    def __init__(self, lists: dict, names: Sequence[str], num_images: int, seed: int = 0):
        self.lists, self.names = lists, list(names)
        self.num_images, self.seed = int(num_images), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed + self.epoch
        draws = class_balanced_indices(self.lists, self.names, self.num_images, seed)
        order = np.random.default_rng(seed).permutation(len(draws))
        return iter([draws[i] for i in order])

    def __len__(self) -> int:
        return num_official_draws(self.num_images)


# ------------------------------------------------------------------------------------------------
# what training calls
# ------------------------------------------------------------------------------------------------
def class_lists_cache_name(num_classes: int) -> str:
    """File name of the cached lists of a ``num_classes`` protocol (beside the data)."""
    return f"class_lists_{int(num_classes)}.json"


def _lists_fit(lists: dict, dataset) -> bool:
    files = set(lists.get("files", ()))
    return lists.get("num_classes") == dataset.num_classes and all(n in files for n in dataset.names)


def _writable(folder: str) -> bool:
    return os.path.isdir(folder) and os.access(folder, os.W_OK)


def _auto_lists(dataset, cache_dirs: Sequence[str], progress: bool, num_workers: int) -> dict:
    """The cached lists that fit ``dataset``, else computed now (rank 0) and cached."""
    import torch.distributed as dist

    name = class_lists_cache_name(dataset.num_classes)
    candidates = [os.path.join(d, name) for d in cache_dirs if d]
    distributed = dist.is_available() and dist.is_initialized()

    def cached() -> Optional[dict]:
        for path in candidates:
            if os.path.isfile(path):
                lists = load_class_lists(path)
                if _lists_fit(lists, dataset):
                    return lists
        return None

    lists = cached()
    if lists is None and (not distributed or dist.get_rank() == 0):
        target = next((p for p in candidates if _writable(os.path.dirname(p))), None)
        print(f"class-balanced sampling: reading the {len(dataset.samples)} source labels once"
              + (f" (cached in {target})" if target else " (no writable cache folder)"), flush=True)
        lists = compute_class_lists(dataset, num_workers=num_workers, progress=progress)
        if target:
            save_class_lists(lists, target)
    if distributed:
        dist.barrier()
        if lists is None:
            lists = cached()
            if lists is None:
                raise RuntimeError(f"class lists were not found in {candidates} after rank 0 wrote them: "
                                   f"the cache folder must be shared by all ranks")
    return lists


def source_draw_list(setting: str, dataset, num_images: int, seed: int, *,
                     cache_dirs: Sequence[str] = (), progress: bool = True,
                     num_workers: int = 0) -> Optional[list[int]]:
    """The class-balanced source list (indices into ``dataset.samples``), or None.

    Args:
        setting: ``datasets.class_balanced_lists``: ``"auto"`` (the default: official sampling for
            GTA5 and SYNTHIA, whose lists are computed on first use and cached under
            ``cache_dirs``; None for other sources, which the official code does not balance),
            a path (JSON of ``make_gta5_class_lists.py`` or an official ``*_label_info.p``), or
            ``""`` / ``"none"`` (off: plain shuffled image list, not the official pipeline).
        dataset: the source :class:`~.datasets.SegmentationDataset` (distinct samples).
        num_images: ``solver.max_iter x solver.batch_size`` (global), the official ``max_iters``.
        seed: seed of the draw (the same list on every rank; the sampler shards it).
    """
    from .datasets import GTA5Dataset, SynthiaDataset

    setting = str(setting or "").strip()
    if setting.lower() in ("", "none", "off", "false"):
        return None
    if setting.lower() == "auto":
        if not isinstance(dataset, (GTA5Dataset, SynthiaDataset)):
            return None
        lists = _auto_lists(dataset, cache_dirs, progress, num_workers)
    else:
        lists = load_class_lists(setting)
    if len(dataset) != len(dataset.names):
        raise ValueError("class-balanced sampling needs a data set without repeated indices")
    return class_balanced_indices(lists, dataset.names, num_images, seed)
