"""Functional API: the fused LSKD distillation operators.

``pod_distill`` (Local POD / MD), ``sop_distill`` (MCD), ``distill_terms``
(several of those terms in one fused call), ``md_masks``, ``ce_unkd`` (the
cross-entropy and UNKD on upsampled logits) and ``pseudo_labels`` (PLOP's
entropy pseudo-labels on upsampled teacher logits),
each with ``backend="auto" | "reference" | "cpu" | "cuda" | "triton"``.
"""

from ._backends import BACKENDS, available_backends
from .ce_unkd import CeUnkd, ce_unkd
from .distill_terms import PodTerm, SopTerm, Term, distill_terms
from .md_masks import batched_quantile, md_masks, md_statistics
from .pod_distill import pod_distill
from .pseudo_labels import PseudoLabels, pseudo_labels
from .sop_distill import sop_distill

__all__ = [
    "BACKENDS",
    "available_backends",
    "pod_distill",
    "sop_distill",
    "distill_terms",
    "ce_unkd",
    "CeUnkd",
    "PodTerm",
    "SopTerm",
    "Term",
    "md_masks",
    "md_statistics",
    "batched_quantile",
    "pseudo_labels",
    "PseudoLabels",
]
