"""Training logs: a CSV file with units in the header, optional TensorBoard, a tqdm progress bar."""
from __future__ import annotations

import csv
import os
import resource
import sys
from typing import Dict, List, Optional, Sequence

import torch

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the examples extra
    tqdm = None

__all__ = ["CSVLogger", "TensorBoardLogger", "ProgressBar", "TrainingLog", "peak_memory_mib", "read_csv_log"]


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**20 if sys.platform == "darwin" else 2**10)


class CSVLogger:
    """One row per iteration. Columns carry their unit (``time_s``, ``peak_mem_mib``; losses in nats).

    When resuming, rows beyond the resumed iteration (written after the last checkpoint by the
    interrupted run) are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str, columns: Sequence[str], resume_iteration: Optional[int] = None) -> None:
        self.path = path
        self.columns = list(columns)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        rows: List[Dict[str, str]] = []
        if resume_iteration is not None and os.path.isfile(path):
            rows = [r for r in read_csv_log(path) if int(r["iteration"]) <= resume_iteration]
        self._fh = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, extrasaction="ignore")
        self._writer.writeheader()
        for r in rows:
            self._writer.writerow(r)
        self._fh.flush()

    def log(self, row: Dict[str, float]) -> None:
        self._writer.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_csv_log(path: str) -> List[Dict[str, str]]:
    with open(path, "r", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


class TensorBoardLogger:
    """Scalars to TensorBoard when ``tensorboard`` is importable; a no-op otherwise."""

    def __init__(self, log_dir: str, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, scalars: Dict[str, float], step: int, prefix: str = "train") -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """tqdm bar over iterations with ETA, losses, learning rate and peak memory (rank 0 only)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled and tqdm is not None:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, postfix: Dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrainingLog:
    """What a training loop reports per iteration: CSV row, TensorBoard scalars, progress bar, a text
    line every ``log_period`` iterations, and the in-memory history (all on rank 0 but the history)."""

    def __init__(self, stage_dir: str, stage: str, columns: Sequence[str], start: int, stop: int, *,
                 resumed: bool, log_period: int, main: bool, progress: bool, tensorboard: bool) -> None:
        self.stage, self.stop, self.log_period, self.main = stage, stop, log_period, main
        self.csv = CSVLogger(os.path.join(stage_dir, "log.csv"), columns, start if resumed else None) if main else None
        self.tb = TensorBoardLogger(os.path.join(stage_dir, "tb"), tensorboard and main)
        self.bar = ProgressBar(stop, start, f"stage {stage}", progress and main)
        self.history: List[Dict[str, float]] = []

    def log(self, row: Dict[str, float], losses: Dict[str, float]) -> None:
        """``row``: iteration, lr (and lr_D), time_s, data_time_s, peak_mem_mib; ``losses``: name -> value."""
        row = {**row, **losses}
        self.history.append(row)
        if not self.main:
            return
        iteration, lr, mem = row["iteration"], row["lr"], row["peak_mem_mib"]
        self.csv.log(row)
        self.tb.log({**losses, "lr": lr}, iteration)
        self.bar.update({**{n: f"{v:.4f}" for n, v in losses.items()}, "lr": f"{lr:.2e}", "mem": f"{mem:.0f}MiB"})
        if iteration % self.log_period == 0 or iteration == self.stop:
            recent = self.history[-20:]
            eta = (self.stop - iteration) * sum(r["time_s"] for r in recent) / len(recent)
            self.bar.write(f"[{self.stage}] iter {iteration}/{self.stop}  "
                           + "  ".join(f"{n} {v:.4f}" for n, v in losses.items())
                           + f"  lr {lr:.3e}  {row['time_s']:.2f} s/it  eta {eta / 60:.1f} min  peak mem {mem:.0f} MiB")

    def close(self) -> None:
        self.bar.close()
        self.tb.close()
        if self.csv is not None:
            self.csv.close()
