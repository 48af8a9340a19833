"""Class Center Distance (CCD) analysis of a feature extractor on labelled target data.

The paper's analysis (FADA, section 4 / Fig. 5): for target-domain features with ground-truth
labels, CCD(i, j) = [mean_{x in S_i} ||x - mu_i||^2] / ||mu_i - mu_j||^2, per class
CCD_i = mean_{j != i} CCD(i, j), lower = tighter classes relative to their separation.

The statistics are streamed batch by batch into :class:`fada_core.ClassCenterDistance` (labels at
image resolution are resized nearest to the feature size by the metric); under torch.distributed
each rank feeds its shard and ``compute()`` merges the ranks.
"""
from __future__ import annotations

import csv
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from fada_core import ClassCenterDistance

from .engine.distributed import is_main
from .tables import format_number, resolve_class_names as _names

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

__all__ = [
    "class_center_analysis",
    "write_ccd_csv",
    "write_ccd_matrix_csv",
    "write_ccd_comparison_csv",
    "format_ccd_table",
    "format_ccd_comparison",
]


@torch.no_grad()
def class_center_analysis(feature_extractor, loader, num_classes: int, *, device,
                          ignore_index: int = 255, backend: str = "auto", progress: bool = True,
                          desc: str = "ccd"):
    """Stream ``feature_extractor`` features of ``loader``'s images into a ClassCenterDistance.

    Args:
        feature_extractor: ``feature_extractor(x) -> (B, C, h, w)``.
        loader: yields ``(image (B,3,H,W), label (B,H',W') int[, names])``. Under DDP give each
            rank a disjoint shard (e.g. ``evaluation.build_eval_loader(..., distributed=True)``).
        num_classes: K.
        device: where the model runs and the statistics accumulate.
    Returns:
        fada_core's CCD result (``matrix`` (K,K), ``per_class`` (K,), ``mean``, ``present``,
        ``counts`` = pixels per class at feature resolution), reduced over all ranks when a
        process group is initialised. The model is in eval mode for the run and restored after.
    """
    device = torch.device(device)
    metric = ClassCenterDistance(num_classes, ignore_index=ignore_index, backend=backend).to(device)
    was_training = feature_extractor.training
    feature_extractor.eval()
    iterator = loader
    if progress and tqdm is not None:
        iterator = tqdm(loader, desc=desc, unit="batch", disable=not is_main(), dynamic_ncols=True)
    try:
        for batch in iterator:
            if isinstance(batch, dict):
                image, label = batch["image"], batch["label"]
            else:
                image, label = batch[0], batch[1]
            image = image.to(device, non_blocking=True)
            label = label.to(device, non_blocking=True).long()
            features = feature_extractor(image)
            metric.update(features.float(), label)
    finally:
        feature_extractor.train(was_training)
    return metric.compute()


# --------------------------------------------------------------------------------------------
# writers / tables
# --------------------------------------------------------------------------------------------
def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def _parent(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_ccd_csv(result, class_names: Optional[Sequence[str]], path: str) -> str:
    """One row per class: class_id, class, count (pixels at feature resolution), present, ccd;
    a final row ``mean`` with the mean CCD over present classes."""
    per_class = _np(result.per_class)
    counts = _np(result.counts)
    present = _np(result.present).astype(bool)
    names = _names(class_names, len(per_class))
    _parent(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "class", "count", "present", "ccd"])
        for i, name in enumerate(names):
            writer.writerow([i, name, int(counts[i]), int(present[i]), format_number(per_class[i])])
        writer.writerow(["", "mean", int(counts.sum()), int(present.sum()), format_number(result.mean)])
    return path


def write_ccd_matrix_csv(result, class_names: Optional[Sequence[str]], path: str) -> str:
    """The K x K matrix CCD(i, j) (row i = the class whose spread is measured), NaN where
    undefined, with class names as header and first column."""
    matrix = _np(result.matrix)
    names = _names(class_names, matrix.shape[0])
    _parent(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class"] + names)
        for i, name in enumerate(names):
            writer.writerow([name] + [format_number(v) for v in matrix[i]])
    return path


def write_ccd_comparison_csv(results: Mapping[str, object], class_names: Optional[Sequence[str]],
                             path: str) -> str:
    """Per-class CCD of several checkpoints side by side: columns class_id, class, one per run;
    a final ``mean`` row."""
    labels = list(results)
    if not labels:
        raise ValueError("results is empty")
    per_class = {k: _np(r.per_class) for k, r in results.items()}
    names = _names(class_names, len(next(iter(per_class.values()))))
    _parent(path)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class_id", "class"] + labels)
        for i, name in enumerate(names):
            writer.writerow([i, name] + [format_number(per_class[k][i]) for k in labels])
        writer.writerow(["", "mean"] + [format_number(results[k].mean) for k in labels])
    return path


def format_ccd_table(result, class_names: Optional[Sequence[str]] = None) -> str:
    """Per-class CCD (dimensionless ratio, lower is better) and pixel counts as a text table."""
    return format_ccd_comparison({"CCD": result}, class_names, counts_from="CCD")


def format_ccd_comparison(results: Mapping[str, object], class_names: Optional[Sequence[str]] = None,
                          counts_from: Optional[str] = None) -> str:
    """Text table: one row per class, one CCD column per run (dimensionless, lower is better);
    with ``counts_from`` a column of that run's pixel counts (at feature resolution)."""
    labels = list(results)
    per_class = {k: _np(r.per_class) for k, r in results.items()}
    k = len(next(iter(per_class.values())))
    names = _names(class_names, k)
    width = max(12, max(len(n) for n in names))
    cols = [max(10, len(lab)) for lab in labels]
    header = f"{'id':>3}  {'class':<{width}}"
    if counts_from is not None:
        header += f"  {'pixels (feat.)':>14}"
    header += "".join(f"  {lab:>{w}}" for lab, w in zip(labels, cols))
    lines = [header, "-" * len(header)]
    counts = _np(results[counts_from].counts) if counts_from is not None else None
    for i, name in enumerate(names):
        row = f"{i:>3}  {name:<{width}}"
        if counts is not None:
            row += f"  {int(counts[i]):>14d}"
        row += "".join(f"  {_cell(per_class[lab][i]):>{w}}" for lab, w in zip(labels, cols))
        lines.append(row)
    lines.append("-" * len(header))
    row = f"{'':>3}  {'mean CCD':<{width}}" + ("  " + " " * 14 if counts is not None else "")
    row += "".join(f"  {_cell(results[lab].mean):>{w}}" for lab, w in zip(labels, cols))
    lines.append(row)
    lines.append("CCD = intra-class variance / squared distance between class centres "
                 "(dimensionless; lower = more compact classes)")
    return "\n".join(lines)


def _cell(value) -> str:
    return format_number(value, ".4f", nan="n/a")
