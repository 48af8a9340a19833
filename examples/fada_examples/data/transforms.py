"""Paired (image, label) transforms, as in the official FADA pipeline.

Images are PIL RGB images; labels are PIL "L" images of train IDs (255 = ignore). Geometric
transforms move both the same way (image bicubic, label nearest, label padding 255); colour
transforms touch the image only. :class:`ToTensor` ends the chain: image -> float (3, H, W)
in [0, 1], label -> int64 (H, W); :class:`Normalize` then applies mean/std.

All random draws come from torch's global generator (so checkpointing ``torch.get_rng_state()``
is enough to resume a data stream exactly; DataLoader workers are seeded by torch).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

from .labels import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Compose", "Resize", "RandomScale", "RandomCrop",
    "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Normalize", "build_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(size, name: str) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"{name} must be a positive (W, H) pair, got {size!r}")
    return int(size[0]), int(size[1])


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


class Compose:
    """Apply paired transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for t in self.transforms:
            image, label = t(image, label)
        return image, label

    def __repr__(self) -> str:
        body = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}({body}\n)"


class Resize:
    """Resize to ``size`` = (W, H): image bicubic, label nearest (or left as is).

    ``resize_label=False`` is the official evaluation setting: the network sees the resized
    image and its prediction is upsampled to the full-resolution label.
    """

    def __init__(self, size, resize_label: bool = True):
        self.size = _pair(size, "size")
        self.resize_label = resize_label

    def __call__(self, image, label):
        w, h = self.size
        image = F.resize(image, [h, w], InterpolationMode.BICUBIC)
        if self.resize_label and label is not None:
            label = F.resize(label, [h, w], InterpolationMode.NEAREST)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize_label={self.resize_label})"


class RandomScale:
    """Rescale both by a factor drawn uniformly from ``scale`` = (lo, hi)."""

    def __init__(self, scale=(0.5, 1.5)):
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be 0 < lo <= hi, got {scale!r}")
        self.scale = (lo, hi)

    def __call__(self, image, label):
        s = _uniform(*self.scale)
        w, h = image.size
        size = [max(1, int(h * s)), max(1, int(w * s))]
        image = F.resize(image, size, InterpolationMode.BICUBIC)
        if label is not None:
            label = F.resize(label, size, InterpolationMode.NEAREST)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale})"


class RandomCrop:
    """Crop a random (W, H) window; smaller inputs are padded on the right/bottom first
    (image with ``fill``, label with 255 so the padding is ignored by the loss)."""

    def __init__(self, size, fill: int = 0, label_fill: int = IGNORE_INDEX):
        self.size = _pair(size, "size")
        self.fill = fill
        self.label_fill = label_fill

    def __call__(self, image, label):
        tw, th = self.size
        w, h = image.size
        if label is not None and label.size != image.size:
            raise ValueError(f"RandomCrop needs image and label of one size, got {image.size} "
                             f"and {label.size}")
        pad_w, pad_h = max(0, tw - w), max(0, th - h)
        if pad_w or pad_h:
            image = F.pad(image, [0, 0, pad_w, pad_h], fill=self.fill)
            if label is not None:
                label = F.pad(label, [0, 0, pad_w, pad_h], fill=self.label_fill)
            w, h = image.size
        top = int(torch.randint(0, h - th + 1, ()).item())
        left = int(torch.randint(0, w - tw + 1, ()).item())
        image = F.crop(image, top, left, th, tw)
        if label is not None:
            label = F.crop(label, top, left, th, tw)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, label):
        if torch.rand(()).item() < self.p:
            image = F.hflip(image)
            if label is not None:
                label = F.hflip(label)
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class ColorJitter:
    """torchvision's ColorJitter on the image only (the label is returned unchanged)."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        self.jitter = T.ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, image, label):
        return self.jitter(image), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.jitter!r})"


class ToTensor:
    """Image -> float32 (3, H, W) in [0, 1]; label -> int64 (H, W) (train IDs, unchanged)."""

    def __call__(self, image, label):
        image = F.to_tensor(image)
        if label is not None:
            label = torch.from_numpy(np.array(label, dtype=np.int64, copy=True))
        return image, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Normalize:
    """``(x - mean) / std`` on the image tensor; ``to_bgr255`` first turns RGB [0, 1] into
    BGR [0, 255] (for Caffe-style VGG weights with mean (103.939, 116.779, 123.68), std 1)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, to_bgr255: bool = False):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.to_bgr255 = to_bgr255

    def __call__(self, image, label):
        if self.to_bgr255:
            image = image[[2, 1, 0]] * 255
        return F.normalize(image, self.mean, self.std), label

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mean={self.mean}, std={self.std}, "
                f"to_bgr255={self.to_bgr255})")


def build_transforms(train: bool, *, resize=None, scale=None, crop=None, flip: float = 0.0,
                     jitter=(0.0, 0.0, 0.0, 0.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     to_bgr255: bool = False, resize_label: Optional[bool] = None) -> Compose:
    """The official transform chains.

    Training (``train=True``), in the official order: ColorJitter (if any of ``jitter`` =
    (brightness, contrast, saturation, hue) is non-zero) -> Resize(``resize``) -> RandomScale(
    ``scale``) -> RandomCrop(``crop``) -> RandomHorizontalFlip(``flip``) -> ToTensor -> Normalize.
    The official configs use either ``resize=size`` (scales (1, 1)) or ``scale=(lo, hi),
    crop=size``. Evaluation (``train=False``): Resize(``resize``) of the image only (unless
    ``resize_label=True``) -> ToTensor -> Normalize; ``scale``/``crop``/``flip``/``jitter`` are
    ignored. Sizes are (W, H).
    """
    steps: list = []
    if train:
        if any(float(j) != 0.0 for j in jitter):
            steps.append(ColorJitter(*jitter))
        if resize is not None:
            steps.append(Resize(resize, resize_label=True if resize_label is None else resize_label))
        if scale is not None and tuple(scale) != (1, 1):
            steps.append(RandomScale(scale))
        if crop is not None:
            steps.append(RandomCrop(crop))
        if flip > 0:
            steps.append(RandomHorizontalFlip(flip))
    elif resize is not None:
        steps.append(Resize(resize, resize_label=bool(resize_label)))
    steps += [ToTensor(), Normalize(mean, std, to_bgr255)]
    return Compose(steps)
