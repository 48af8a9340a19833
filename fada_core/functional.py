"""FADA as functions: soft labels, the domain encoding, the losses, class-center statistics.

Every function validates its arguments (errors name the argument), then runs
either the fused kernels (``torch.ops.fada_core``) or the eager reference
(:mod:`fada_core._reference`), as ``backend`` says:

- ``"eager"``: plain PyTorch ops; any device, any floating dtype.
- ``"kernel"``: the compiled operators; raises ``RuntimeError`` with the reason
  when they cannot be used for these tensors.
- ``"auto"`` (default): the kernels when they are loaded for the tensors'
  device, else eager (one warning says why the kernels are missing).

The formulas are the official FADA code's (github.com/JDAI-CV/FADA,
``train_adv.py``); ``../shared/FADA_SPEC.md`` states them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from einops import rearrange
from torch import Tensor

from . import _reference
from . import _validation as V
from .ops import DOMAINS as _DOMAIN_CODES
from .ops import REDUCTIONS as _REDUCTION_CODES

Size = Optional[Union[int, Tuple[int, int]]]

__all__ = [
    "soft_labels",
    "domain_encoding",
    "soft_label_cross_entropy",
    "fada_loss",
    "upsampled_cross_entropy",
    "ClassCenterStats",
    "class_center_stats",
    "merge_class_center_stats",
    "CCDResult",
    "class_center_distance",
    "check_label_errors",
]

# dtypes the kernels (CPU and CUDA) take natively, half ones with float32
# accumulators and a float32 loss; others are computed in float32.
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@torch.compiler.assume_constant_result
def _kernels_ready(device_type: str, op: str) -> bool:
    # Evaluated in Python even while torch.compile traces (its result is a
    # constant of the graph), so loading/building the kernels never breaks it.
    from . import _build

    return _build.kernels_available(device_type, op)


def _cuda_backward_fits(channels: int, dtype: torch.dtype, shared_bytes: int) -> bool:
    """Whether the CUDA backward kernels can take ``channels`` low-resolution channels.

    They keep per-channel partial sums of one tile in shared memory, within the
    device's opt-in limit ``shared_bytes`` (227 KB on an H100: up to 880 float32
    channels, i.e. K = 440 classes for the FADA loss). The limit is the kernels'
    own (``csrc/common/kernel_limits.h``, asked through an operator), so this
    cannot drift from the launch code. Needs the compiled library loaded.
    """
    acc_bytes = 8 if dtype == torch.float64 else 4
    return channels <= _cuda_backward_max_channels(acc_bytes, shared_bytes)


@torch.compiler.assume_constant_result
def _cuda_backward_max_channels(acc_bytes: int, shared_bytes: int) -> int:
    return int(torch.ops.fada_core.cuda_backward_max_channels(acc_bytes, shared_bytes))


@torch.compiler.assume_constant_result
def _cuda_shared_bytes(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def _use_kernel(backend: str, x: Tensor, op: str, backward_channels: Optional[int] = None) -> bool:
    """Whether to run the compiled operator ``op`` for tensors like ``x``.

    ``backward_channels``: the channels the CUDA backward would take when a
    gradient is needed; beyond what it can hold, "auto" runs eager instead.
    """
    V.check_choice("backend", backend, V.BACKENDS)
    if backend == "eager":
        return False
    if _kernels_ready(x.device.type, op):
        if backward_channels is not None and x.device.type == "cuda" and x.requires_grad:
            dtype = _kernel_dtype(x.dtype)
            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
            if not _cuda_backward_fits(backward_channels, dtype, _cuda_shared_bytes(index)):
                if backend == "kernel":
                    raise ValueError(
                        f"backend='kernel': the CUDA backward of {op} cannot take {backward_channels} "
                        f"channels on this GPU (shared memory); use backend='auto' or 'eager'"
                    )
                return False
        return True
    if backend == "kernel":
        from . import _build

        reason = _build.failure_reason() or f"no kernels are compiled for device type {x.device.type!r}"
        raise RuntimeError(f"backend='kernel' was requested but the fada_core kernels cannot be used: {reason}")
    return False


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to hand the kernel: the input's own if supported, else float32."""
    return dtype if dtype in _KERNEL_DTYPES else torch.float32


