"""ClassCenterDistance against a float64 NumPy computation over the whole data set."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import fada_core.functional as FF
from fada_core import ClassCenterDistance

K, C = 5, 6
OFFSET = 1e3


def numpy_ccd(features_list, labels_list, num_classes, ignore_index=255):
    """CCD straight from the definition (FADA_SPEC.md), on all pixels at once, two-pass float64."""
    xs, ys = [], []
    for f, y in zip(features_list, labels_list):
        f = f.double().numpy()
        y = y.numpy()
        xs.append(f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1]))
        ys.append(y.reshape(-1))
    x, y = np.concatenate(xs), np.concatenate(ys)
    keep = y != ignore_index
    x, y = x[keep], y[keep]
    present = np.array([(y == k).any() for k in range(num_classes)])
    mu = np.stack([x[y == k].mean(0) if present[k] else np.zeros(x.shape[1]) for k in range(num_classes)])
    var = np.array([((x[y == k] - mu[k]) ** 2).sum(1).mean() if present[k] else np.nan for k in range(num_classes)])
    matrix = np.full((num_classes, num_classes), np.nan)
    for i in range(num_classes):
        for j in range(num_classes):
            if i != j and present[i] and present[j]:
                matrix[i, j] = var[i] / ((mu[i] - mu[j]) ** 2).sum()
    per_class = np.array([np.nanmean(matrix[i]) if present[i] else np.nan for i in range(num_classes)])
    return matrix, per_class, np.nanmean(per_class), present


def make_batches(seed, n_batches=4, absent=3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(K, C, generator=g) * 3
    feats, labels = [], []
    for _ in range(n_batches):
        y = torch.randint(0, K, (2, 7, 9), generator=g)
        y[y == absent] = 0  # one class never appears
        y[torch.rand(2, 7, 9, generator=g) < 0.15] = 255  # ignore pixels
        f = centers[y.clamp(max=K - 1)].permute(0, 3, 1, 2) + torch.randn(2, C, 7, 9, generator=g)
        feats.append((f + OFFSET).double())
        labels.append(y)
    return feats, labels


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_streaming_ccd_matches_numpy_with_offset_absent_class_and_ignore(backend):
    feats, labels = make_batches(0)
    metric = ClassCenterDistance(K, backend=backend)
    for f, y in zip(feats, labels):
        metric.update(f, y)
    r = metric.compute()
    matrix, per_class, mean, present = numpy_ccd(feats, labels, K)
    np.testing.assert_array_equal(r.present.numpy(), present)
    assert not present[3] and np.isnan(r.per_class[3].item())
    np.testing.assert_allclose(r.matrix.numpy(), matrix, rtol=1e-9)
    np.testing.assert_allclose(r.per_class.numpy(), per_class, rtol=1e-9)
    assert r.mean == pytest.approx(mean, rel=1e-9)
    expected_counts = [sum(int((y == k).sum()) for y in labels) for k in range(K)]
    assert r.counts.tolist() == expected_counts


def test_float32_features_with_large_offset_stay_exact():
    """A naive E[x^2] - E[x]^2 in float64 over float32 inputs at offset 1e4 loses digits; ours doesn't."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, C, 16, 16, generator=g) * 1e-2 + 1e4
    y = torch.randint(0, 2, (2, 16, 16), generator=g)
    metric = ClassCenterDistance(2)
    for i in range(2):
        metric.update(f[i : i + 1], y[i : i + 1])
    _, per_class, _, _ = numpy_ccd([f], [y], 2)
    np.testing.assert_allclose(metric.compute().per_class.numpy(), per_class, rtol=1e-7)


def test_labels_at_image_resolution_are_resized_nearest():
    feats, labels = make_batches(2, n_batches=1)
    big = labels[0].repeat_interleave(4, 1).repeat_interleave(4, 2)  # (2, 28, 36)
    a, b = ClassCenterDistance(K), ClassCenterDistance(K)
    a.update(feats[0], labels[0])
    b.update(feats[0], big)
    torch.testing.assert_close(a.compute().matrix, b.compute().matrix, equal_nan=True)


def test_forward_returns_batch_value_and_accumulates():
    feats, labels = make_batches(3, n_batches=2)
    metric = ClassCenterDistance(K)
    first = metric(feats[0], labels[0])
    _, per_class, _, _ = numpy_ccd(feats[:1], labels[:1], K)
    np.testing.assert_allclose(first.per_class.numpy(), per_class, rtol=1e-9)
    metric(feats[1], labels[1])
    _, both, _, _ = numpy_ccd(feats, labels, K)
    np.testing.assert_allclose(metric.compute().per_class.numpy(), both, rtol=1e-9)


def test_reset_and_state_dict_round_trip():
    feats, labels = make_batches(4, n_batches=2)
    metric = ClassCenterDistance(K)
    metric.update(feats[0], labels[0])
    restored = ClassCenterDistance(K)
    restored.load_state_dict(metric.state_dict())
    for m in (metric, restored):
        m.update(feats[1], labels[1])
    torch.testing.assert_close(restored.compute().matrix, metric.compute().matrix, equal_nan=True)
    metric.reset()
    assert metric.counts.sum() == 0 and metric.means.shape == (K, 0)
    with pytest.raises(RuntimeError, match="no data"):
        metric.compute()


def test_result_repr_is_one_short_line():
    feats, labels = make_batches(4, n_batches=1)
    metric = ClassCenterDistance(K)
    metric.update(feats[0], labels[0])
    r = metric.compute()
    text = repr(r)
    assert text == f"CCDResult(mean={r.mean:.6g}, present={int(r.present.sum())}/{K} classes)"
    assert "\n" not in text and len(text) < 80


def test_batch_split_does_not_change_the_result():
    feats, labels = make_batches(5, n_batches=3)
    whole = ClassCenterDistance(K)
    whole.update(torch.cat(feats), torch.cat(labels))
    parts = ClassCenterDistance(K)
    for f, y in zip(feats, labels):
        parts.update(f, y)
    torch.testing.assert_close(parts.compute().matrix, whole.compute().matrix, equal_nan=True, rtol=1e-10, atol=0)


def test_merge_is_chan_exact():
    a = FF.ClassCenterStats(torch.tensor([2.0]).double(), torch.tensor([[1.0]]).double(), torch.tensor([2.0]).double())
    b = FF.ClassCenterStats(torch.tensor([1.0]).double(), torch.tensor([[4.0]]).double(), torch.tensor([0.0]).double())
    m = FF.merge_class_center_stats(a, b)  # data {0, 2, 4}: mean 2, m2 = 4 + 0 + 4 = 8
    assert m.counts.item() == 3 and m.means.item() == 2.0 and m.m2.item() == pytest.approx(8.0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats, labels = make_batches(7, n_batches=4)
        metric = ClassCenterDistance(K, backend="eager")
        for f, y in list(zip(feats, labels))[rank::world]:  # shard the batches over ranks
            metric.update(f, y)
        r = metric.compute()
        torch.save({"matrix": r.matrix, "per_class": r.per_class, "mean": r.mean}, f"{result_path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_ranks_equal_single_process(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path / "r")), nprocs=world, join=True)
    feats, labels = make_batches(7, n_batches=4)
    single = ClassCenterDistance(K, backend="eager")
    for f, y in zip(feats, labels):
        single.update(f, y)
    expected = single.compute()
    for rank in range(world):
        got = torch.load(tmp_path / f"r.{rank}")
        torch.testing.assert_close(got["matrix"], expected.matrix, equal_nan=True, rtol=1e-10, atol=0)
        assert got["mean"] == pytest.approx(expected.mean, rel=1e-10)
