"""The eager implementation: the fallback backend and the oracle for the kernels.

Every function here takes already-validated arguments (see
:mod:`fada_core._validation`) and computes with plain PyTorch ops, so it runs
on any device and dtype and is differentiable by autograd. The formulas follow
the official FADA code (github.com/JDAI-CV/FADA, ``train_adv.py``), written
without its full-resolution ``cat``/``zeros`` encoding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 (as torch's losses under autocast); others as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def opmath(x: Tensor) -> Tensor:
    return x.to(opmath_dtype(x.dtype))


def upsample(x: Tensor, size: Tuple[int, int], align_corners: bool = True) -> Tensor:
    """Bilinear upsampling; ``align_corners=True`` is FADA's (every official upsampling)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x  # identity for either corner convention
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _soft_labels_opmath(
    seg_logits: Tensor, temperature: float, cap: float, size: Optional[Tuple[int, int]], align_corners: bool
) -> Tensor:
    # upsampled after the cast, so half inputs are interpolated in float32 as the kernels do
    with torch.no_grad():
        logits = opmath(seg_logits.detach())
        if size is not None:
            logits = upsample(logits, size, align_corners)
        return torch.softmax(logits / temperature, dim=1).clamp(max=cap)


def soft_labels(
    seg_logits: Tensor,
    temperature: float,
    cap: float,
    size: Optional[Tuple[int, int]] = None,
    align_corners: bool = True,
) -> Tensor:
    """softmax(logits / T) over classes, detached, entries above ``cap`` set to ``cap``.

    Not renormalised afterwards, exactly as the official code
    (``soft_label[soft_label > 0.9] = 0.9``). ``clamp`` keeps NaN as NaN, like
    the masked assignment does. Returned in the logits' dtype.
    """
    return _soft_labels_opmath(seg_logits, temperature, cap, size, align_corners).to(seg_logits.dtype)


def domain_encoding(
    seg_logits: Tensor,
    domain: str,
    temperature: float,
    cap: float,
    size: Optional[Tuple[int, int]] = None,
    align_corners: bool = True,
) -> Tensor:
    """The 2K-channel generalised domain label: [a, 0] for source pixels, [0, a] for target."""
    a = soft_labels(seg_logits, temperature, cap, size, align_corners)
    zeros = torch.zeros_like(a)
    return torch.cat((a, zeros) if domain == "source" else (zeros, a), dim=1)


def _reduce(per_pixel: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_pixel.mean()
    if reduction == "sum":
        return per_pixel.sum()
    return per_pixel


def soft_label_cross_entropy(
    logits: Tensor, soft_label: Tensor, weight: Optional[Tensor] = None, reduction: str = "mean"
) -> Tensor:
    """Σ_c −y_c · log_softmax(z)_c per pixel, optionally weighted, then reduced.

    The official ``soft_label_cross_entropy``: with reduction "mean" the value
    is ``mean(weight · Σ_c −y_c log p_c)`` over all B·H·W pixels. Every loss
    here is returned in the dtype it is computed in: float32 for half inputs.
    """
    return _soft_label_nll(F.log_softmax(opmath(logits), dim=1), soft_label, weight, reduction)


def _soft_label_nll(log_p: Tensor, soft_label: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    """Σ_c −y_c · log_p_c per pixel, times the pixel weight if any, then reduced."""
    per_pixel = -(soft_label.to(log_p.dtype) * log_p).sum(dim=1)
    if weight is not None:
        per_pixel = per_pixel * weight.to(per_pixel.dtype)
    return _reduce(per_pixel, reduction)


def fada_loss(
    disc_logits: Tensor,
    seg_logits: Tensor,
    domain: str,
    temperature: float,
    cap: float,
    size: Tuple[int, int],
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    align_corners: bool = True,
) -> Tensor:
    """soft_label_cross_entropy(upsample(disc_logits), domain_encoding(seg_logits)).

    Only the K channels of the encoding that hold the soft label are non-zero,
    so the product is taken on that half of the log-softmax instead of
    building the 2K-channel encoding; the value is the same.
    """
    num_classes = seg_logits.shape[1]
    log_p = F.log_softmax(upsample(opmath(disc_logits), size, align_corners), dim=1)
    a = _soft_labels_opmath(seg_logits, temperature, cap, size, align_corners)
    half = log_p[:, :num_classes] if domain == "source" else log_p[:, num_classes:]
    return _soft_label_nll(half, a, weight, reduction)


def upsampled_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    reduction: str = "mean",
    align_corners: bool = True,
) -> Tensor:
    """CrossEntropyLoss(upsample(logits, labels' size) / T, labels, ignore_index).

    "mean" averages over the non-ignored pixels (torch's convention; NaN when
    every pixel is ignored); "none" returns the (B, H, W) map with 0 at
    ignored pixels.
    """
    up = upsample(opmath(logits), tuple(labels.shape[-2:]), align_corners) / temperature
    return F.cross_entropy(up, labels.long(), ignore_index=ignore_index, reduction=reduction)


def class_center_stats(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-class pixel count, mean feature and centred sum of squares, in float64.

    ``labels`` are at the features' resolution. Returns ``counts`` (K,),
    ``means`` (K, C) and ``m2`` (K,) with ``m2_k = Σ_{x∈S_k} ‖x − μ_k‖²``;
    absent classes get count 0, mean 0 and m2 0. Two passes (mean, then the
    centred squares), so a large common offset in the features costs no
    precision.
    """
    channels = features.shape[1]
    x = rearrange(features.detach(), "b c h w -> (b h w) c").double()
    y = rearrange(labels, "b h w -> (b h w)").long()  # the pixel order of x
    valid = y != ignore_index
    x, y = x[valid], y[valid]
    counts = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    sums = torch.zeros(num_classes, channels, dtype=torch.float64, device=features.device)
    sums.index_add_(0, y, x)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    centred = ((x - means[y]) ** 2).sum(dim=1)
    m2 = torch.zeros(num_classes, dtype=torch.float64, device=features.device)
    m2.index_add_(0, y, centred)
    return counts, means, m2
