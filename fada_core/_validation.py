"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right
kind, wrong value) with a message that names the argument and says what was
expected, so a user's mistake never reaches a kernel as a crash or a silently
wrong answer.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

DOMAINS = ("source", "target")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "eager", "kernel")


def check_tensor(name: str, x, ndim: int, shape_doc: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(x.shape)}")
    return x


def check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (logits/features), got dtype {x.dtype}")


def check_float_tensor(name: str, x, ndim: int, shape_doc: str) -> Tensor:
    """A floating-point tensor of ``ndim`` dimensions (logits, features, weights)."""
    check_tensor(name, x, ndim, shape_doc)
    check_float(name, x)
    return x


def check_same_batch(name: str, x: Tensor, other_name: str, other: Tensor) -> None:
    if x.shape[0] != other.shape[0]:
        raise ValueError(f"{name} and {other_name} must share the batch size, got {x.shape[0]} and {other.shape[0]}")


def check_int_labels(name: str, labels: Tensor) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}")


def check_labels_for(name: str, x: Tensor, labels) -> None:
    """``labels``: (B, H, W) integer class indices, with the batch size of ``x`` (checked already)."""
    check_tensor("labels", labels, 3, "(B, H, W)")
    check_int_labels("labels", labels)
    check_same_batch(name, x, "labels", labels)


def check_same_device(**tensors: Optional[Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return num_classes


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0 or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def check_cap(cap) -> float:
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"cap must be a float, got {type(cap).__name__}")
    if not 0 < cap <= 1:
        raise ValueError(f"cap must be in (0, 1], got {cap}")
    return float(cap)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_size(size) -> Optional[Tuple[int, int]]:
    """``size`` is None, an int (square) or a pair of positive ints (H, W)."""
    if size is None:
        return None
    if isinstance(size, torch.Size):
        size = tuple(size)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        raise TypeError(f"size must be None, an int or a pair of ints (H, W), got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_label_range(name: str, labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Labels must lie in [0, K) or equal ignore_index (one reduction, one sync)."""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        found = labels[bad].unique()[:5].tolist()
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes}) or ignore_index={ignore_index}; found {found}"
        )


def check_weight(weight: Optional[Tensor], batch: int, size: Tuple[int, int]) -> Optional[Tensor]:
    if weight is None:
        return None
    check_float_tensor("weight", weight, 3, "(B, H, W)")
    if tuple(weight.shape) != (batch, *size):
        raise ValueError(f"weight must have shape (B, H, W) = {(batch, *size)}, got {tuple(weight.shape)}")
    return weight


def check_fada_inputs(
    disc_logits, seg_logits, domain, size, weight, num_classes: Optional[int] = None
) -> Tuple[int, Tuple[int, int]]:
    """Validate FADA loss / encoding inputs; returns (K, output size)."""
    check_float_tensor("disc_logits", disc_logits, 4, "(B, 2K, h, w)")
    check_float_tensor("seg_logits", seg_logits, 4, "(B, K, h, w)")
    k = seg_logits.shape[1]
    if num_classes is not None and k != num_classes:
        raise ValueError(f"seg_logits must have num_classes={num_classes} channels, got {k}")
    if disc_logits.shape[1] != 2 * k:
        raise ValueError(
            f"disc_logits must have 2K = {2 * k} channels (K={k} from seg_logits), got {disc_logits.shape[1]}"
        )
    check_same_batch("disc_logits", disc_logits, "seg_logits", seg_logits)
    check_choice("domain", domain, DOMAINS)
    size = check_size(size)
    if size is None:
        if disc_logits.shape[-2:] != seg_logits.shape[-2:]:
            raise ValueError(
                "disc_logits and seg_logits have different spatial sizes "
                f"{tuple(disc_logits.shape[-2:])} and {tuple(seg_logits.shape[-2:])}; pass size=(H, W)"
            )
        size = (int(disc_logits.shape[-2]), int(disc_logits.shape[-1]))
    check_weight(weight, disc_logits.shape[0], size)
    check_same_device(disc_logits=disc_logits, seg_logits=seg_logits, weight=weight)
    return k, size


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_channels(name: str, x, expected: int, what: str) -> None:
    """A module's own channel count (``what``, e.g. "num_classes=19"); other checks are the functional's."""
    if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] != expected:
        raise ValueError(f"{name} must have {what} channels, got {x.shape[1]}")


# The check of each option the modules take, by the option's name.
_OPTION_CHECKS = {
    "num_classes": check_num_classes,
    "temperature": check_temperature,
    "cap": check_cap,
    "ignore_index": check_ignore_index,
    "reduction": lambda value: check_choice("reduction", value, REDUCTIONS),
    "backend": lambda value: check_choice("backend", value, BACKENDS),
    "align_corners": lambda value: check_bool("align_corners", value),
}


class OptionsModule(nn.Module):
    """Base of the modules whose constructor only takes options: each is checked once, by its name
    (an error at construction, not at the first call), kept as an attribute and listed by the repr."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._option_names = tuple(options)
        for name, value in options.items():
            setattr(self, name, _OPTION_CHECKS[name](value))

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._option_names)
