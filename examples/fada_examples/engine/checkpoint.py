"""Checkpoints holding everything an exact resume needs.

A checkpoint (``<stage dir>/model_iterNNNNNN.pth``, and ``last.pth``) is a dict with:
``stage``, ``iteration``, ``feature_extractor``, ``classifier``, ``discriminator`` (stage 2),
``optimizer_fea``, ``optimizer_cls``, ``optimizer_D``, ``scheduler`` (the poly schedule's state:
base learning rates, max_iter, power, iteration), ``scaler``/``scaler_D`` (fp16), ``rng``
(python / numpy / torch / cuda states), ``sampler`` (seed and next draw; the data order is a pure
function of the iteration, see :mod:`.sampling`) and ``config``. State dicts are stored without a
DDP ``module.`` prefix, so checkpoints move freely between single- and multi-GPU runs.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint", "checkpoint_path", "latest_checkpoint"]


def capture_rng() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def checkpoint_path(stage_dir: str, iteration: int) -> str:
    return os.path.join(stage_dir, f"model_iter{iteration:06d}.pth")


def save_checkpoint(path: str, state: Dict[str, Any], also_last: bool = True) -> None:
    """Atomic write (temp file + rename); ``last.pth`` next to it points at the newest state."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    if also_last:
        last = os.path.join(os.path.dirname(path), "last.pth")
        tmp = last + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, last)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(stage_dir: str) -> Optional[str]:
    last = os.path.join(stage_dir, "last.pth")
    return last if os.path.isfile(last) else None