def _run_loss_op(name: str, reduction: str, logits: Tensor, *args) -> Tensor:
    """The loss of operator ``torch.ops.fada_core.<name>(logits, *args)``. Training with a mean or
    sum (``logits`` needs a gradient), its ``<name>_with_grad`` form computes the loss and that
    gradient in one pass (one launch on the CUDA fast path); the backward then only scales it.

    Not for half logits: the one-pass gradient is for an upstream gradient of 1, in the logits'
    dtype, and a mean's is ~1/(B*H*W) per output pixel, below float16's normal range at training
    sizes; scaling it afterwards (GradScaler) cannot restore the lost bits. The backward op gets the
    real (scaled) upstream gradient instead."""
    with_grad = (reduction != "none" and logits.requires_grad and torch.is_grad_enabled()
                 and logits.dtype in (torch.float32, torch.float64))
    out = getattr(torch.ops.fada_core, f"{name}_with_grad" if with_grad else name)(logits, *args)
    return out[0] if with_grad else out


def _check_label_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels in [0, K) or ignore_index, checked on the host (one sync). The CUDA kernels check on
    the device instead (no sync; see :func:`check_label_errors`)."""
    if not torch.compiler.is_compiling():
        V.check_label_range("labels", labels, num_classes, ignore_index)


def check_label_errors(synchronize: bool = True) -> None:
    """Raise now for an out-of-range label that a CUDA kernel met.

    The CUDA kernels of :func:`upsampled_cross_entropy` and :func:`class_center_stats`
    check labels on the device, without a host synchronisation: a label outside
    ``[0, K)`` (and not ``ignore_index``) makes that call's result NaN and is
    recorded in pinned host memory; the next call of either op raises a
    ``ValueError`` naming the op and the label, and so does this function (after
    synchronising all devices when ``synchronize``). The CUDA context stays usable.
    On the CPU and the eager path labels are checked before computing, as always.
    """
    if not torch.cuda.is_available():
        return
    from . import _build

    if not _build.kernels_available("cuda"):
        return
    if synchronize:
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    torch.ops.fada_core.check_label_errors()


# --------------------------------------------------------------------------- soft labels


def soft_labels(
    seg_logits: Tensor, temperature: float = 1.8, cap: float = 0.9, size: Size = None, align_corners: bool = True
) -> Tensor:
    r"""FADA's soft labels: :math:`a = \min(\mathrm{softmax}(z / T), \mathrm{cap})`, detached.

    The softmax is over the K classes; entries above ``cap`` are set to ``cap``
    and the result is *not* renormalised (its sum may be below 1), exactly as
    the official code.

    Args:
        seg_logits: segmentation logits :math:`(B, K, h, w)`.
        temperature: :math:`T > 0` (FADA uses 1.8).
        cap: the upper bound in :math:`(0, 1]` (FADA uses 0.9).
        size: optional output size :math:`(H, W)`; the logits are upsampled
            bilinearly first.
        align_corners: of the bilinear upsampling (``True``, FADA's; ``False``
            as Hugging Face and mmseg models upsample).

    Returns:
        :math:`(B, K, H, W)` soft labels with no gradient.

    Example:
        >>> a = soft_labels(torch.tensor([[[[4.0]], [[0.0]]]]), temperature=1.0)
        >>> a.flatten().tolist()  # softmax = (0.982, 0.018), capped at 0.9
        [0.8999999761581421, 0.01798621006309986]
    """
    options = _check_soft_label_args(seg_logits, temperature, cap, size, align_corners)
    return _reference.soft_labels(seg_logits, *options)


def domain_encoding(
    seg_logits: Tensor,
    domain: str,
    temperature: float = 1.8,
    cap: float = 0.9,
    size: Size = None,
    align_corners: bool = True,
) -> Tensor:
    r"""The generalised domain label of FADA, :math:`2K` channels.

    Source pixels get :math:`[a, 0_K]`, target pixels :math:`[0_K, a]`, with
    :math:`a` = :func:`soft_labels`. The fused loss never builds this tensor;
    it is here for users and for checking.

    Args:
        seg_logits: :math:`(B, K, h, w)`.
        domain: ``"source"`` or ``"target"``.
        temperature, cap, size, align_corners: as in :func:`soft_labels`.

    Returns:
        :math:`(B, 2K, H, W)`.

    Example:
        >>> enc = domain_encoding(torch.zeros(1, 3, 2, 2), "target")
        >>> enc.shape, enc[0, :3].abs().sum().item()
        (torch.Size([1, 6, 2, 2]), 0.0)
    """
    options = _check_soft_label_args(seg_logits, temperature, cap, size, align_corners)
    V.check_choice("domain", domain, V.DOMAINS)
    return _reference.domain_encoding(seg_logits, domain, *options)


def _check_soft_label_args(
    seg_logits: Tensor, temperature: float, cap: float, size: Size, align_corners: bool
) -> Tuple[float, float, Optional[Tuple[int, int]], bool]:
    """Checks ``seg_logits``; returns the options checked and normalised, in the reference's order."""
    V.check_float_tensor("seg_logits", seg_logits, 4, "(B, K, h, w)")
    temperature, cap = V.check_temperature(temperature), V.check_cap(cap)
    return temperature, cap, V.check_size(size), V.check_bool("align_corners", align_corners)


