"""pseudo_labels: PLOP's entropy pseudo-labels on bilinearly upsampled teacher logits, fused.

Reference: lskd.reference.pseudo_labels. CPU kernel: csrc/cpu/pseudo_labels.cpp. CUDA kernel:
csrc/cuda/pseudo_labels.cu. Triton kernel: kernels/pseudo_labels.py. Schema:
csrc/pseudo_labels.cpp. The kernels interpolate the teacher's logits at the eligible pixels
only (label < O) and never write them at the label resolution; they take the entropy, the
argmax and the threshold per pixel and count per image (docs/MATHEMATICS.md §2.5). No gradient:
the pseudo-labels are the teacher's. This module registers the fake kernels of the C++
("lskd::") and the Triton ("lskd_triton::") op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _extension, reference
from .._dtypes import acc_dtype
from .._validation import check_features
from ._backends import on_triton_load, resolve_backend

__all__ = ["pseudo_labels", "PseudoLabels"]

OP = "pseudo_labels"


class PseudoLabels(NamedTuple):
    """``targets [N, H, W]`` int64 and the per-image counts ``accepted``, ``eligible`` ``[N]`` int64."""

    targets: torch.Tensor
    accepted: torch.Tensor
    eligible: torch.Tensor


def _fake(teacher, labels, thresholds, ignore_index):
    n = labels.shape[0]
    return labels.new_empty(labels.shape), labels.new_empty((n,)), labels.new_empty((n,))


if _extension.has_cpu_kernels():
    torch.library.register_fake("lskd::pseudo_labels")(_fake)
on_triton_load(lambda: torch.library.register_fake("lskd_triton::pseudo_labels")(_fake))


def _check_inputs(teacher: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> None:
    """Shapes, dtypes and devices (:func:`pseudo_labels`)."""
    check_features(OP, teacher=teacher)
    n, o = teacher.shape[:2]
    if not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.dim() != 3 or labels.shape[0] != n:
        got = f"{labels.dtype} {list(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"{OP}: labels must be int64 [N={n}, H, W], got {got}")
    if labels.numel() == 0:
        raise ValueError(f"{OP}: labels {list(labels.shape)} are empty")
    if labels.device != teacher.device:
        raise ValueError(f"{OP}: labels are on {labels.device}, the teacher on {teacher.device}")
    if not torch.is_tensor(thresholds) or thresholds.shape != (o,) or not thresholds.is_floating_point():
        raise ValueError(f"{OP}: thresholds must be a float tensor of shape [O] = [{o}], got {thresholds!r:.80}")


def pseudo_labels(
    teacher: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int = 255,
    backend: str = "auto",
) -> PseudoLabels:
    """PLOP's entropy pseudo-labels of the background and old-class pixels (docs/MATHEMATICS.md §2.5).

    Args:
        teacher: the old model's logits ``[N, O, h, w]`` (O: background and old classes),
            float32/float64/bfloat16/float16, any strides; upsampled bilinearly (align_corners=False)
            to the labels' resolution in float32 (float64 for float64 logits). No gradient.
        labels: ``[N, H, W]`` int64, the step's labels (values < O: background or old, eligible).
        thresholds: ``[O]`` per-class thresholds of the normalised entropy.
        ignore_index: the label given to a rejected pixel.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        :class:`PseudoLabels`: ``targets``: an eligible pixel becomes the teacher's first argmax
        class c* where ``entropy / log O < thresholds[c*]``, else ``ignore_index``; the others keep
        their label. ``accepted[n]``, ``eligible[n]``: the image's accepted and eligible pixels.
    """
    _check_inputs(teacher, labels, thresholds)
    acc = acc_dtype(teacher.dtype)
    teacher = teacher.detach()
    labels = labels.contiguous()
    thresholds = thresholds.detach().to(device=teacher.device, dtype=acc).contiguous()
    impl = resolve_backend(OP, backend, teacher.device)
    if impl == "reference":
        return PseudoLabels(*reference.pseudo_labels(teacher.to(acc), labels, thresholds, ignore_index))
    ops = torch.ops.lskd_triton if impl == "triton" else torch.ops.lskd
    return PseudoLabels(*ops.pseudo_labels(teacher, labels, thresholds, int(ignore_index)))
