"""Python side of the ``torch.ops.fada_core`` custom operators.

The schemas live in ``csrc/fada_core.cpp`` and the CPU/CUDA kernels in
``csrc/cpu`` and ``csrc/cuda``. This module adds what torch needs around them:
fake (meta) kernels, so ``torch.compile(fullgraph=True)`` traces through
without a graph break, and autograd formulas, whose backward is an op of its
own. :func:`register` runs once, right after the compiled library is loaded
(see :mod:`fada_core._build`); nothing here is usable before that.

Integer codes shared with C++: ``REDUCTIONS`` follows torch's reduction enum,
``DOMAINS`` says which half of the 2K discriminator channels holds the soft
label. The loss ops end with ``align_corners`` (default True, FADA's), the
corner convention of their bilinear upsampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._reference import opmath_dtype

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
DOMAINS = {"source": 0, "target": 1}

_registered = False


def _loss_output(like: Tensor, batch: int, out_h: int, out_w: int, reduction: int) -> Tensor:
    # the kernels' accumulation type: float32 for half logits (csrc/common/*_host.h)
    dtype = opmath_dtype(like.dtype)
    if reduction == REDUCTIONS["none"]:
        return like.new_empty((batch, out_h, out_w), dtype=dtype)
    return like.new_empty((), dtype=dtype)


def _fake_fada_loss(disc_logits, seg_logits, domain, temperature, cap, out_h, out_w, weight, reduction,
                    align_corners=True):
    torch._check(disc_logits.dim() == 4, lambda: "disc_logits must be (B, 2K, h, w)")
    torch._check(seg_logits.dim() == 4, lambda: "seg_logits must be (B, K, h, w)")
    torch._check(disc_logits.shape[1] == 2 * seg_logits.shape[1], lambda: "disc_logits needs 2K channels")
    torch._check(disc_logits.shape[0] == seg_logits.shape[0], lambda: "batch mismatch")
    return _loss_output(disc_logits, disc_logits.shape[0], out_h, out_w, reduction)


def _fake_fada_loss_backward(grad, disc_logits, seg_logits, domain, temperature, cap, out_h, out_w, weight, reduction,
                             align_corners=True):
    return torch.empty_like(disc_logits)


def _fake_fada_loss_with_grad(disc_logits, seg_logits, domain, temperature, cap, out_h, out_w, weight, reduction,
                              align_corners=True):
    torch._check(reduction != REDUCTIONS["none"], lambda: "fada_loss_with_grad needs reduction mean or sum")
    loss = _fake_fada_loss(disc_logits, seg_logits, domain, temperature, cap, out_h, out_w, weight, reduction)
    return loss, torch.empty_like(disc_logits)


def _fake_upsampled_ce(logits, labels, temperature, ignore_index, reduction, align_corners=True):
    torch._check(logits.dim() == 4, lambda: "logits must be (B, K, h, w)")
    torch._check(labels.dim() == 3, lambda: "labels must be (B, H, W)")
    torch._check(logits.shape[0] == labels.shape[0], lambda: "batch mismatch")
    return _loss_output(logits, labels.shape[0], labels.shape[1], labels.shape[2], reduction)


def _fake_upsampled_ce_backward(grad, logits, labels, temperature, ignore_index, reduction, align_corners=True):
    return torch.empty_like(logits)


def _fake_upsampled_ce_with_grad(logits, labels, temperature, ignore_index, reduction, align_corners=True):
    torch._check(reduction != REDUCTIONS["none"], lambda: "upsampled_cross_entropy_with_grad needs reduction mean or sum")
    loss = _fake_upsampled_ce(logits, labels, temperature, ignore_index, reduction)
    return loss, torch.empty_like(logits)


def _fake_class_center_stats(features, labels, num_classes, ignore_index):
    torch._check(features.dim() == 4, lambda: "features must be (B, C, h, w)")
    torch._check(labels.dim() == 3, lambda: "labels must be (B, h, w)")
    channels = features.shape[1]
    counts = features.new_empty((num_classes,), dtype=torch.float64)
    means = features.new_empty((num_classes, channels), dtype=torch.float64)
    m2 = features.new_empty((num_classes,), dtype=torch.float64)
    return counts, means, m2


def _setup_fada_loss(ctx, inputs, output):
    # torch fills in defaulted arguments: inputs has every argument of the schema
    disc_logits, seg_logits, domain, temperature, cap, out_h, out_w, weight, reduction, align_corners = inputs
    ctx.save_for_backward(disc_logits, seg_logits, weight)
    ctx.args = (domain, temperature, cap, out_h, out_w, reduction, align_corners)


def _backward_fada_loss(ctx, grad):
    disc_logits, seg_logits, weight = ctx.saved_tensors
    domain, temperature, cap, out_h, out_w, reduction, align_corners = ctx.args
    grad_disc = None
    if ctx.needs_input_grad[0]:
        grad_disc = torch.ops.fada_core.fada_loss_backward(
            grad, disc_logits, seg_logits, domain, temperature, cap, out_h, out_w, weight, reduction, align_corners
        )
    # Soft labels are detached (as in FADA): no gradient reaches seg_logits or weight.
    return (grad_disc,) + (None,) * 9


def _setup_with_grad(ctx, inputs, output):
    # The *_with_grad ops return (loss, gradient of the loss for an upstream 1)
    # for their first input; nothing else gets a gradient.
    _, grad_first = output
    ctx.save_for_backward(grad_first)
    ctx.mark_non_differentiable(grad_first)
    ctx.num_inputs = len(inputs)


def _backward_with_grad(ctx, grad, _grad_of_grad):
    # The loss is a mean or sum, so its gradient is grad * (the gradient for 1),
    # in the input's dtype. The product is taken in grad's dtype (the loss's:
    # float32 for half inputs): grad is a 0-dim tensor, which type promotion
    # would otherwise round to half first (GradScaler's 2**16 is inf in float16).
    (grad_first,) = ctx.saved_tensors
    grad_in = (grad * grad_first.to(grad.dtype)).to(grad_first.dtype) if ctx.needs_input_grad[0] else None
    return (grad_in,) + (None,) * (ctx.num_inputs - 1)


def _setup_upsampled_ce(ctx, inputs, output):
    logits, labels, temperature, ignore_index, reduction, align_corners = inputs
    ctx.save_for_backward(logits, labels)
    ctx.args = (temperature, ignore_index, reduction, align_corners)


def _backward_upsampled_ce(ctx, grad):
    logits, labels = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.fada_core.upsampled_cross_entropy_backward(grad, logits, labels, *ctx.args)
    return (grad_logits,) + (None,) * 5


def register() -> None:
    """Attach fake kernels and autograd formulas to the loaded operators (idempotent)."""
    global _registered
    if _registered:
        return
    lib = torch.library
    lib.register_fake("fada_core::fada_loss")(_fake_fada_loss)
    lib.register_fake("fada_core::fada_loss_backward")(_fake_fada_loss_backward)
    lib.register_fake("fada_core::fada_loss_with_grad")(_fake_fada_loss_with_grad)
    lib.register_fake("fada_core::upsampled_cross_entropy")(_fake_upsampled_ce)
    lib.register_fake("fada_core::upsampled_cross_entropy_backward")(_fake_upsampled_ce_backward)
    lib.register_fake("fada_core::upsampled_cross_entropy_with_grad")(_fake_upsampled_ce_with_grad)
    lib.register_fake("fada_core::class_center_stats")(_fake_class_center_stats)
    lib.register_autograd("fada_core::fada_loss", _backward_fada_loss, setup_context=_setup_fada_loss)
    for name in ("fada_core::fada_loss_with_grad", "fada_core::upsampled_cross_entropy_with_grad"):
        lib.register_autograd(name, _backward_with_grad, setup_context=_setup_with_grad)
    lib.register_autograd(
        "fada_core::upsampled_cross_entropy", _backward_upsampled_ce, setup_context=_setup_upsampled_ce
    )
    _registered = True
