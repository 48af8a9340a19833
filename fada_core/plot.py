"""Figures of per-class results: CCD of one or several models side by side, and per-class IoU.

matplotlib is optional: it is imported when a function here is called, and only
its object-oriented API is used (a :class:`~matplotlib.figure.Figure` on the Agg
canvas, no pyplot), so importing or calling this module never changes the
user's backend or global state. Every function returns the Figure and, given a
``path``, saves it there first (folders created).

Example::

    from fada_core import plot
    plot.plot_ccd({"source only": ccd_src.compute(), "FADA": ccd_fada.compute()}, names, "ccd.png")
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .functional import CCDResult

__all__ = ["plot_ccd", "plot_ccd_grid", "plot_per_class_iou"]

PerClass = Union[CCDResult, torch.Tensor, np.ndarray, Sequence[float]]


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fada_core.plot needs matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg, Patch


def _values(x: PerClass) -> np.ndarray:
    if isinstance(x, CCDResult):
        x = x.per_class
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _runs(results, class_names: Optional[Sequence[str]]):
    """``({label: result}, {label: (K,) values}, K class names)`` from one result or a mapping of
    several (insertion order kept), every one checked to have K values."""
    runs = dict(results) if isinstance(results, Mapping) else {"": results}
    if not runs:
        raise ValueError("results is empty: give one result or a mapping {label: result}")
    data = {label: _values(r) for label, r in runs.items()}
    k = len(next(iter(data.values())))
    for label, v in data.items():
        if len(v) != k:
            raise ValueError(f"{label!r} has {len(v)} per-class values, the first result {k}")
    return runs, data, _class_names(class_names, k)


def _class_names(class_names: Optional[Sequence[str]], k: int) -> list:
    if class_names is None:
        return [str(i) for i in range(k)]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class_names for {k} classes")
    return list(class_names)


def _class_axes(names: Sequence[str], figsize, ylabel: str, title: str):
    """``(figure, axes, x)``: one panel, a tick per class at ``x`` labelled with its name, a y grid."""
    Figure, _, _ = _matplotlib()
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax, x


def _finish(fig, path: Optional[str], dpi: int, rect=(0, 0, 1, 1)):
    _matplotlib()[1](fig)  # the Agg canvas: no pyplot, no backend change
    fig.tight_layout(rect=rect)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    return fig


def plot_per_class_iou(
    iou,
    class_names: Optional[Sequence[str]] = None,
    path: Optional[str] = None,
    *,
    title: Optional[str] = None,
    miou: Optional[float] = None,
    colors=None,
    dpi: int = 120,
):
    """Bar chart of per-class IoU in percent, NaN (absent class) marked "n/a", a dashed line at the mIoU.

    Args:
        iou: (K,) IoU in [0, 1] (tensor, array or list).
        class_names: K names (default: the indices).
        path: where to save the figure (optional).
        miou: the line's value (default: the mean of the finite IoUs).
        colors: optional (K, 3) uint8 palette for the bars.
    """
    values = _values(iou)
    names = _class_names(class_names, len(values))
    finite = np.isfinite(values)
    miou = _nanmean(values) if miou is None else miou
    pct = np.where(finite, values * 100.0, 0.0)
    fig, ax, x = _class_axes(names, (max(6.0, 0.5 * len(values) + 2), 4.2), "IoU (%)", title or "Per-class IoU")
    bar_colors = None
    if colors is not None:
        bar_colors = [tuple(np.asarray(c, dtype=float) / 255.0) for c in np.asarray(colors)[: len(values)]]
    bars = ax.bar(x, pct, color=bar_colors, edgecolor="black", linewidth=0.5)
    for xi, bar, ok, v in zip(x, bars, finite, pct):
        ax.text(xi, bar.get_height() + 1.0, f"{v:.1f}" if ok else "n/a", ha="center", va="bottom",
                fontsize=7, rotation=90)
    if np.isfinite(miou):
        ax.axhline(miou * 100.0, color="tab:red", linestyle="--", linewidth=1.0, label=f"mIoU {miou * 100.0:.2f} %")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, 110)
    return _finish(fig, path, dpi)


def plot_ccd(
    results: Union[PerClass, Mapping[str, PerClass]],
    class_names: Optional[Sequence[str]] = None,
    path: Optional[str] = None,
    *,
    title: Optional[str] = None,
    means: Optional[Mapping[str, float]] = None,
    log_scale: bool = False,
    dpi: int = 120,
):
    """The paper's CCD figure: per class, one bar per model (grouped), and a "mean" group.

    Args:
        results: a :class:`~fada_core.CCDResult` (or (K,) per-class CCD), or a
            mapping ``{label: result}`` for several models side by side. NaN
            (absent class) draws no bar.
        class_names: K names (default: the indices).
        path: where to save the figure (optional).
        means: each label's overall CCD (default: a CCDResult's ``mean``, else
            the mean of the finite per-class values).
        log_scale: logarithmic y axis.
    """
    runs, data, names = _runs(results, class_names)
    names = names + ["mean"]
    if means is None:
        means = {label: (r.mean if isinstance(r, CCDResult) else _nanmean(data[label])) for label, r in runs.items()}
    width = 0.8 / len(data)
    fig, ax, x = _class_axes(names, (max(7.0, 0.45 * len(names) * len(data) ** 0.5 + 2), 4.5),
                             "CCD (intra-class variance / centre distance$^2$)",
                             title or "Class Center Distance per class (lower is better)")
    for j, (label, v) in enumerate(data.items()):
        values = np.append(v, means[label])
        heights = np.where(np.isfinite(values), values, np.nan if log_scale else 0.0)
        ax.bar(x - 0.4 + width * (j + 0.5), heights, width=width, label=label or None, edgecolor="black",
               linewidth=0.3)
    if log_scale:
        ax.set_yscale("log")
    if any(data):
        ax.legend(fontsize=8)
    return _finish(fig, path, dpi)


def plot_ccd_grid(
    results: Union[PerClass, Mapping[str, PerClass]],
    class_names: Optional[Sequence[str]] = None,
    path: Optional[str] = None,
    *,
    title: Optional[str] = None,
    log_scale: bool = False,
    columns: int = 5,
    dpi: int = 110,
):
    """One small panel per class, one bar per model (same colours everywhere), each class at its
    own scale; absent classes read "absent". Arguments as :func:`plot_ccd`."""
    Figure, _, Patch = _matplotlib()
    _, data, names = _runs(results, class_names)
    k = len(names)
    labels = list(data)
    columns = max(1, min(columns, k))
    rows = (k + columns - 1) // columns
    fig = Figure(figsize=(2.4 * columns, 2.0 * rows + 0.8))
    colours = [f"C{j % 10}" for j in range(len(labels))]
    x = np.arange(len(labels))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, i + 1)
        values = np.array([data[label][i] for label in labels])
        finite = np.isfinite(values)
        if finite.any():
            ax.bar(x[finite], values[finite], color=[c for c, f in zip(colours, finite) if f])
            if log_scale:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "absent", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.tick_params(axis="y", labelsize=7)
    if any(labels):
        handles = [Patch(color=c, label=label) for c, label in zip(colours, labels)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title or "CCD per class (lower is better)", fontsize=11)
    return _finish(fig, path, dpi, rect=(0, 0.06, 1, 0.95))
