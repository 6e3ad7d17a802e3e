"""Training: the loop, schedules, checkpoints, metrics and plots."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .metrics import classification_report, confusion_matrix, format_report
from .schedules import CosineWarmup, ReduceOnPlateau, StepDecay, make_schedule
from .trainer import (Recipe, RunFolderError, Trainer, TrainingDiverged, clip_grad_norm, load_model, predict_proba,
                      train_step)

__all__ = ["Recipe", "RunFolderError", "Trainer", "TrainingDiverged", "clip_grad_norm", "load_model", "predict_proba", "train_step",
           "CheckpointError", "load_checkpoint", "save_checkpoint", "classification_report",
           "confusion_matrix", "format_report", "CosineWarmup", "StepDecay", "ReduceOnPlateau",
           "make_schedule"]
