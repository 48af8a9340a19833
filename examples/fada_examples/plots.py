"""Figures for evaluation and CCD analysis (matplotlib's Agg canvas; no pyplot global state, so
importing this module never changes the user's backend)."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = ["plot_per_class_iou", "plot_ccd_comparison", "plot_ccd_grid"]


def _values(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64)


def _save(fig: Figure, path: str, dpi: int) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def plot_per_class_iou(iou, class_names: Sequence[str], path: str, *, title: Optional[str] = None,
                       miou: Optional[float] = None, colors=None, dpi: int = 120) -> str:
    """Bar chart of per-class IoU in percent (classes absent everywhere are marked 'n/a'), a dashed
    line at the mIoU; returns ``path``. ``colors``: optional (K, 3) uint8 palette for the bars."""
    values = _values(iou)
    if len(class_names) != len(values):
        raise ValueError(f"{len(class_names)} class names for {len(values)} IoU values")
    finite = np.isfinite(values)
    if miou is None:
        miou = float(np.nanmean(values)) if finite.any() else float("nan")
    pct = np.where(finite, values * 100.0, 0.0)
    fig = Figure(figsize=(max(6.0, 0.5 * len(values) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(values))
    bar_colors = None
    if colors is not None:
        bar_colors = [tuple(np.asarray(c, dtype=float) / 255.0) for c in np.asarray(colors)[: len(values)]]
    bars = ax.bar(x, pct, color=bar_colors, edgecolor="black", linewidth=0.5)
    for xi, bar, ok, v in zip(x, bars, finite, pct):
        ax.text(xi, bar.get_height() + 1.0, f"{v:.1f}" if ok else "n/a", ha="center", va="bottom",
                fontsize=7, rotation=90)
    if np.isfinite(miou):
        ax.axhline(miou * 100.0, color="tab:red", linestyle="--", linewidth=1.0,
                   label=f"mIoU {miou * 100.0:.2f} %")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(class_names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 110)
    ax.set_title(title or "Per-class IoU")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_ccd_comparison(per_class: Mapping[str, object], class_names: Sequence[str], path: str, *,
                        title: Optional[str] = None, means: Optional[Mapping[str, float]] = None,
                        log_scale: bool = False, dpi: int = 120) -> str:
    """The paper's CCD figure: for every class, one bar per checkpoint (grouped), plus a 'mean'
    group. ``per_class`` maps a run label to its (K,) per-class CCD (NaN = class absent, drawn
    as no bar); ``means`` optionally gives each run's overall CCD (default: nanmean)."""
    labels = list(per_class)
    if not labels:
        raise ValueError("per_class is empty")
    data = {k: _values(v) for k, v in per_class.items()}
    k = len(class_names)
    for lab, v in data.items():
        if len(v) != k:
            raise ValueError(f"run {lab!r} has {len(v)} values for {k} classes")
    if means is None:
        means = {lab: (float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")) for lab, v in data.items()}
    names = list(class_names) + ["mean"]
    x = np.arange(len(names))
    n = len(labels)
    width = 0.8 / n
    fig = Figure(figsize=(max(7.0, 0.45 * len(names) * max(1, n) ** 0.5 + 2), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for j, lab in enumerate(labels):
        values = np.append(data[lab], means[lab])
        heights = np.where(np.isfinite(values), values, np.nan if log_scale else 0.0)
        ax.bar(x - 0.4 + width * (j + 0.5), heights, width=width, label=lab, edgecolor="black", linewidth=0.3)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("CCD (intra-class variance / centre distance$^2$)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or "Class Center Distance per class (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_ccd_grid(per_class: Mapping[str, object], class_names: Sequence[str], path: str, *,
                  title: Optional[str] = None, log_scale: bool = False, columns: int = 5,
                  dpi: int = 110) -> str:
    """One small bar chart per class (one bar per checkpoint, same colours in every panel), so
    each class's CCD can be compared across checkpoints at its own scale. Absent classes show
    'absent'."""
    labels = list(per_class)
    if not labels:
        raise ValueError("per_class is empty")
    data = {k: _values(v) for k, v in per_class.items()}
    k = len(class_names)
    for lab, v in data.items():
        if len(v) != k:
            raise ValueError(f"run {lab!r} has {len(v)} values for {k} classes")
    columns = max(1, min(columns, k))
    rows = (k + columns - 1) // columns
    fig = Figure(figsize=(2.4 * columns, 2.0 * rows + 0.8))
    colours = [f"C{j % 10}" for j in range(len(labels))]
    x = np.arange(len(labels))
    for i, name in enumerate(class_names):
        ax = fig.add_subplot(rows, columns, i + 1)
        values = np.array([data[lab][i] for lab in labels])
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
    handles = [Patch(color=c, label=lab) for c, lab in zip(colours, labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(title or "CCD per class (lower is better)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _save(fig, path, dpi)
