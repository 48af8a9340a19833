"""fada_core.plot: figures written from CCD results and IoU, matplotlib imported only when called."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fada_core import ClassCenterDistance

pytest.importorskip("matplotlib", reason="matplotlib is not installed (fada_core.plot needs it)")
PIL = pytest.importorskip("PIL.Image", reason="pillow is needed to read the figures back")

from fada_core import plot  # noqa: E402

NAMES = [f"class {i}" for i in range(6)]


def _nontrivial_png(path, min_size=(300, 200)):
    assert os.path.isfile(path) and os.path.getsize(path) > 5000
    img = np.asarray(PIL.open(path).convert("RGB"))
    assert img.shape[1] >= min_size[0] and img.shape[0] >= min_size[1]
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def _ccd(seed):
    g = torch.Generator().manual_seed(seed)
    metric = ClassCenterDistance(6, backend="eager")
    labels = torch.randint(0, 6, (2, 8, 8), generator=g)
    labels[labels == 2] = 255  # class 2 absent: no bar
    metric.update(torch.randn(2, 4, 8, 8, generator=g) + labels.clamp(max=5)[:, None], labels)
    return metric.compute()


def test_ccd_of_several_models_side_by_side(tmp_path):
    results = {"source only": _ccd(0), "FADA": _ccd(1)}
    fig = plot.plot_ccd(results, NAMES, str(tmp_path / "sub" / "ccd.png"))
    _nontrivial_png(str(tmp_path / "sub" / "ccd.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES + ["mean"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["source only", "FADA"]
    # the "mean" group holds each result's own mean
    heights = [p.get_height() for p in ax.patches]
    assert heights[6] == pytest.approx(results["source only"].mean) and heights[13] == pytest.approx(results["FADA"].mean)
    plot.plot_ccd(results, NAMES, str(tmp_path / "log.png"), log_scale=True)
    _nontrivial_png(str(tmp_path / "log.png"))
    grid = plot.plot_ccd_grid(results, NAMES, str(tmp_path / "grid.png"), columns=3)
    _nontrivial_png(str(tmp_path / "grid.png"))
    assert len(grid.axes) == 6


def test_one_result_tensors_and_default_names(tmp_path):
    fig = plot.plot_ccd(_ccd(0))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:2] == ["0", "1"]
    plot.plot_ccd(torch.tensor([1.0, 0.5, float("nan")]), path=str(tmp_path / "one.png"))
    assert os.path.isfile(tmp_path / "one.png")
    with pytest.raises(ValueError, match="3 per-class values, the first result 6"):
        plot.plot_ccd({"a": _ccd(0), "b": np.ones(3)})
    with pytest.raises(ValueError, match="2 class_names for 6 classes"):
        plot.plot_ccd(_ccd(0), ["a", "b"])
    with pytest.raises(ValueError, match="results is empty"):
        plot.plot_ccd({})


def test_per_class_iou(tmp_path):
    iou = np.array([0.9, 0.5, np.nan, 0.2, 0.0, 0.66])
    colors = np.stack([np.arange(6) * 40, np.full(6, 100), 255 - np.arange(6) * 40], axis=1).astype(np.uint8)
    fig = plot.plot_per_class_iou(iou, NAMES, str(tmp_path / "iou.png"), colors=colors)
    _nontrivial_png(str(tmp_path / "iou.png"))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "n/a" in texts and "90.0" in texts
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == f"mIoU {np.nanmean(iou) * 100:.2f} %"


def test_missing_matplotlib_is_a_clear_error():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fada_core import plot\n"
            "try:\n    plot.plot_ccd([1.0, 2.0])\n"
            "except ImportError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "fada_core.plot needs matplotlib" in run.stdout, run.stderr[-2000:]
