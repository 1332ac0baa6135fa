"""Data layer: dataset readers, incremental tasks, transforms and the synthetic benchmark.

Samples: images ``[3, H, W]`` float32 normalised with the ImageNet mean/std, labels ``[H, W]``
int64 with class ids 0..K-1 (0 = background) and 255 = ignore.
"""

from .datasets import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    ADE20KSegmentation,
    IncrementalSubset,
    SegmentationDataset,
    SegmentationFolder,
    VOCSegmentation,
    check_labels,
    image_classes,
    load_dataset,
    step_indices,
)
from .synthetic import make_synthetic
from .tasks import IGNORE, Task, eval_lut, parse_task, select_images, train_lut
from .transforms import EvalTransform, TrainTransform, pad_collate, seed_worker

__all__ = [
    "IGNORE",
    "Task",
    "parse_task",
    "select_images",
    "train_lut",
    "eval_lut",
    "SegmentationDataset",
    "SegmentationFolder",
    "VOCSegmentation",
    "ADE20KSegmentation",
    "IncrementalSubset",
    "load_dataset",
    "image_classes",
    "step_indices",
    "check_labels",
    "VOC_CLASSES",
    "ADE20K_CLASSES",
    "TrainTransform",
    "EvalTransform",
    "pad_collate",
    "seed_worker",
    "make_synthetic",
]
