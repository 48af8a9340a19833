"""The fine-grained domain discriminator of FADA."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validation as V


class FineGrainedDiscriminator(nn.Module):
    r"""Predicts, per pixel, a 2K-way "which domain, which class" distribution.

    The official FADA architecture (``PixelDiscriminator``)::

        conv3x3(C_in -> ndf) -> LeakyReLU(0.2) -> conv3x3(ndf -> ndf/2) -> LeakyReLU(0.2)
          -> source head conv3x3(ndf/2 -> K), target head conv3x3(ndf/2 -> K)
        output = cat([source_head, target_head], dim=1)       # 2K channels

    Args:
        in_channels: channels of the segmentation features (2048 for ResNet-101,
            1024 for VGG-16). ``None`` (the default): taken from the features
            at the first call (the first conv is a :class:`~torch.nn.LazyConv2d`;
            build optimizers before or after that call, both work, and loading a
            ``state_dict`` sets it too). Save checkpoints after the first call:
            before it the first conv's parameters are uninitialized, which
            ``torch.load(weights_only=True)`` refuses.
        num_classes: :math:`K` (required).
        ndf: width of the first conv (256 in FADA).
        align_corners: of the bilinear upsampling when ``size`` is given
            (``True``, FADA's).

    Shape:
        - Input: :math:`(B, C_{in}, h, w)`, floating point.
        - Output: :math:`(B, 2K, h, w)`, or :math:`(B, 2K, H, W)` when ``size`` is given.

    Low-resolution logits are the default output because :class:`~fada_core.FADALoss`
    upsamples them on the fly far cheaper than materialising them.

    Example:
        >>> D = FineGrainedDiscriminator(in_channels=8, num_classes=3, ndf=16)
        >>> D(torch.randn(2, 8, 5, 7)).shape
        torch.Size([2, 6, 5, 7])
        >>> D(torch.randn(2, 8, 5, 7), size=(40, 56)).shape
        torch.Size([2, 6, 40, 56])
        >>> lazy = FineGrainedDiscriminator(num_classes=3, ndf=16)
        >>> lazy.in_channels is None, lazy(torch.randn(1, 12, 4, 4)).shape, lazy.in_channels
        (True, torch.Size([1, 6, 4, 4]), 12)
    """

    def __init__(
        self,
        in_channels: Optional[int] = None,
        num_classes: Optional[int] = None,
        ndf: int = 256,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        if num_classes is None:
            raise TypeError("num_classes is required: FineGrainedDiscriminator(in_channels=None, num_classes=K)")
        for name, value in (("in_channels", in_channels), ("ndf", ndf)):
            if value is None and name == "in_channels":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if ndf < 2:
            raise ValueError(f"ndf must be >= 2 (the second conv has ndf // 2 channels), got {ndf}")
        self.num_classes = V.check_num_classes(num_classes)
        self.ndf = ndf
        self.align_corners = V.check_bool("align_corners", align_corners)
        first = (
            nn.LazyConv2d(ndf, kernel_size=3, padding=1)
            if in_channels is None
            else nn.Conv2d(in_channels, ndf, kernel_size=3, padding=1)
        )
        self.body = nn.Sequential(
            first,
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf // 2, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.source_head = nn.Conv2d(ndf // 2, num_classes, kernel_size=3, padding=1)
        self.target_head = nn.Conv2d(ndf // 2, num_classes, kernel_size=3, padding=1)

    @property
    def in_channels(self) -> Optional[int]:
        """Feature channels, or ``None`` while the first conv waits for its first input."""
        weight = self.body[0].weight  # (ndf, C_in, 3, 3) once known, whether set by a call or a state_dict
        return None if nn.parameter.is_lazy(weight) else int(weight.shape[1])

    def forward(self, features: Tensor, size: Optional[Union[int, Tuple[int, int]]] = None) -> Tensor:
        V.check_float_tensor("features", features, 4, "(B, C_in, h, w)")
        if self.in_channels is not None:
            V.check_channels("features", features, self.in_channels, f"in_channels={self.in_channels}")
        size = V.check_size(size)
        hidden = self.body(features)
        out = torch.cat((self.source_head(hidden), self.target_head(hidden)), dim=1)
        if size is not None:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=self.align_corners)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, ndf={self.ndf}, "
            f"align_corners={self.align_corners}"
        )
