"""MiB (Cermelli et al., CVPR 2020): unbiased cross-entropy and unbiased knowledge distillation.

Both losses model the background shift: at step t the student's background at a pixel
labelled 0 may be an old class (UNCE merges background and old classes), and the
teacher's background may be a new class (UNKD merges background and new classes).
:func:`unbiased_cross_entropy` and :func:`unbiased_kd` are the eager definitions of UNCE and UNKD
(L2 = 10 * UNKD, docs/MATHEMATICS.md §3.3); MiB computes both fused (:func:`lskd.ce_unkd` with
``merged_classes`` = the old classes), LSKD its UNKD. UNCE averages over ALL pixels, ignored
ones counting as 0, as the released code does (``mean_over="valid"``: over the
non-ignored pixels).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..models.deeplab import SegOutput
from .base import IGNORE_INDEX, Method, StepContext, teacher_like, to_acc, upsample_logits

__all__ = ["MEAN_OVER", "unbiased_cross_entropy", "unbiased_kd", "MiB"]


MEAN_OVER = ("all", "valid")


def unbiased_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_classes: int,
    ignore_index: int = IGNORE_INDEX,
    mean_over: str = "all",
) -> torch.Tensor:
    """UNCE: cross-entropy where the background probability is that of background OR an old class.

    Args:
        logits: student logits ``[N, K, H, W]`` (upsampled bilinearly to the labels if smaller).
        labels: ``[N, H, W]`` int64; values < O count as background, ``ignore_index`` is ignored.
        old_classes: O (>= 1).
        mean_over: ``"all"`` (default, as released): the sum of ``-log q(y)`` over the non-ignored
            pixels divided by ALL N*H*W pixels (ignored pixels count as 0); ``"valid"``: divided by
            the number of non-ignored pixels (0 when none is valid, never NaN).

    Returns:
        a scalar: ``-log q(y)`` per pixel with ``log q(bg) = logsumexp(z[:O]) - logsumexp(z)`` for
        y < O and ``log q(c) = z_c - logsumexp(z)`` for y >= O, averaged as ``mean_over`` says.

    The release (MiB's, PLOP's and LSKD's code) builds ``UnbiasedCrossEntropy(reduction='none')``
    (LSKD ``train.py`` l. 46 and 52-53): ``F.nll_loss(..., ignore_index=255, reduction='none')``
    (``utils/loss.py`` l. 166) is 0 at ignored pixels, and the trainer then takes ``loss.mean()``
    over every pixel (``train.py`` l. 412). The papers do not state the normalisation; the default
    follows the release.
    """
    logits = to_acc(upsample_logits(logits, labels.shape[-2:]))
    if not 1 <= old_classes <= logits.shape[1]:
        raise ValueError(f"unbiased_cross_entropy: old_classes must be in [1, {logits.shape[1]}], got {old_classes}")
    if mean_over not in MEAN_OVER:
        raise ValueError(f"unbiased_cross_entropy: mean_over must be one of {MEAN_OVER}, got {mean_over!r}")
    den = torch.logsumexp(logits, dim=1, keepdim=True)
    log_bg = torch.logsumexp(logits[:, :old_classes], dim=1, keepdim=True) - den
    log_probs = torch.cat([log_bg, logits[:, old_classes:] - den], dim=1)  # [N, 1 + K - O, H, W]
    valid = labels != ignore_index
    targets = torch.where(labels < old_classes, torch.zeros_like(labels), labels - old_classes + 1)
    targets = torch.where(valid, targets, torch.full_like(labels, ignore_index))
    loss = F.nll_loss(log_probs, targets, ignore_index=ignore_index, reduction="sum")
    if mean_over == "all":
        return loss / max(labels.numel(), 1)
    return loss / valid.sum().clamp(min=1)


def unbiased_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """UNKD: distillation of the teacher's O-way softmax into the student's, with the student's
    background probability taken as background OR a new class.

    Args:
        student_logits: ``[N, K, H, W]``, K >= O.
        teacher_logits: ``[N, O, H, W]`` (no gradient flows to it), same spatial size.
        alpha: MiB's scale of the teacher logits (1).
        mask: optional ``[N, H, W]`` pixel mask (multiplies the per-pixel loss).

    Returns:
        ``-mean over pixels of (1/O) * [p_0 log q_bg + sum_{c=1}^{O-1} p_c log q_c]`` with
        ``p = softmax(alpha * teacher)``, ``log q_c = z_c - logsumexp(z)`` and
        ``log q_bg = logsumexp(z_0, z_O, ..., z_{K-1}) - logsumexp(z)`` (MiB's formula,
        including its 1/O factor; the mean is over all N*H*W pixels).
    """
    s = to_acc(student_logits)
    t = to_acc(teacher_logits).detach()
    o, k = t.shape[1], s.shape[1]
    if k < o:
        raise ValueError(f"unbiased_kd: the student has {k} channels, fewer than the teacher's {o}")
    if s.shape[-2:] != t.shape[-2:]:
        raise ValueError(f"unbiased_kd: spatial sizes differ: {tuple(s.shape)} vs {tuple(t.shape)}")
    den = torch.logsumexp(s, dim=1)
    bg_channels = torch.cat([s[:, :1], s[:, o:]], dim=1)
    log_bg = torch.logsumexp(bg_channels, dim=1) - den
    log_old = s[:, 1:o] - den.unsqueeze(1)
    p = torch.softmax(t * alpha, dim=1)
    loss = (p[:, 0] * log_bg + (p[:, 1:] * log_old).sum(dim=1)) / o
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    return -loss.mean()


class MiB(Method):
    """MiB: ``{"unce": UNCE, "unkd": kd_factor * UNKD}`` at steps t > 0 (``{"ce": CE}`` at step 0).

    UNKD is computed on the student's and teacher's logits upsampled to the label resolution
    (MiB distils full-size outputs). ``kd_factor`` = 10 (MiB's VOC setting). MiB's balanced
    classifier initialisation is :meth:`lskd.models.DeepLabV3.add_step` (``balanced=True``).
    ``mean_over``: UNCE's normalisation (:func:`unbiased_cross_entropy`; ``"all"`` as released).
    """

    name = "mib"
    needs_teacher = True
    teacher_passes = 1

    def __init__(
        self, kd_factor: float = 10.0, alpha: float = 1.0, ignore_index: int = IGNORE_INDEX, mean_over: str = "all"
    ) -> None:
        if mean_over not in MEAN_OVER:
            raise ValueError(f"MiB: mean_over must be one of {MEAN_OVER}, got {mean_over!r}")
        self.kd_factor = kd_factor
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.mean_over = mean_over

    def term_names(self, ctx: StepContext) -> List[str]:
        return ["unce", "unkd"] if ctx.incremental else ["ce"]

    def incremental_terms(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        student_out: SegOutput,
        teacher_out: SegOutput,
        ctx: StepContext,
    ) -> Dict[str, torch.Tensor]:
        logits = student_out.logits
        teacher = teacher_like(teacher_out.logits, logits)
        # both fused (lskd.ce_unkd: p = softmax(alpha * teacher), as unbiased_kd; the CE's classes
        # [0, O) merged, as unbiased_cross_entropy)
        sums = ops.ce_unkd(
            logits,
            teacher if self.alpha == 1 else teacher * self.alpha,
            labels,
            ignore_index=self.ignore_index,
            merged_classes=ctx.old_classes,
        )
        if self.mean_over == "all":
            pixels = labels.numel()
        else:
            pixels = (labels != self.ignore_index).sum().clamp(min=1)
        return {"unce": sums.ce.sum() / pixels, "unkd": self.kd_factor * (sums.unkd.sum() / labels.numel())}
