"""Segmentation metrics of class-incremental runs (docs/MATHEMATICS.md §6.3).

After step ``t`` the evaluation labels keep the classes learnt so far and map every other class
to 255 (:func:`lskd.data.eval_lut`); the prediction is the argmax over all the model's outputs.
The confusion matrix ``cm[K, K]`` (rows = ground truth, columns = prediction, int64) counts the
non-ignored pixels. Per class ``IoU_c = cm[c, c] / (sum_row_c + sum_col_c - cm[c, c])``; a class
with neither ground truth nor prediction has an undefined IoU (NaN), which is left out of the
means (and written ``null`` in JSON).

mIoU groups (docs/MATHEMATICS.md §6.3): "old" = the classes of step 0 (``0..|C^0|-1``, background included),
"new" = the classes learnt at steps ``1..t`` (undefined at step 0), "all" = every class learnt
up to ``t``. All three are in percent in the reports.

Under torch.distributed the per-rank confusion matrices are summed (:func:`reduce_confusion`)
before any ratio is taken, so the metrics are those of the whole evaluation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "confusion_matrix",
    "reduce_confusion",
    "iou_per_class",
    "mean_iou",
    "StepMetrics",
    "step_metrics",
]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``cm[K, K]`` int64 of one batch: ``cm[g, p]`` = #pixels of ground truth g predicted p.

    Args:
        pred: ``[N, H, W]`` int predictions in ``0..K-1``.
        target: ``[N, H, W]`` int labels; ``ignore_index`` pixels are not counted. Label values
            ``>= K`` (other than the ignore value) are an error.
        num_classes: K.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    valid = target != ignore_index
    t = target[valid].to(torch.int64)
    p = pred[valid].to(torch.int64)
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"confusion_matrix: label values outside 0..{num_classes - 1} (and {ignore_index})")
    if p.numel() and (int(p.max()) >= num_classes or int(p.min()) < 0):
        raise ValueError(f"confusion_matrix: predictions outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def reduce_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over the ranks of the default process group (no-op without one).

    Runs the all-reduce on the tensor's device (CPU tensors need gloo; with NCCL the matrix is
    moved to the current CUDA device and back).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cm
    device = cm.device
    work = cm.clone()
    if dist.get_backend() == "nccl" and device.type != "cuda":
        work = work.cuda()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(device)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """``[K]`` float64 IoU from ``cm[K, K]``; NaN where the class has neither ground truth nor prediction."""
    cm = cm.to(torch.float64)
    tp = cm.diag()
    union = cm.sum(dim=0) + cm.sum(dim=1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(iou: torch.Tensor, classes: Sequence[int]) -> Optional[float]:
    """Mean IoU (a fraction) over ``classes``, ignoring NaNs; None when no class has an IoU."""
    if len(classes) == 0:
        return None
    vals = iou[list(classes)]
    vals = vals[~torch.isnan(vals)]
    if vals.numel() == 0:
        return None
    return float(vals.mean())


def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else 100.0 * x


@dataclass
class StepMetrics:
    """Metrics after one step. mIoU in percent (None when undefined, e.g. "new" at step 0);
    ``iou`` maps each learnt class name to its IoU in percent (None when undefined)."""

    step: int
    classes: List[str]
    miou_old: Optional[float]
    miou_new: Optional[float]
    miou_all: Optional[float]
    iou: Dict[str, Optional[float]]

    def to_dict(self) -> dict:
        """The summary.json entry ``{"step", "classes", "miou_old", "miou_new", "miou_all", "iou"}``."""
        return {
            "step": self.step,
            "classes": list(self.classes),
            "miou_old": self.miou_old,
            "miou_new": self.miou_new,
            "miou_all": self.miou_all,
            "iou": dict(self.iou),
        }


def step_metrics(
    cm: torch.Tensor,
    step: int,
    base_classes: Sequence[int],
    learnt_classes: Sequence[int],
    class_names: Sequence[str],
    step_classes: Sequence[int],
) -> StepMetrics:
    """Old/new/all mIoU and per-class IoU after ``step``.

    Args:
        cm: ``[K, K]`` confusion matrix (already reduced over ranks).
        step: the step index written in the report.
        base_classes: the classes of step 0 (background included) = the "old" group.
        learnt_classes: every class learnt up to ``step`` ("all"); "new" = learnt minus base.
        class_names: names of the K class ids.
        step_classes: the classes learnt at this step (the report's ``classes`` field).
    """
    iou = iou_per_class(cm)
    base = [c for c in learnt_classes if c in set(base_classes)]
    new = [c for c in learnt_classes if c not in set(base_classes)]
    return StepMetrics(
        step=int(step),
        classes=[class_names[c] for c in step_classes],
        miou_old=_pct(mean_iou(iou, base)),
        miou_new=_pct(mean_iou(iou, new)),
        miou_all=_pct(mean_iou(iou, list(learnt_classes))),
        iou={class_names[c]: _pct(float(iou[c])) for c in sorted(learnt_classes)},
    )
