"""Training layer: the step/epoch loops, checkpoints, metrics, DDP set-up, loss weighting, reports.

``train(TrainConfig(...)) -> summary`` runs every step of a class-incremental task (see
:mod:`lskd.train.trainer`); ``evaluate_run(out)`` re-evaluates a finished run.
"""

from ..weighting import FixedWeights, Weighting, build_weighting, parse_weights
from .batching import epoch_batches
from .checkpoint import CheckpointCorrupt, CheckpointMismatch, atomic_save, load_checkpoint, rng_state, set_rng_state
from .config import DATASETS, DEFAULT_EPOCHS, RunError, TrainConfig, TrainingDiverged
from .distributed import DistContext, cleanup_distributed, init_distributed
from .evaluation import evaluate_model, evaluate_run
from .metrics import StepMetrics, confusion_matrix, iou_per_class, mean_iou, reduce_confusion, step_metrics
from .report import format_table, write_reports
from .trainer import Trainer, train

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "evaluate_run",
    "evaluate_model",
    "epoch_batches",
    "RunError",
    "TrainingDiverged",
    "DATASETS",
    "DEFAULT_EPOCHS",
    "CheckpointMismatch",
    "CheckpointCorrupt",
    "atomic_save",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "DistContext",
    "init_distributed",
    "cleanup_distributed",
    "StepMetrics",
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "reduce_confusion",
    "step_metrics",
    "format_table",
    "write_reports",
    "Weighting",
    "FixedWeights",
    "build_weighting",
    "parse_weights",
]
