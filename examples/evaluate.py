#!/usr/bin/env python
"""Evaluate a trained FADA segmentor: mIoU / mAcc / overall accuracy, per-class IoU table, CSV, bar
chart, colour-coded prediction images (and optionally Cityscapes label-ID submission PNGs).

    python examples/evaluate.py --checkpoint results/adv/model_final.pth \\
        --data-root /data/cityscapes --output results/eval [--flip] [--multi-scale] [--save-images 20]

An official FADA checkpoint (github.com/JDAI-CV/FADA: no config inside) needs the config it was
trained with, and gives exactly the predictions of the official ``test.py``:

    python examples/evaluate.py --checkpoint model_iter040000.pth \
        --config examples/configs/deeplabv2_r101_adv.yaml --data-root /data/cityscapes --output results/eval

Without ``--data-root`` the checkpoint's config decides (``datasets.test_root`` /
``datasets.target_root``; if empty, the synthetic Cityscapes-layout data). Multi-GPU:
``torchrun --nproc_per_node=N examples/evaluate.py ...`` (each rank evaluates a shard; the
confusion matrix is summed across ranks).

Outputs under ``--output``: ``results.csv`` (per-class IoU/Acc + summary), ``confusion.csv``
(rows = ground truth), ``summary.json``, ``per_class_iou.png``, ``predictions/*.png`` and, with
``--save-label-ids``, ``label_ids/<city>/<name>.png`` (readable by cityscapesscripts'
``evalPixelLevelSemanticLabeling``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fada_examples import evaluation as E  # noqa: E402
from fada_core import plot  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="training checkpoint (.pth) of train_gta2city.py, or an official FADA checkpoint")
    p.add_argument("--config", default=None,
                   help="config for a checkpoint without one (official FADA release), e.g. "
                        "examples/configs/deeplabv2_r101_adv.yaml")
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                   help="config overrides applied to --config (e.g. model.num_classes=16)")
    p.add_argument("--flip", action="store_true", help="average with horizontally flipped inputs")
    p.add_argument("--multi-scale", action="store_true", help="average over input scales 0.7, 1.0, 1.3")
    p.add_argument("--scales", type=float, nargs="+", default=None, help="custom input scales")
    p.add_argument("--save-images", type=int, default=0, metavar="N", help="save N colour-coded predictions")
    p.add_argument("--save-label-ids", action="store_true",
                   help="write every prediction as a Cityscapes label-ID PNG under <output>/label_ids")
    p.add_argument("--official-check", action="store_true",
                   help="with --save-label-ids on Cityscapes: also score the saved PNGs with "
                        "cityscapesscripts' evalPixelLevelSemanticLabeling and print both mIoUs")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="run the networks under autocast (softmax and scores stay float32)")
    E.add_test_data_arguments(p)
    return p.parse_args(argv)


def load_models(path, device, config=None, overrides=()):
    """``(feature_extractor, classifier, cfg)``; ``config``/``overrides`` build the config of a
    checkpoint that carries none (an official FADA checkpoint); a checkpoint's own config wins."""
    from fada_examples.config import load_config
    from fada_examples.models import load_checkpoint_models

    given = load_config(config, overrides) if (config or overrides) else None
    features, classifier, cfg = load_checkpoint_models(path, device, given)
    if given is not None and cfg is not given:
        warnings.warn(f"{path} carries its own config; --config / overrides are not used for it")
    return features, classifier, cfg


def _base(dataset):
    return dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset


def _label_lut(dataset):
    return getattr(_base(dataset), "lut", None)


def _gt_files(dataset):
    """The ground-truth label files of the evaluated images, in order."""
    base = _base(dataset)
    indices = dataset.indices if isinstance(dataset, torch.utils.data.Subset) else range(len(dataset))
    return [base.samples[base.indices[i]].label for i in indices]


def _label_id_output(args, dataset, num_classes):
    """``(label_id_dir, trainId -> label-ID LUT)`` with --save-label-ids, else ``(None, None)``; and
    whether --official-check can run."""
    label_id_dir = lut = None
    if args.save_label_ids:
        id_lut = _label_lut(dataset)
        if id_lut is None:
            raise SystemExit("--save-label-ids: the data set has no label-ID look-up table")
        lut = E.invert_lut(id_lut, num_classes)
        label_id_dir = os.path.join(args.output, "label_ids")
    if args.official_check and not args.save_label_ids:
        raise SystemExit("--official-check needs --save-label-ids")
    if args.official_check and _base(dataset).__class__.__name__ != "CityscapesDataset":
        raise SystemExit("--official-check works on Cityscapes-layout data only")
    return label_id_dir, lut


