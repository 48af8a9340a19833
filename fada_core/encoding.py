"""The generalised domain label (domain encoding) of FADA as a module."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from . import _validation as V
from . import functional as FF


class DomainEncoding(V.OptionsModule):
    r"""Soft labels placed in the source or target half of 2K channels.

    :math:`a = \min(\mathrm{softmax}(z / T), \mathrm{cap})` (detached, not
    renormalised); source pixels get :math:`[a, 0_K]`, target pixels
    :math:`[0_K, a]`.

    Args:
        num_classes: :math:`K`.
        temperature: :math:`T` (1.8 in FADA).
        cap: soft-label cap (0.9 in FADA).
        align_corners: of the bilinear upsampling to ``size`` (``True``, FADA's).

    Shape:
        - seg_logits: :math:`(B, K, h, w)`.
        - Output: :math:`(B, 2K, H, W)` (:math:`H, W` = ``size`` or :math:`h, w`).

    Example:
        >>> enc = DomainEncoding(num_classes=3)
        >>> enc(torch.randn(2, 3, 4, 4), "source", size=(8, 8)).shape
        torch.Size([2, 6, 8, 8])
    """

    def __init__(
        self, num_classes: int, temperature: float = 1.8, cap: float = 0.9, align_corners: bool = True
    ) -> None:
        super().__init__(num_classes=num_classes, temperature=temperature, cap=cap, align_corners=align_corners)

    def forward(
        self, seg_logits: Tensor, domain: str, size: Optional[Union[int, Tuple[int, int]]] = None
    ) -> Tensor:
        V.check_channels("seg_logits", seg_logits, self.num_classes, f"num_classes={self.num_classes}")
        return FF.domain_encoding(seg_logits, domain, self.temperature, self.cap, size, self.align_corners)
