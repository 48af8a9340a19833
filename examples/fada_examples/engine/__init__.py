"""Training engine: the three FADA stages, checkpoints, logs, seeded sampling, DDP helpers."""
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import resolve_device, setup_device
from .pipeline import STAGE_TITLES, format_summary, run_pipeline
from .schedule import PolyLR, poly_lr
from .trainer import StageResult, evaluate_models, generate_pseudo_labels, prepare_data, train_stage

__all__ = ["STAGE_TITLES", "PolyLR", "StageResult", "evaluate_models", "format_summary", "generate_pseudo_labels",
           "load_checkpoint", "poly_lr", "prepare_data", "resolve_device", "run_pipeline", "save_checkpoint",
           "setup_device", "train_stage"]