# --------------------------------------------------------------------------- losses


def soft_label_cross_entropy(
    logits: Tensor, soft_label: Tensor, weight: Optional[Tensor] = None, reduction: str = "mean"
) -> Tensor:
    r"""Soft-label cross-entropy, the official FADA function generalised.

    .. math:: \ell = \sum_c -y_c \log \mathrm{softmax}(z)_c

    per pixel, times ``weight`` if given, then reduced (``"mean"`` over all
    :math:`B \cdot H \cdot W` pixels, ``"sum"``, or ``"none"`` for the
    :math:`(B, H, W)` map).

    Args:
        logits: :math:`(B, C, H, W)`.
        soft_label: :math:`(B, C, H, W)`, same shape.
        weight: optional :math:`(B, H, W)` pixel weights.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.

    Example:
        >>> z = torch.zeros(1, 2, 1, 1); y = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        >>> round(soft_label_cross_entropy(z, y).item(), 4)  # -log(1/2)
        0.6931
    """
    V.check_float_tensor("logits", logits, 4, "(B, C, H, W)")
    V.check_float_tensor("soft_label", soft_label, 4, "(B, C, H, W)")
    if soft_label.shape != logits.shape:
        raise ValueError(f"soft_label must have the logits' shape {tuple(logits.shape)}, got {tuple(soft_label.shape)}")
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_weight(weight, logits.shape[0], tuple(logits.shape[-2:]))
    V.check_same_device(logits=logits, soft_label=soft_label, weight=weight)
    return _reference.soft_label_cross_entropy(logits, soft_label, weight, reduction)


