"""Class Center Distance as a streaming, DDP-aware metric."""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from einops import pack, unpack
from torch import Tensor

from . import _validation as V
from . import functional as FF
from .functional import CCDResult, ClassCenterStats


class ClassCenterDistance(V.OptionsModule):
    r"""Class Center Distance (FADA, section 4), accumulated batch by batch.

    .. math:: \mathrm{CCD}(i, j) = \frac{\frac{1}{|S_i|}\sum_{x \in S_i}\|x - \mu_i\|^2}
        {\|\mu_i - \mu_j\|^2},\qquad
        \mathrm{CCD}_i = \operatorname{mean}_{j \ne i} \mathrm{CCD}(i, j)

    Shaped like a torchmetrics ``Metric``: :meth:`update` adds a batch,
    :meth:`compute` finishes (reducing over ``torch.distributed`` ranks when a
    process group is initialised), :meth:`reset` clears, and the states live in
    the ``state_dict``. The per-class count, center and centred sum of squares
    are kept in float64 and merged exactly (Chan et al.), so features with a
    large common offset lose no precision and the result does not depend on
    how the data set is split into batches or ranks.

    Args:
        num_classes: :math:`K`.
        ignore_index: label to skip (255).
        backend: ``"auto"`` | ``"eager"`` | ``"kernel"`` for the statistics.

    Shape:
        - features: :math:`(B, C, h, w)`.
        - labels: :math:`(B, H, W)` integers; resized to :math:`h \times w`
          with nearest interpolation when they differ.

    Example:
        >>> ccd = ClassCenterDistance(num_classes=3, backend="eager")
        >>> f = torch.randn(2, 4, 8, 8); y = torch.randint(0, 3, (2, 32, 32))
        >>> ccd.update(f, y)
        >>> r = ccd.compute()
        >>> r.matrix.shape, bool(r.present.all())
        (torch.Size([3, 3]), True)
    """

    counts: Tensor
    means: Tensor
    m2: Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, backend: str = "auto") -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, backend=backend)
        k = self.num_classes
        self.register_buffer("counts", torch.zeros(k, dtype=torch.float64))
        # the feature width is known at the first update; until then (K, 0)
        self.register_buffer("means", torch.zeros(k, 0, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(k, dtype=torch.float64))

    # ------------------------------------------------------------------ state
    def _stats(self) -> ClassCenterStats:
        return ClassCenterStats(self.counts, self.means, self.m2)

    def _set_stats(self, stats: ClassCenterStats) -> None:
        self.counts, self.means, self.m2 = stats.counts, stats.means, stats.m2

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._set_stats(
            ClassCenterStats(
                torch.zeros_like(self.counts), self.means.new_zeros(self.num_classes, 0), torch.zeros_like(self.m2)
            )
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the width of `means` is data-dependent: adopt the saved one before copying
        key = prefix + "means"
        if key in state_dict:
            self.means = torch.zeros_like(state_dict[key], device=self.means.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ API
    def batch_stats(self, features: Tensor, labels: Tensor) -> ClassCenterStats:
        """Statistics of one batch (validates the inputs)."""
        V.check_tensor("features", features, 4, "(B, C, h, w)")
        if self.means.shape[1] and features.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"features must keep the channel count of earlier updates ({self.means.shape[1]}), "
                f"got {features.shape[1]}"
            )
        return FF.class_center_stats(features, labels, self.num_classes, self.ignore_index, self.backend)

    def _accumulate(self, batch: ClassCenterStats) -> None:
        if self.counts.device != batch.counts.device:
            self.to(batch.counts.device)
        current = self._stats()
        if current.means.shape[1] == 0:
            current = ClassCenterStats(current.counts, torch.zeros_like(batch.means), current.m2)
        self._set_stats(FF.merge_class_center_stats(current, batch))

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of features (B, C, h, w) with their labels (B, H, W)."""
        self._accumulate(self.batch_stats(features, labels))

    @torch.no_grad()
    def forward(self, features: Tensor, labels: Tensor) -> CCDResult:
        """Update with the batch and return the batch's own CCD."""
        batch = self.batch_stats(features, labels)
        self._accumulate(batch)
        return FF.class_center_distance(batch)

    @torch.no_grad()
    def compute(self) -> CCDResult:
        """CCD over everything seen, on every rank when distributed.

        Raises ``RuntimeError`` when no pixel has been counted (no update since
        construction or :meth:`reset`, or every label was ``ignore_index``).
        """
        stats = self._synced_stats()
        if not bool((stats.counts > 0).any()):
            raise RuntimeError(
                "ClassCenterDistance.compute(): no data: no pixel has been counted since construction or reset() "
                f"(call update(features, labels) first; labels equal to ignore_index={self.ignore_index} are skipped)"
            )
        return FF.class_center_distance(stats)

    def _synced_stats(self) -> ClassCenterStats:
        stats = self._stats()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return stats
        # gather every rank's (n, mean, m2) and merge in rank order: exact and identical everywhere
        world = dist.get_world_size()
        width = torch.tensor([stats.means.shape[1]], device=stats.counts.device)
        widths = [torch.zeros_like(width) for _ in range(world)]
        dist.all_gather(widths, width)
        channels = max(int(w) for w in widths)
        means = stats.means if stats.means.shape[1] == channels else stats.means.new_zeros(self.num_classes, channels)
        packed, columns = pack([stats.counts, stats.m2, means], "k *")  # one (K, 2 + C) tensor, one collective
        gathered: List[Tensor] = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        merged = None
        for part in gathered:
            counts, m2, part_means = unpack(part, columns, "k *")
            rank_stats = ClassCenterStats(counts, part_means, m2)
            merged = rank_stats if merged is None else FF.merge_class_center_stats(merged, rank_stats)
        return merged
