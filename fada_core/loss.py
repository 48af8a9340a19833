"""FADA's losses as modules, and the two-line adversarial helper."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor, nn

from . import _validation as V
from . import functional as FF

Size = Optional[Union[int, Tuple[int, int]]]


class FADALoss(V.OptionsModule):
    r"""Fine-grained adversarial loss: soft-label cross-entropy against the domain encoding.

    .. math:: \ell = \operatorname{reduce}_{p}\Big( w(p) \sum_{c=1}^{K}
        -a_c(p)\, \log \mathrm{softmax}(z(p))_{o+c} \Big)

    with :math:`z` the discriminator logits and :math:`a` the capped soft
    labels, both bilinearly upsampled to ``size``, and :math:`o = 0` for
    ``"source"``, :math:`K` for ``"target"``. The value equals the official
    ``soft_label_cross_entropy(D_up, cat(...))``; the gradient flows into the
    discriminator logits only. Half-precision inputs (autocast) give a float32 loss.

    Args:
        num_classes: :math:`K`.
        temperature: :math:`T` of the soft labels (1.8).
        cap: soft-label cap (0.9).
        reduction: ``"mean"`` (over :math:`B \cdot H \cdot W`), ``"sum"`` or ``"none"``.
        backend: ``"auto"`` (fused kernels when available), ``"eager"`` or ``"kernel"``.
        align_corners: of the upsampling (``True``, FADA's; ``False`` as Hugging
            Face, torchvision and mmseg models upsample). The kernels take both.

    Shape:
        - disc_logits: :math:`(B, 2K, h, w)`; seg_logits: :math:`(B, K, h', w')`.
        - weight: optional :math:`(B, H, W)`.
        - Output: scalar, or :math:`(B, H, W)` with ``reduction="none"``.

    Example:
        >>> crit = FADALoss(num_classes=3, backend="eager")
        >>> d = torch.randn(2, 6, 8, 8, requires_grad=True)
        >>> crit(d, torch.randn(2, 3, 8, 8), "target", size=(64, 64)).shape
        torch.Size([])
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = 1.8,
        cap: float = 0.9,
        reduction: str = "mean",
        backend: str = "auto",
        align_corners: bool = True,
    ) -> None:
        super().__init__(num_classes=num_classes, temperature=temperature, cap=cap, reduction=reduction,
                         backend=backend, align_corners=align_corners)

    def forward(
        self, disc_logits: Tensor, seg_logits: Tensor, domain: str, size: Size = None, weight: Optional[Tensor] = None
    ) -> Tensor:
        V.check_channels("seg_logits", seg_logits, self.num_classes, f"num_classes={self.num_classes}")
        return FF.fada_loss(
            disc_logits,
            seg_logits,
            domain,
            self.temperature,
            self.cap,
            size,
            weight,
            self.reduction,
            self.backend,
            self.align_corners,
        )