def fada_loss(
    disc_logits: Tensor,
    seg_logits: Tensor,
    domain: str,
    temperature: float = 1.8,
    cap: float = 0.9,
    size: Size = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
    align_corners: bool = True,
) -> Tensor:
    r"""FADA's fine-grained adversarial loss, fused.

    Equals the official ``soft_label_cross_entropy(D_up, encoding)`` where
    ``D_up`` is the discriminator output upsampled to ``size`` and
    ``encoding`` = :func:`domain_encoding` of the segmentation logits upsampled
    to ``size``:

    .. math:: \ell(p) = -\sum_{c=1}^{K} a_c(p)\,\log\mathrm{softmax}(z(p))_{o+c},
        \quad o = 0 \text{ (source) or } K \text{ (target)}

    The gradient flows into ``disc_logits`` only (soft labels are detached).
    Pass *low-resolution* logits: the kernel samples them bilinearly on the
    fly and never builds a full-resolution tensor. Half-precision inputs are
    computed in float32 and the loss is returned in float32, as torch's
    cross-entropy does under autocast.

    Args:
        disc_logits: discriminator logits :math:`(B, 2K, h, w)`.
        seg_logits: segmentation logits :math:`(B, K, h', w')`, any resolution.
        domain: which half of the encoding holds the soft label: ``"source"``
            (also used for the generator's target step) or ``"target"``.
        temperature, cap: soft-label temperature and cap.
        size: output size :math:`(H, W)`; if None, both inputs must already
            share one spatial size.
        weight: optional pixel weights :math:`(B, H, W)`.
        reduction: ``"mean"`` (over :math:`B \cdot H \cdot W`), ``"sum"`` or ``"none"``.
        backend: ``"auto"`` | ``"eager"`` | ``"kernel"``.
        align_corners: of the bilinear upsampling of both inputs (``True``,
            FADA's; ``False`` as Hugging Face, torchvision and mmseg models
            upsample). The kernels implement both.

    Example:
        >>> d = torch.zeros(2, 6, 4, 4, requires_grad=True); s = torch.randn(2, 3, 4, 4)
        >>> loss = fada_loss(d, s, "source", size=(16, 16), backend="eager")
        >>> loss.backward(); d.grad.shape
        torch.Size([2, 6, 4, 4])
    """
    _, size = V.check_fada_inputs(disc_logits, seg_logits, domain, size, weight)
    temperature = V.check_temperature(temperature)
    cap = V.check_cap(cap)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_bool("align_corners", align_corners)
    if not _use_kernel(backend, disc_logits, "fada_loss", disc_logits.shape[1]):
        return _reference.fada_loss(
            disc_logits, seg_logits, domain, temperature, cap, size, weight, reduction, align_corners
        )

    dtype = _kernel_dtype(torch.promote_types(disc_logits.dtype, seg_logits.dtype))
    loss = _run_loss_op(
        "fada_loss",
        reduction,
        disc_logits.to(dtype),
        seg_logits.detach().to(dtype),
        _DOMAIN_CODES[domain],
        temperature,
        cap,
        size[0],
        size[1],
        None if weight is None else weight.detach(),  # the kernels read it in their accumulation type
        _REDUCTION_CODES[reduction],
        align_corners,
    )
    # the kernels return the loss in float32 for half inputs already; this
    # only matters for mixed dtypes (float32 disc, float64 seg: float32, as eager)
    return loss.to(_reference.opmath_dtype(disc_logits.dtype))


def upsampled_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
    align_corners: bool = True,
) -> Tensor:
    r"""Cross-entropy of low-resolution logits against full-resolution labels.

    Equals ``CrossEntropyLoss(ignore_index)(upsample(logits, labels' size) / T, labels)``
    with bilinear upsampling, as FADA's segmentation losses (``T = 1.8`` in
    the adversarial stage, 1 elsewhere). The kernel never builds the
    full-resolution logits. Half-precision logits give a float32 loss.

    Args:
        logits: :math:`(B, K, h, w)`.
        labels: :math:`(B, H, W)` integer class indices in :math:`[0, K)` or ``ignore_index``.
        temperature: :math:`T > 0`.
        ignore_index: label value that contributes nothing.
        reduction: ``"mean"`` (over non-ignored pixels; NaN if there are none,
            like torch), ``"sum"`` or ``"none"`` (:math:`(B, H, W)`, 0 at ignored pixels).
        backend: ``"auto"`` | ``"eager"`` | ``"kernel"``.
        align_corners: as in :func:`fada_loss` (``True``, FADA's, or ``False``).

    Example:
        >>> z = torch.zeros(1, 4, 2, 2, requires_grad=True)
        >>> y = torch.tensor([[[0, 1, 255], [2, 3, 3]]])
        >>> round(upsampled_cross_entropy(z, y, backend="eager").item(), 4)  # log(4)
        1.3863
    """
    V.check_float_tensor("logits", logits, 4, "(B, K, h, w)")
    V.check_labels_for("logits", logits, labels)
    temperature = V.check_temperature(temperature)
    ignore_index = V.check_ignore_index(ignore_index)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    V.check_same_device(logits=logits, labels=labels)
    V.check_bool("align_corners", align_corners)
    if not _use_kernel(backend, logits, "upsampled_cross_entropy", logits.shape[1]):
        _check_label_range(labels, logits.shape[1], ignore_index)
        return _reference.upsampled_cross_entropy(logits, labels, temperature, ignore_index, reduction, align_corners)
    if labels.device.type != "cuda":
        _check_label_range(labels, logits.shape[1], ignore_index)
    logits = logits.to(_kernel_dtype(logits.dtype))
    return _run_loss_op("upsampled_cross_entropy", reduction, logits, labels.long(), temperature, ignore_index,
                        _REDUCTION_CODES[reduction], align_corners)  # float32 for half logits


