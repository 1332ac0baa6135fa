"""Class-incremental segmentation methods: finetune, joint, MiB, PLOP, LSKD.

Each :class:`Method` returns named, unweighted loss terms (each times its base factor);
the trainer sums them with weights. ``build_method(name, **kwargs)`` makes one by name.
"""

from __future__ import annotations

from typing import Dict, Type

from ..terms import MAP_NAMES, RELEASED_SCHEMES, SCHEMES
from .base import (
    IGNORE_INDEX,
    Method,
    StepContext,
    class_argmax,
    collapse_new_into_background,
    cross_entropy,
    pod_scales,
    upsample_logits,
)
from .finetune import Finetune
from .joint import Joint
from .lskd import (
    LSKD,
    RELEASED_MAP_FACTORS,
    SEARCH,
    erase_images,
    split_output,
    teacher_triplet,
)
from .mib import MiB, unbiased_cross_entropy, unbiased_kd
from .plop import PLOP, EntropyPseudoLabeler, histogram_median, normalized_entropy, pseudo_label

METHODS: Dict[str, Type[Method]] = {
    "finetune": Finetune,
    "joint": Joint,
    "mib": MiB,
    "plop": PLOP,
    "lskd": LSKD,
}


def build_method(name: str, **kwargs) -> Method:
    """``build_method("lskd", schemes={...})`` -> a :class:`Method` instance."""
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[key](**kwargs)


__all__ = [
    "IGNORE_INDEX",
    "Method",
    "StepContext",
    "METHODS",
    "build_method",
    "Finetune",
    "Joint",
    "MiB",
    "PLOP",
    "LSKD",
    "SCHEMES",
    "RELEASED_SCHEMES",
    "MAP_NAMES",
    "SEARCH",
    "RELEASED_MAP_FACTORS",
    "unbiased_cross_entropy",
    "unbiased_kd",
    "normalized_entropy",
    "histogram_median",
    "pseudo_label",
    "EntropyPseudoLabeler",
    "erase_images",
    "split_output",
    "teacher_triplet",
    "collapse_new_into_background",
    "cross_entropy",
    "pod_scales",
    "upsample_logits",
    "class_argmax",
]