def _report(result, args, dataset, names, scales, seconds, label_id_dir):
    """Rank 0, after the evaluation: the table and timing on stdout, the official cross-check if asked,
    and the files under --output."""
    print(E.format_table(result, names))
    thirteen = E.miou13(result, names)  # SYNTHIA protocol: mIoU16 and mIoU* of the 16-class model
    if thirteen is not None:
        result.extra["mIoU13"] = thirteen
    print(f"time: {seconds:.1f} s ({seconds / max(result.num_images, 1):.3f} s/image)")
    if args.official_check:
        # evaluate() all-reduces after every rank has written its PNGs, so all are on disk here
        result.extra["official"] = official = E.cityscapes_official_scores(label_id_dir, _gt_files(dataset))
        print(f"cityscapesscripts mIoU {100.0 * official['mIoU']:.2f} %   (this evaluation: "
              f"{100.0 * result.miou:.2f} %, difference {100.0 * abs(official['mIoU'] - result.miou):.2e} %)")
    E.write_results_csv(result, names, os.path.join(args.output, "results.csv"))
    np.savetxt(os.path.join(args.output, "confusion.csv"), result.confusion, fmt="%d", delimiter=",",
               header=",".join(names))
    with open(os.path.join(args.output, "summary.json"), "w") as handle:
        json.dump(_summary(result, args, names, scales, seconds), handle, indent=2)
    plot.plot_per_class_iou(result.iou, names, os.path.join(args.output, "per_class_iou.png"),
                            miou=result.miou, colors=E.default_palette(len(names)),
                            title=f"Per-class IoU — {os.path.basename(args.checkpoint)}")
    print(f"wrote {args.output}/results.csv, confusion.csv, summary.json, per_class_iou.png"
          + (f", predictions/ ({min(args.save_images, result.num_images)} images)" if args.save_images else "")
          + (", label_ids/" if label_id_dir else ""))


def _summary(result, args, names, scales, seconds):
    """summary.json: the settings, the scores (a NaN IoU as null) and the time taken."""
    summary = {"checkpoint": os.path.abspath(args.checkpoint), "images": result.num_images,
               "flip": args.flip, "scales": list(scales), "mIoU": result.miou, "mAcc": result.macc,
               "allAcc": result.allacc,
               "iou": {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, result.iou)},
               "seconds": seconds}
    if "mIoU13" in result.extra:
        summary["mIoU13"] = result.extra["mIoU13"]
    if "official" in result.extra:
        summary["cityscapesscripts_mIoU"] = result.extra["official"]["mIoU"]
    return summary


def main(argv=None):
    args = parse_args(argv)
    device, distributed = E.setup_device(args.device)
    rank = dist.get_rank() if distributed else 0
    feature_extractor, classifier, cfg = load_models(args.checkpoint, device, args.config, args.overrides)
    num_classes = int(cfg["model"]["num_classes"])
    names = E.class_names_for(num_classes)
    dataset, loader = E.eval_data_from_args(cfg, args, device, distributed)
    scales = tuple(args.scales) if args.scales else (E.MULTI_SCALES if args.multi_scale else (1.0,))
    label_id_dir, lut = _label_id_output(args, dataset, num_classes)
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        print(f"checkpoint: {args.checkpoint}\nimages: {len(dataset)}   classes: {num_classes}   "
              f"flip: {args.flip}   scales: {', '.join(f'{s:g}' for s in scales)}   device: {device}   "
              f"amp: {args.amp}")
    start = time.time()
    result = E.evaluate(feature_extractor, classifier, loader, num_classes, device=device, flip=args.flip,
                        scales=scales, output_dir=args.output, num_images_to_save=args.save_images,
                        distributed=distributed, ignore_index=int(cfg.get("input", {}).get("ignore_label", 255)),
                        label_id_dir=label_id_dir, trainid_to_labelid=lut, amp=args.amp)
    seconds = time.time() - start
    if rank == 0:
        _report(result, args, dataset, names, scales, seconds, label_id_dir)
    if distributed:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
