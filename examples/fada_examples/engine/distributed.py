"""torch.distributed and device helpers: the device to run on, torchrun initialisation, rank queries,
gradient and metric reduction. The one home of these for the training, evaluation and analysis code."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Tuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "resolve_device", "setup_device", "init_distributed", "is_distributed", "rank",
           "world_size", "is_main", "barrier", "average_gradients", "broadcast_module", "reduce_mean", "unwrap",
           "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1).

    NCCL on CUDA, gloo on the CPU. Without torchrun (or WORLD_SIZE=1) nothing happens.
    """
    if _launched_world_size() <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def _launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it), known before initialisation."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when visible, else the CPU; under torchrun, ``cuda`` -> ``cuda:LOCAL_RANK``.
    Asking for CUDA without a visible device is an error (no silent CPU fallback)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} requested but no CUDA device is visible")
        if name == "cuda" and _launched_world_size() > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def setup_device(name: str = "auto") -> Tuple[torch.device, bool]:
    """``(device, distributed)`` for the entry scripts: the device of :func:`resolve_device`, with the
    process group initialised when launched by torchrun (see :func:`init_distributed`)."""
    device = resolve_device(name)
    return device, init_distributed(device.type).distributed


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make parameters and buffers equal to rank ``src``'s (for modules not wrapped in DDP)."""
    if not is_distributed():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """All-reduce and average ``.grad`` of ``params`` over ranks (what DDP does, done by hand for
    the discriminator, whose step runs two forwards before one backward)."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def reduce_mean(values: Dict[str, float], device) -> Dict[str, float]:
    """Average a dict of floats over ranks (for logging losses)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
