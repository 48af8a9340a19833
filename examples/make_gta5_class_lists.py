#!/usr/bin/env python
"""Compute the per-class image lists used for class-balanced source sampling.

Reads every label map of a GTA5 (or SYNTHIA) root once and writes a JSON file listing, for each
train ID, the images that contain it (the official code's ``gtav_label_info.p``). Training does
this by itself on first use (``datasets.class_balanced_lists=auto``, the default) and caches the
result as ``<root>/class_lists_<K>.json``, which is where this script writes by default: run it
ahead of time (e.g. with more processes, or where the data folder is writable) to skip that step.

    python examples/make_gta5_class_lists.py --root datasets/gta5 --workers 8
    python examples/make_gta5_class_lists.py --dataset synthia --root datasets/synthia --num-classes 16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fada_examples.data.datasets import GTA5Dataset, SynthiaDataset  # noqa: E402
from fada_examples.data.sampling import (class_lists_cache_name, compute_class_lists,  # noqa: E402
                                         save_class_lists)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="GTA5 root (images/, labels/) or SYNTHIA root")
    p.add_argument("--dataset", choices=("gta5", "synthia"), default="gta5")
    p.add_argument("--list", dest="list_path", default=None,
                   help="list file of image names (default: every image)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="19 (GTA5, default) or 16/13 (SYNTHIA protocols; SYNTHIA default 16)")
    p.add_argument("--output", default=None,
                   help="JSON path (default: <root>/class_lists_<K>.json, where training looks for it)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes reading labels")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.dataset == "gta5":
        dataset = GTA5Dataset(args.root, list_path=args.list_path,
                              num_classes=args.num_classes or 19)
    else:
        dataset = SynthiaDataset(args.root, num_classes=args.num_classes or 16,
                                 list_path=args.list_path)
    lists = compute_class_lists(dataset, num_workers=args.workers, progress=not args.quiet)
    output = args.output or os.path.join(args.root, class_lists_cache_name(dataset.num_classes))
    save_class_lists(lists, output)
    print(f"wrote {output}: {len(lists['files'])} images")
    for name, files in zip(lists["class_names"], lists["label_to_files"]):
        print(f"  {name:>15s}: {len(files)} images")
    return output


if __name__ == "__main__":
    main()
