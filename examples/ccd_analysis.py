#!/usr/bin/env python
"""Class Center Distance (CCD) of one or several checkpoints on labelled target data — the paper's
analysis of how compact each class is in feature space (lower is better).

    python examples/ccd_analysis.py --checkpoint results/src/model_final.pth results/adv/model_final.pth \\
        --labels source-only FADA --data-root /data/cityscapes --output results/ccd

For every checkpoint the features of the target validation images (the feature extractor's output,
labels brought to the feature size by nearest) are streamed into ``fada_core.ClassCenterDistance``.
Multi-GPU: ``torchrun --nproc_per_node=N examples/ccd_analysis.py ...`` (the metric merges ranks).

Outputs under ``--output``: ``ccd_<label>.csv`` (class, pixel count, CCD_i), ``ccd_matrix_<label>.csv``
(K x K CCD(i, j)), ``ccd_per_class.csv`` (all checkpoints side by side), ``ccd_per_class.png``
(grouped bars per class, one per checkpoint) and ``ccd_per_class_grid.png`` (one small bar chart
per class).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fada_examples import analysis as A  # noqa: E402
from fada_examples import evaluation as E  # noqa: E402
from fada_core import plot  # noqa: E402
from fada_examples.engine import distributed as D  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+", help="one or more training checkpoints (.pth)")
    p.add_argument("--labels", nargs="+", default=None,
                   help="one label per checkpoint for tables and plots (default: file names)")
    p.add_argument("--backend", default="auto", choices=("auto", "kernel", "eager"),
                   help="fada_core backend for the class statistics")
    p.add_argument("--log-scale", action="store_true", help="logarithmic CCD axis in the figures")
    E.add_test_data_arguments(p)
    return p.parse_args(argv)


def _file_label(path: str) -> str:
    base = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return f"{parent}/{base}" if parent else base


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def main(argv=None):
    args = parse_args(argv)
    from fada_examples.models import load_checkpoint_models

    labels = args.labels or [_file_label(c) for c in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.checkpoint)} checkpoints")
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--labels must be distinct, got {labels}")
    device, distributed = D.setup_device(args.device)
    rank = D.rank()

    results = {}
    names = None
    loader = None
    num_classes = None
    for label, ckpt in zip(labels, args.checkpoint):
        feature_extractor, _, cfg = load_checkpoint_models(ckpt, device)
        k = int(cfg["model"]["num_classes"])
        if num_classes is None:
            num_classes = k
            names = E.class_names_for(k)
            dataset, loader = E.eval_data_from_args(cfg, args, device, distributed)  # the first config's data
            if rank == 0:
                print(f"images: {len(dataset)}   classes: {k}   device: {device}")
        elif k != num_classes:
            raise SystemExit(f"{ckpt}: {k} classes, but {args.checkpoint[0]} has {num_classes}")
        start = time.time()
        result = A.class_center_analysis(feature_extractor, loader, k, device=device, backend=args.backend,
                                         ignore_index=int(cfg.get("input", {}).get("ignore_label", 255)),
                                         desc=f"ccd {label}")
        results[label] = result
        if rank == 0:
            print(f"{label}: mean CCD {result.mean:.4f} ({time.time() - start:.1f} s)")
            slug = _slug(label)
            A.write_ccd_csv(result, names, os.path.join(args.output, f"ccd_{slug}.csv"))
            A.write_ccd_matrix_csv(result, names, os.path.join(args.output, f"ccd_matrix_{slug}.csv"))
        del feature_extractor
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if rank == 0:
        print(A.format_ccd_comparison(results, names, counts_from=labels[0]))
        A.write_ccd_comparison_csv(results, names, os.path.join(args.output, "ccd_per_class.csv"))
        plot.plot_ccd(results, names, os.path.join(args.output, "ccd_per_class.png"), log_scale=args.log_scale)
        plot.plot_ccd_grid(results, names, os.path.join(args.output, "ccd_per_class_grid.png"),
                           log_scale=args.log_scale)
        print(f"wrote {args.output}/ccd_per_class.csv, ccd_per_class.png, ccd_per_class_grid.png and "
              f"per-checkpoint ccd_<label>.csv / ccd_matrix_<label>.csv")
    D.barrier()
    D.cleanup()
    return results


if __name__ == "__main__":
    main()