# --------------------------------------------------------------------------- class centers


@dataclass
class ClassCenterStats:
    """Sufficient statistics of each class's features, all float64.

    ``counts`` (K,): pixels per class; ``means`` (K, C): class centers
    :math:`\\mu_k`; ``m2`` (K,): :math:`\\sum_{x \\in S_k} \\|x - \\mu_k\\|^2`.
    Two sets merge exactly with :func:`merge_class_center_stats`.
    """

    counts: Tensor
    means: Tensor
    m2: Tensor


def class_center_stats(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255, backend: str = "auto"
) -> ClassCenterStats:
    r"""Per-class count, center and centred sum of squares of a batch of features.

    Labels at another resolution than the features are resized with
    ``F.interpolate(mode="nearest")`` (the labels are brought to :math:`h \times w`).
    Accumulates in float64 and stays exact when the features carry a large
    common offset.

    Args:
        features: :math:`(B, C, h, w)` floating features.
        labels: :math:`(B, H, W)` integer labels in :math:`[0, K)` or ``ignore_index``.
        num_classes: :math:`K`.
        ignore_index: label to skip.
        backend: ``"auto"`` | ``"eager"`` | ``"kernel"``.

    Example:
        >>> f = torch.tensor([[[[1.0, 3.0], [10.0, 10.0]]]])  # C = 1
        >>> s = class_center_stats(f, torch.tensor([[[0, 0], [1, 255]]]), num_classes=2)
        >>> s.counts.tolist(), s.means.flatten().tolist(), s.m2.tolist()
        ([2.0, 1.0], [2.0, 10.0], [2.0, 0.0])
    """
    num_classes = V.check_num_classes(num_classes)
    ignore_index = V.check_ignore_index(ignore_index)
    V.check_float_tensor("features", features, 4, "(B, C, h, w)")
    V.check_labels_for("features", features, labels)
    V.check_same_device(features=features, labels=labels)
    labels = resize_labels(labels, tuple(features.shape[-2:]))
    features = features.detach()
    use_kernel = _use_kernel(backend, features, "class_center_stats")
    if not (use_kernel and labels.device.type == "cuda"):
        _check_label_range(labels, num_classes, ignore_index)
    if use_kernel:
        counts, means, m2 = torch.ops.fada_core.class_center_stats(
            features.to(_kernel_dtype(features.dtype)), labels, num_classes, ignore_index
        )
    else:
        counts, means, m2 = _reference.class_center_stats(features, labels, num_classes, ignore_index)
    return ClassCenterStats(counts, means, m2)


def resize_labels(labels: Tensor, size: Tuple[int, int]) -> Tensor:
    """Labels brought to ``size`` with nearest interpolation (int64 out)."""
    labels = labels.long()
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    # float64 holds every integer label exactly; nearest never mixes values.
    resized = torch.nn.functional.interpolate(labels[:, None].double(), size=size, mode="nearest")
    return resized[:, 0].long()


