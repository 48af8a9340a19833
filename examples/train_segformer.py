#!/usr/bin/env python
"""FADA on a SegFormer (MiT encoder, all-MLP decoder; Hugging Face transformers), end to end on
the synthetic GTA5 -> Cityscapes pair: a source-only warm-up, then fine-grained adversarial
iterations through ``fada_core.adapters.SegformerAdapter`` and ``fada_core.AdversarialStep``,
with the target mIoU and mean Class Center Distance before and after adaptation.

    pip install transformers && python examples/train_segformer.py

The model is randomly initialised (nothing is downloaded; ``--mit tiny`` by default, ``--mit b0``
for MiT-b0's shape). With ImageNet MiT weights, build the model with
``SegformerForSemanticSegmentation.from_pretrained(...)`` instead and keep the rest.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fada_examples.data import build_dataset, build_transforms, make_synthetic_data  # noqa: E402
from fada_examples.evaluation import confusion_matrix, scores_from_confusion  # noqa: E402

from fada_core import (  # noqa: E402
    AdversarialStep,
    ClassCenterDistance,
    FineGrainedAdversary,
    FineGrainedDiscriminator,
    UpsampledCrossEntropy,
)
from fada_core.adapters import SegformerAdapter  # noqa: E402

NUM_CLASSES = 19
MIT = {  # hidden sizes, depths, attention heads, decoder width
    "tiny": ([16, 32, 64, 128], [1, 1, 1, 1], [1, 2, 4, 8], 64),
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], [1, 2, 5, 8], 256),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=None, help="synthetic data folder (default: a temporary one)")
    p.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("W", "H"))
    p.add_argument("--mit", choices=sorted(MIT), default="tiny")
    p.add_argument("--features", choices=("decoder", "encoder"), default="decoder",
                   help="what the discriminator judges (SegformerAdapter's features)")
    p.add_argument("--source-iterations", type=int, default=60)
    p.add_argument("--adapt-iterations", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ndf", type=int, default=64, help="discriminator width (FADA: 256)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_data(args, root):
    """Infinite source and target training streams, and the labelled target validation loader."""
    size = tuple(args.size)
    paths = make_synthetic_data(root, num_source=16, num_target_train=12, num_target_val=6, size=size, seed=0)
    train_tf = build_transforms(train=True, resize=size)
    source = build_dataset("gta5", paths["source"], transform=train_tf)
    target = build_dataset("cityscapes", paths["target"], "train", transform=train_tf)
    val = build_dataset("cityscapes", paths["target"], "val",
                        transform=build_transforms(train=False, resize=size, resize_label=True))

    def forever(dataset):
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
        return itertools.chain.from_iterable(itertools.repeat(loader))

    return forever(source), forever(target), DataLoader(val, batch_size=args.batch_size)


def build_model(args):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    hidden, depths, heads, decoder = MIT[args.mit]
    config = SegformerConfig(num_labels=NUM_CLASSES, hidden_sizes=hidden, depths=depths,
                             num_attention_heads=heads, decoder_hidden_size=decoder)
    return SegformerAdapter(SegformerForSemanticSegmentation(config), features=args.features)


@torch.no_grad()
def evaluate(net, loader):
    """Target mIoU (logits upsampled as Hugging Face does) and mean CCD of the adapter's features."""
    net.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    ccd = ClassCenterDistance(NUM_CLASSES)
    for images, labels, _ in loader:
        features, logits = net(images)
        logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                                 align_corners=net.align_corners)
        confusion += confusion_matrix(logits.argmax(1), labels, NUM_CLASSES, check=False)
        ccd.update(features, labels)
    net.train()
    return scores_from_confusion(confusion).miou, ccd.compute().mean


def warm_up(args, net, source, optimizer):
    """Source only: the supervised loss at T = 1."""
    seg_loss = UpsampledCrossEntropy()
    for _ in range(args.source_iterations):
        images, labels, _ = next(source)
        loss = seg_loss(net(images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def adapt(args, net, source, target, optimizer):
    """FADA: supervised (T = 1.8) + 0.001 x adversarial for the network, then the discriminator."""
    discriminator = FineGrainedDiscriminator(num_classes=NUM_CLASSES, ndf=args.ndf)  # in_channels: lazy
    step = AdversarialStep(net, FineGrainedAdversary(discriminator), optimizer,
                           torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99)))
    losses = None
    for _ in range(args.adapt_iterations):
        (x_s, y_s, _), (x_t, _, _) = next(source), next(target)
        losses = step(x_s, y_s, x_t)
    return losses


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        source, target, val = build_data(args, args.data or os.path.join(scratch, "synthetic"))
        net = build_model(args)
        optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr)
        warm_up(args, net, source, optimizer)
        rows = {"source only": evaluate(net, val)}
        losses = adapt(args, net, source, target, optimizer)
        rows["FADA"] = evaluate(net, val)
    print(f"SegFormer (MiT {args.mit}, {args.features} features) on synthetic GTA5 -> Cityscapes")
    if losses is not None:
        print(f"last iteration: seg {losses.segmentation.item():.4f}  adv {losses.adversarial.item():.5f}  "
              f"D {losses.discriminator.item():.4f}")
    print(f"{'model':<12} {'target mIoU':>11} {'mean CCD':>9}")
    for name, (miou, ccd) in rows.items():
        print(f"{name:<12} {100 * miou:>10.2f}% {ccd:>9.4f}")
    return rows


if __name__ == "__main__":
    main()
