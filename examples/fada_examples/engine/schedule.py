"""The official poly learning-rate schedule as a ``torch.optim.lr_scheduler`` scheduler."""
from __future__ import annotations

from typing import List

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["poly_lr", "PolyLR"]


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """Official ``adjust_learning_rate('poly', ...)``: base * (1 - it / max_iter) ** power."""
    return base_lr * (1.0 - float(iteration) / max_iter) ** power


class PolyLR(LRScheduler):
    """lr at iteration ``i`` (before that iteration's step) = ``poly_lr(base_lr, i, ...) * multiplier``.

    The official scripts compute the poly value first and multiply it by 10 for the classifier
    (``current_lr * 10``). LambdaLR would compute ``(base_lr * 10) * factor`` instead, which differs
    from it in the last bit in about a quarter of the iterations; this keeps the official order, so
    every learning rate equals the official one exactly. Call :meth:`step` once per iteration, after
    the optimiser's step; the state (``last_epoch`` = iterations done) goes into checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, max_iter: int, power: float,
                 multiplier: float = 1.0, last_epoch: int = -1) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.base_lr, self.max_iter, self.power = float(base_lr), int(max_iter), float(power)
        self.multiplier = float(multiplier)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        lr = poly_lr(self.base_lr, self.last_epoch, self.max_iter, self.power) * self.multiplier
        return [lr for _ in self.optimizer.param_groups]