def merge_class_center_stats(a: ClassCenterStats, b: ClassCenterStats) -> ClassCenterStats:
    r"""Combine two sets of statistics exactly (Chan et al.'s parallel update).

    .. math:: n = n_a + n_b,\quad \mu = \mu_a + \tfrac{n_b}{n}(\mu_b - \mu_a),\quad
        M_2 = M_{2,a} + M_{2,b} + \tfrac{n_a n_b}{n}\|\mu_b - \mu_a\|^2
    """
    n = a.counts + b.counts
    safe_n = n.clamp(min=1)
    delta = b.means - a.means
    means = a.means + delta * (b.counts / safe_n).unsqueeze(1)
    m2 = a.m2 + b.m2 + (delta * delta).sum(dim=1) * (a.counts * b.counts / safe_n)
    empty = n == 0
    means = torch.where(empty.unsqueeze(1), torch.zeros_like(means), means)
    m2 = torch.where(empty, torch.zeros_like(m2), m2)
    return ClassCenterStats(n, means, m2)


@dataclass(repr=False)
class CCDResult:
    """Class Center Distance of a data set (FADA paper, section 4).

    Attributes:
        matrix: (K, K) CCD(i, j); NaN on the diagonal and where i or j is absent
            (or their centers coincide).
        per_class: (K,) mean of CCD(i, j) over present j != i; NaN for absent
            classes (and when fewer than two classes are present).
        mean: the mean of ``per_class`` over present classes (NaN if none).
        present: (K,) bool, classes with at least one pixel.
        counts: (K,) pixel counts (float64).
    """

    matrix: Tensor
    per_class: Tensor
    mean: float
    present: Tensor
    counts: Tensor

    def __repr__(self) -> str:
        # the K x K matrix is the attribute to print; the repr stays one line
        k = self.per_class.shape[0]
        return f"CCDResult(mean={self.mean:.6g}, present={int(self.present.sum())}/{k} classes)"


def class_center_distance(stats: ClassCenterStats) -> CCDResult:
    r"""Class Center Distance from accumulated statistics.

    .. math:: \mathrm{CCD}(i, j) = \frac{\frac{1}{|S_i|}\sum_{x \in S_i}\|x - \mu_i\|^2}{\|\mu_i - \mu_j\|^2}

    per class :math:`\mathrm{CCD}_i` = mean over present :math:`j \ne i`; the
    overall figure is the mean over present classes. Lower is better.

    Example:
        >>> s = ClassCenterStats(torch.tensor([2.0, 1.0]), torch.tensor([[2.0], [10.0]]).double(),
        ...                      torch.tensor([2.0, 0.0]).double())
        >>> class_center_distance(s).per_class.tolist()  # (2/2)/8^2 and 0/8^2
        [0.015625, 0.0]
    """
    counts = stats.counts.double()
    present = counts > 0
    k = counts.shape[0]
    variance = stats.m2.double() / counts.clamp(min=1)
    # squared distances from explicit differences (cdist's matmul form cancels)
    means = stats.means.double()
    diff = rearrange(means, "i c -> i 1 c") - rearrange(means, "j c -> 1 j c")
    distance = (diff * diff).sum(dim=-1)
    matrix = variance[:, None] / distance
    pair_ok = present[:, None] & present[None, :] & ~torch.eye(k, dtype=torch.bool, device=counts.device)
    nan = torch.full_like(matrix, float("nan"))
    matrix = torch.where(pair_ok & (distance > 0), matrix, nan)
    valid = pair_ok & ~torch.isnan(matrix)
    per_class = torch.where(valid, matrix, torch.zeros_like(matrix)).sum(dim=1) / valid.sum(dim=1)
    per_class = torch.where(present & (valid.sum(dim=1) > 0), per_class, torch.full_like(per_class, float("nan")))
    finite = ~torch.isnan(per_class)
    mean = float(per_class[finite].mean()) if bool(finite.any()) else float("nan")
    return CCDResult(matrix=matrix, per_class=per_class, mean=mean, present=present, counts=counts)
