"""Class-balanced source sampling against an independent transcription of the official
GTA5DataSet / synthiaDataSet list construction (github.com/JDAI-CV/FADA, core/datasets/gta5.py)."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fada_examples.data.datasets import GTA5Dataset
from fada_examples.data.sampling import (BLOCK_SIZE, class_balanced_draws, class_lists_cache_name,
                                         load_class_lists, num_official_draws, source_draw_list)
from fada_examples.engine.sampling import IterationBatchSampler


def official_list(label_to_file, file_to_label, num_classes, max_iters, seed):
    """The official loop, transcribed: module-level np.random seeded once, lists mutated in place."""
    np.random.seed(seed)
    label_to_file = [list(f) for f in label_to_file]
    ind = {i: 0 for i in range(num_classes)}
    out = []
    for _ in range(int(max_iters / 3000) + 1):
        dist = np.zeros(num_classes)
        for _ in range(3000):
            d1 = dist.copy() if dist.sum() == 0 else dist / dist.sum()
            w = 1 / np.log(1 + 1e-2 + d1)
            w = w / w.sum()
            c = np.random.choice(num_classes, p=w)
            if ind[c] > len(label_to_file[c]) - 1:
                np.random.shuffle(label_to_file[c])
                ind[c] = ind[c] % (len(label_to_file[c]) - 1)
            f = label_to_file[c][ind[c]]
            out.append(f)
            ind[c] = ind[c] + 1
            dist[file_to_label[f]] += 1
    return out


def small_label_set(num_files=40, num_classes=6, seed=0):
    """Per-image class sets with a skewed class frequency (class 0 nearly everywhere, the last rare)."""
    rng = np.random.default_rng(seed)
    names = [f"{i:05d}.png" for i in range(num_files)]
    freq = np.linspace(0.95, 0.08, num_classes)
    file_to = {}
    for n in names:
        present = [c for c in range(num_classes) if rng.random() < freq[c]] or [0]
        file_to[n] = present
    for c in range(num_classes):  # every class in at least three images
        for n in names[3 * c: 3 * c + 3]:
            file_to[n] = sorted(set(file_to[n]) | {c})
    label_to = [[n for n in names if c in file_to[n]] for c in range(num_classes)]
    lists = {"format": "fada-class-lists-v1", "num_classes": num_classes, "files": names,
             "file_to_labels": file_to, "label_to_files": label_to}
    return names, lists


@pytest.mark.parametrize("max_iters,seed", [(100, 0), (6001, 3)])
def test_draws_are_the_official_list(max_iters, seed):
    names, lists = small_label_set()
    ours = [names[i] for _, i in class_balanced_draws(lists, names, max_iters, seed)]
    official = official_list(lists["label_to_files"], lists["file_to_labels"], 6, max_iters, seed)
    assert len(ours) == num_official_draws(max_iters) == (max_iters // BLOCK_SIZE + 1) * BLOCK_SIZE
    assert ours == official


def test_draw_statistics_follow_the_official_weighting():
    """Within a block, the drawn class follows 1/log(1.01 + p_c) of the running shares p_c."""
    names, lists = small_label_set(seed=1)
    draws = class_balanced_draws(lists, names, 5 * BLOCK_SIZE, seed=5)
    k = 6
    expected = np.zeros(k)
    counts = np.zeros(k)
    for t, (c, index) in enumerate(draws):
        if t % BLOCK_SIZE == 0:
            counts[:] = 0
        share = counts / counts.sum() if counts.sum() else counts
        w = 1 / np.log(1.01 + share)
        expected += w / w.sum()
        counts[lists["file_to_labels"][names[index]]] += 1
    observed = np.bincount([c for c, _ in draws], minlength=k)
    # chi-square of the class frequencies against the official probabilities (5 dof; 99.9% = 20.5)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (observed, expected)
    # and the point of it: the rare class is drawn far above its image frequency
    image_share = np.array([len(f) for f in lists["label_to_files"]]) / len(names)
    assert observed[-1] / len(draws) > 2 * image_share[-1] / image_share.sum()


def test_one_image_class_and_empty_class_are_defined():
    names = ["a.png", "b.png", "c.png"]
    file_to = {"a.png": [0], "b.png": [0, 1], "c.png": [0]}
    lists = {"num_classes": 3, "files": names, "file_to_labels": file_to,
             "label_to_files": [names, ["b.png"], []]}
    with pytest.warns(UserWarning, match=r"\[2\]"):
        draws = class_balanced_draws(lists, names, 10, seed=0)
    assert {c for c, _ in draws} == {0, 1}
    assert all(names[i] == "b.png" for c, i in draws if c == 1)


def test_ranks_shard_one_permutation_of_the_list():
    """Rank r's p-th item is draws[perm[r + W p]] (DistributedSampler over the shuffled list), so
    the ranks' batches of an iteration are, together, the 1-process batch of that iteration."""
    draws = list(range(100, 124))
    samplers = [IterationBatchSampler(24, 3, seed=4, stop_iter=4, rank=r, world_size=2, draws=draws)
                for r in range(2)]
    perm = samplers[0]._perm(0)
    per_rank = [[i for batch in sampler for i, _ in batch] for sampler in samplers]
    for r in range(2):
        assert per_rank[r] == [draws[perm[r + 2 * p]] for p in range(12)]
    single = list(IterationBatchSampler(24, 6, seed=4, stop_iter=4, draws=draws))
    for it in range(4):
        both = per_rank[0][3 * it: 3 * it + 3] + per_rank[1][3 * it: 3 * it + 3]
        assert sorted(both) == sorted(i for i, _ in single[it])
    # one process: a permutation of the whole list, and resuming continues it
    single = IterationBatchSampler(24, 4, seed=4, stop_iter=6, draws=draws)
    items = [i for batch in single for i, _ in batch]
    assert sorted(items) == draws
    resumed = IterationBatchSampler(24, 4, seed=4, start_iter=3, stop_iter=6, draws=draws)
    assert [i for batch in resumed for i, _ in batch] == items[12:]


