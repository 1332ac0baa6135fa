"""lskd: layer-specific knowledge distillation for class-incremental semantic segmentation.

``lskd.ops`` holds the fused distillation operators (functional), ``lskd.nn``
the same as modules, ``lskd.reference`` their plain PyTorch definitions.
"""

from . import (
    _extension,  # noqa: F401  (loads lskd._C or warns once)
    nn,
    ops,
    reference,
)
from .ops import (
    PodTerm,
    SopTerm,
    available_backends,
    ce_unkd,
    distill_terms,
    md_masks,
    pod_distill,
    pseudo_labels,
    sop_distill,
)

__version__ = "0.1.0"

__all__ = [
    "ops",
    "nn",
    "reference",
    "pod_distill",
    "sop_distill",
    "distill_terms",
    "PodTerm",
    "SopTerm",
    "md_masks",
    "ce_unkd",
    "pseudo_labels",
    "available_backends",
    "__version__",
]
