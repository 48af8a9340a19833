"""Which data a run uses: the data roots of a config, checked, or the synthetic data.

The synthetic data is used only when *no* data root is given at all, and the run says so. A root
that is given must be a non-empty folder; otherwise the error names the config key, so a typo in
a path never turns a real-data run into a synthetic one. The shipped real-data configs name the
official locations (``datasets/gta5``, ``datasets/cityscapes``, ...), so running one without its
data is an error, not a synthetic run.
"""
from __future__ import annotations

import os
from typing import Mapping

__all__ = ["ROOT_KEYS", "uses_synthetic_data", "check_root", "synthetic_notice", "announce_synthetic"]

ROOT_KEYS = ("source_root", "target_root", "test_root")
_announced: set = set()  # folders already announced by this process (one line per run, not per stage)


def check_root(path: str, key: str) -> str:
    """``path`` if it is a non-empty folder; else an error naming ``key`` (e.g. ``datasets.source_root``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}={path!r} is not a folder: give the data set's root "
                                f"(or no data root at all for the synthetic demo data)")
    if not os.listdir(path):
        raise ValueError(f"{key}={path!r} is an empty folder: give the data set's root")
    return path


def uses_synthetic_data(datasets: Mapping) -> bool:
    """True when none of ``datasets.{source,target,test}_root`` is given (synthetic run).

    Otherwise every given root is checked (:func:`check_root`), and source and target must both
    be given.
    """
    given = {k: str(datasets.get(k) or "") for k in ROOT_KEYS}
    if not any(given.values()):
        return True
    missing = [f"datasets.{k}" for k in ("source_root", "target_root") if not given[k]]
    if missing:
        raise ValueError(f"{' and '.join(missing)} is empty: give both data roots (or no data root at all, "
                         f"for the synthetic data)")
    for key, path in given.items():
        if path:
            check_root(path, f"datasets.{key}")
    return False


def synthetic_notice(folder: str) -> str:
    """The line a run prints when it uses the synthetic data."""
    return (f"no data root given (datasets.source_root / target_root): using the synthetic GTA5-like / "
            f"Cityscapes-like data in {folder} (a demo, not a benchmark)")


def announce_synthetic(folder: str) -> None:
    """Print :func:`synthetic_notice` once per process and folder."""
    key = os.path.abspath(folder)
    if key not in _announced:
        _announced.add(key)
        print(synthetic_notice(folder), flush=True)