class UpsampledCrossEntropy(V.OptionsModule):
    r"""Cross-entropy of low-resolution logits against full-resolution labels.

    Equals ``nn.CrossEntropyLoss(ignore_index=...)(upsample(logits) / T, labels)``
    (bilinear), without building the upsampled logits when the kernels are
    used. Half-precision logits (autocast) give a float32 loss.

    Args:
        temperature: divides the logits (FADA's adversarial stage uses 1.8 for
            the supervised loss; source-only and self-distillation use 1).
        ignore_index: label that contributes nothing (255).
        reduction: ``"mean"`` (over non-ignored pixels), ``"sum"`` or ``"none"``.
        backend: ``"auto"`` | ``"eager"`` | ``"kernel"``.
        align_corners: as in :class:`FADALoss` (``True``, FADA's, or ``False``).

    Shape:
        - logits: :math:`(B, K, h, w)`; labels: :math:`(B, H, W)` integers.
        - Output: scalar, or :math:`(B, H, W)` with ``reduction="none"``.

    Example:
        >>> ce = UpsampledCrossEntropy(backend="eager")
        >>> ce(torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 40, 40))).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 1.0,
        ignore_index: int = 255,
        reduction: str = "mean",
        backend: str = "auto",
        align_corners: bool = True,
    ) -> None:
        super().__init__(temperature=temperature, ignore_index=ignore_index, reduction=reduction,
                         backend=backend, align_corners=align_corners)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return FF.upsampled_cross_entropy(
            logits, labels, self.temperature, self.ignore_index, self.reduction, self.backend, self.align_corners
        )


class FineGrainedAdversary(nn.Module):
    r"""FADA's adversarial game in two calls, with the official weights.

    Wraps a discriminator (e.g. :class:`~fada_core.FineGrainedDiscriminator`)
    and a :class:`FADALoss`:

    - :meth:`generator_loss` — for the segmentation network's step: target
      features should look like *source* features of the same class,
      :math:`0.001 \cdot \ell(D(F(x_t)), [a_t, 0])`.
    - :meth:`discriminator_loss` — for the discriminator's step, on detached
      features: :math:`0.5\,\ell(D(F(x_s)), [a_s, 0]) + 0.5\,\ell(D(F(x_t)), [0, a_t])`.

    As in the official code, the generator loss also leaves gradients on the
    discriminator's parameters: clear them (``optimizer_D.zero_grad()``)
    before the discriminator's backward (:class:`~fada_core.AdversarialStep`
    does both steps in that order).

    Args:
        discriminator: module mapping features to :math:`(B, 2K, h, w)` logits.
        num_classes: :math:`K`; ``None`` takes the discriminator's
            ``num_classes`` attribute. When both are known they must agree.
        temperature, cap: soft-label parameters (1.8, 0.9).
        adversarial_weight: weight of the generator's loss (0.001).
        discriminator_weights: weights of the source and target terms (0.5, 0.5).
        backend: ``"auto"`` | ``"eager"`` | ``"kernel"``.
        align_corners: of the loss's upsampling (``True``, FADA's).

    Example:
        >>> from fada_core import FineGrainedDiscriminator
        >>> D = FineGrainedDiscriminator(in_channels=8, num_classes=3, ndf=16)
        >>> adv = FineGrainedAdversary(D, num_classes=3, backend="eager")
        >>> f_s, f_t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        >>> z_s, z_t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> loss_adv = adv.generator_loss(f_t, z_t, size=(32, 32))          # add to the seg loss
        >>> loss_d = adv.discriminator_loss(f_s, z_s, (32, 32), f_t, z_t, (32, 32))
        >>> loss_adv.shape, loss_d.shape
        (torch.Size([]), torch.Size([]))
    """

    def __init__(
        self,
        discriminator: nn.Module,
        num_classes: Optional[int] = None,
        temperature: float = 1.8,
        cap: float = 0.9,
        adversarial_weight: float = 0.001,
        discriminator_weights: Tuple[float, float] = (0.5, 0.5),
        backend: str = "auto",
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module, got {type(discriminator).__name__}")
        num_classes = _adversary_classes(discriminator, num_classes)
        self.discriminator = discriminator
        self.criterion = FADALoss(num_classes, temperature, cap, "mean", backend, align_corners)
        self.adversarial_weight = float(adversarial_weight)
        if len(discriminator_weights) != 2:
            raise ValueError(f"discriminator_weights must be (source, target), got {discriminator_weights!r}")
        self.discriminator_weights = (float(discriminator_weights[0]), float(discriminator_weights[1]))

    @property
    def num_classes(self) -> int:
        return self.criterion.num_classes

    def generator_loss(self, target_features: Tensor, target_seg_logits: Tensor, size: Size = None) -> Tensor:
        """Adversarial loss for the segmentation network (gradient reaches the features)."""
        _check_features(target_features=target_features)
        disc_logits = self.discriminator(target_features)
        loss = self.criterion(disc_logits, target_seg_logits.detach(), "source", size)
        return self.adversarial_weight * loss

    def discriminator_loss(
        self,
        source_features: Tensor,
        source_seg_logits: Tensor,
        source_size: Size,
        target_features: Tensor,
        target_seg_logits: Tensor,
        target_size: Size,
    ) -> Tensor:
        """Loss for the discriminator; features and logits are detached here."""
        _check_features(source_features=source_features, target_features=target_features)
        w_src, w_tgt = self.discriminator_weights
        loss_src = self.criterion(
            self.discriminator(source_features.detach()), source_seg_logits.detach(), "source", source_size
        )
        loss_tgt = self.criterion(
            self.discriminator(target_features.detach()), target_seg_logits.detach(), "target", target_size
        )
        return w_src * loss_src + w_tgt * loss_tgt

    def forward(self, *args, **kwargs):  # pragma: no cover - guidance only
        raise RuntimeError("call generator_loss(...) or discriminator_loss(...) instead of the module itself")

    def extra_repr(self) -> str:
        return f"adversarial_weight={self.adversarial_weight}, discriminator_weights={self.discriminator_weights}"


def _adversary_classes(discriminator: nn.Module, num_classes: Optional[int]) -> int:
    """K from the argument and/or the discriminator's ``num_classes``; a mismatch is caught here, not at the first call."""
    declared = getattr(discriminator, "num_classes", None)
    if num_classes is None:
        if declared is None:
            raise ValueError(
                f"num_classes is required: the discriminator ({type(discriminator).__name__}) "
                "has no num_classes attribute to take it from"
            )
        return V.check_num_classes(declared)
    num_classes = V.check_num_classes(num_classes)
    if declared is not None and declared != num_classes:
        raise ValueError(
            f"num_classes={num_classes} does not match the discriminator's num_classes={declared} "
            f"(it outputs 2K = {2 * declared} channels)"
        )
    return num_classes


def _check_features(**features: Tensor) -> None:
    # before the discriminator sees them, so the error names the caller's argument
    for name, x in features.items():
        if isinstance(x, Tensor):
            V.check_float(name, x)
