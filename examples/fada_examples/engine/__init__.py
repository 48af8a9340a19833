"""Training engine: the three FADA stages, checkpoints, logs, seeded sampling, DDP helpers."""
from .checkpoint import load_checkpoint, save_checkpoint
from .pipeline import STAGE_TITLES, format_summary, run_pipeline
from .trainer import (StageResult, evaluate_models, generate_pseudo_labels, poly_lr, prepare_data, resolve_device,
                      train_stage)

__all__ = ["STAGE_TITLES", "StageResult", "evaluate_models", "format_summary", "generate_pseudo_labels",
           "load_checkpoint", "poly_lr", "prepare_data", "resolve_device", "run_pipeline", "save_checkpoint",
           "train_stage"]