def _write_gta5(root, n=6, size=(16, 12), seed=0):
    rng = np.random.default_rng(seed)
    ids = np.array([7, 8, 11, 21, 23, 26, 33])
    os.makedirs(root / "images"), os.makedirs(root / "labels")
    for i in range(n):
        name = f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / name)
        Image.fromarray(rng.choice(ids[: 2 + i], (size[1], size[0])).astype(np.uint8), mode="L").save(
            root / "labels" / name)


def test_auto_lists_computed_once_cached_and_read_back(tmp_path, capsys, monkeypatch):
    _write_gta5(tmp_path / "gta5")
    ds = GTA5Dataset(str(tmp_path / "gta5"))
    cache = tmp_path / "gta5" / class_lists_cache_name(19)
    with pytest.warns(UserWarning):  # not every class occurs in six tiny images
        first = source_draw_list("auto", ds, 100, seed=0, cache_dirs=[str(tmp_path / "gta5")], progress=False)
    assert "reading the 6 source labels once" in capsys.readouterr().out and cache.is_file()
    lists = load_class_lists(str(cache))
    assert lists["file_to_labels"]["00000.png"] == [0, 1]
    with pytest.warns(UserWarning):
        again = source_draw_list("auto", ds, 100, seed=0, cache_dirs=[str(tmp_path / "gta5")], progress=False)
    assert "reading" not in capsys.readouterr().out and again == first
    with pytest.warns(UserWarning):
        other_seed = source_draw_list("auto", ds, 100, seed=1, cache_dirs=[str(tmp_path / "gta5")])
    assert other_seed != first and len(first) == len(other_seed) == 3000
    assert source_draw_list("none", ds, 100, seed=0) is None
    # the official pickle reads as the same lists
    pkl = tmp_path / "gtav_label_info.p"
    with open(pkl, "wb") as f:
        pickle.dump((lists["label_to_files"], lists["file_to_labels"]), f)
    with pytest.warns(UserWarning):
        assert source_draw_list(str(pkl), ds, 100, seed=0) == first
    # a read-only data folder: cached beside the outputs instead
    ro = tmp_path / "ro"
    _write_gta5(ro)
    import fada_examples.data.sampling as S

    monkeypatch.setattr(S, "_writable", lambda folder: os.path.abspath(folder) != str(ro))
    with pytest.warns(UserWarning):
        source_draw_list("auto", GTA5Dataset(str(ro)), 10, 0, cache_dirs=[str(ro), str(tmp_path / "out")])
    assert (tmp_path / "out" / class_lists_cache_name(19)).is_file()
    assert not (ro / class_lists_cache_name(19)).exists()


def test_every_gta5_and_synthia_config_samples_class_balanced():
    from fada_examples.config import load_config

    folder = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "configs")
    for name in sorted(os.listdir(folder)):
        cfg = load_config(os.path.join(folder, name))
        if cfg["datasets"]["source"] in ("gta5", "synthia"):
            assert cfg["datasets"]["class_balanced_lists"] == "auto", name
