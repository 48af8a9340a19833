"""Helpers shared by the text tables and CSV writers of evaluation.py and analysis.py."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

__all__ = ["resolve_class_names", "format_number"]


def resolve_class_names(class_names: Optional[Sequence[str]], k: int) -> List[str]:
    """``class_names`` checked to hold ``k`` names, or ``class_0 .. class_{k-1}`` when None."""
    if class_names is None:
        return [f"class_{i}" for i in range(k)]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names given for {k} classes")
    return list(class_names)


def format_number(value, spec: str = ".6g", nan: str = "nan") -> str:
    """``value`` formatted with ``spec``; ``nan`` (e.g. "n/a") for NaN and infinities."""
    value = float(value)
    return nan if not np.isfinite(value) else format(value, spec)
