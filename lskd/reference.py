"""Plain PyTorch versions of the lskd operators, written after the formulas.

These follow docs/MATHEMATICS.md §2 literally (slices and means for Local
POD, explicit outer products for the second-order pooling, one image at a time
with ``torch.quantile`` for the MD masks). They compute in the dtype of their
inputs: called with float64 tensors they are the oracle of every test, called
with float32/bfloat16 tensors they are the "eager" baseline of the benchmarks.
Autograd flows through them like through any PyTorch code.

All functions return per-image distances ``d`` of shape ``[N]`` (no
reduction); ``lskd.ops`` applies the reduction.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._dtypes import acc_dtype

__all__ = [
    "apply_masks",
    "pod_distances",
    "sop_distances",
    "md_statistics",
    "md_masks",
    "ce_unkd_sums",
    "normalized_entropy",
    "pseudo_labels",
]


def apply_masks(
    x: torch.Tensor,
    spatial_mask: Optional[torch.Tensor] = None,
    channel_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x * m * n`` with m ``[N, 1, H, W]`` and n ``[N, C]`` (bool or float)."""
    if spatial_mask is not None:
        x = x * spatial_mask.to(x.dtype)
    if channel_mask is not None:
        x = x * channel_mask.to(x.dtype)[:, :, None, None]
    return x


def pod_embedding(x: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """Local POD embedding Psi(x): ``[N, C, H, W]`` -> ``[N, L]``.

    For each scale s and region (i, j) of size (H // s) x (W // s): the mean
    over the region's columns (one value per row) and the mean over the
    region's rows (one value per column), concatenated. Rows and columns past
    ``s * (H // s)`` and ``s * (W // s)`` do not take part in scale s.
    """
    n, _, h, w = x.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        for i in range(s):
            for j in range(s):
                region = x[:, :, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw]
                parts.append(region.mean(dim=3).reshape(n, -1))  # width pool
                parts.append(region.mean(dim=2).reshape(n, -1))  # height pool
    return torch.cat(parts, dim=1)


def pod_distances(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spatial_mask: Optional[torch.Tensor] = None,
    channel_mask: Optional[torch.Tensor] = None,
    scales: Sequence[int] = (1, 2, 4),
    square: bool = True,
) -> torch.Tensor:
    """Local POD distance (docs/MATHEMATICS.md §2.1): ``d[n] = ||Psi(x_a^p) - Psi(x_b^p)||_2``.

    ``p = 2`` when ``square`` (PLOP's "pow" pre-processing), else 1. The
    teacher side is detached. Returns ``[N]``.
    """
    xa = apply_masks(student, spatial_mask, channel_mask)
    xb = apply_masks(teacher.detach(), spatial_mask, channel_mask)
    if square:
        xa, xb = xa.pow(2), xb.pow(2)
    diff = pod_embedding(xa, scales) - pod_embedding(xb, scales)
    return torch.linalg.vector_norm(diff, dim=1)


def sop_embedding(x: torch.Tensor, groups: int, window: Optional[int], stride: int) -> torch.Tensor:
    """Second-order pooling: ``[N, C, H, W]`` -> ``[N, groups * P * k * k]``.

    Channels are split into ``groups`` groups of ``k = C // groups`` (the
    remainder channels are dropped); each is average-pooled (window ``w``,
    ``stride``, padding ``w // 2``, divisor ``w * w``; ``window=None`` is one
    global window) and at every pooled position the outer product ``p p^T``
    of the group's k-vector is taken.
    """
    n, c, h, w = x.shape
    k = c // groups
    x = x[:, : groups * k]
    if window is None:
        pooled = x.mean(dim=(2, 3), keepdim=True)
    else:
        # contiguous(): avg_pool2d's CUDA backward is wrong for channels-last
        # inputs with padding in some torch releases (pytorch/pytorch#188344,
        # seen with torch 2.11 on an H100); the oracle must not depend on it.
        pooled = F.avg_pool2d(x.contiguous(), window, stride=stride, padding=window // 2, count_include_pad=True)
    p = pooled.reshape(n, groups, k, -1).transpose(2, 3)  # [N, G, P, k]
    outer = p.unsqueeze(-1) * p.unsqueeze(-2)  # [N, G, P, k, k]
    return outer.reshape(n, -1)


def sop_distances(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spatial_mask: Optional[torch.Tensor] = None,
    channel_mask: Optional[torch.Tensor] = None,
    groups: int = 20,
    window: Optional[int] = 5,
    stride: int = 2,
) -> torch.Tensor:
    """Second-order context pooling distance (docs/MATHEMATICS.md §2.2, MCD). Returns ``[N]``."""
    xa = apply_masks(student, spatial_mask, channel_mask)
    xb = apply_masks(teacher.detach(), spatial_mask, channel_mask)
    diff = sop_embedding(xa, groups, window, stride) - sop_embedding(xb, groups, window, stride)
    return torch.linalg.vector_norm(diff, dim=1)


def md_statistics(
    feat: torch.Tensor,
    feat_bg_erased: torch.Tensor,
    feat_new_erased: torch.Tensor,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of the MD masks (docs/MATHEMATICS.md §2.3), batched.

    Returns ``cos_bg [N, H, W]``, ``cos_new [N, H, W]`` (cosine similarity over
    channels, as ``F.cosine_similarity``), ``gap_bg [N, C]`` and
    ``gap_new [N, C]`` (absolute differences of the spatial means), in the
    accumulation dtype (float64 for float64 inputs, float32 otherwise).
    """
    acc = acc_dtype(feat.dtype)
    a, cb, dn = (t.detach().to(acc) for t in (feat, feat_bg_erased, feat_new_erased))
    cos_bg = F.cosine_similarity(a, cb, dim=1, eps=eps)
    cos_new = F.cosine_similarity(a, dn, dim=1, eps=eps)
    mean_a = a.mean(dim=(2, 3))
    gap_bg = (cb.mean(dim=(2, 3)) - mean_a).abs()
    gap_new = (dn.mean(dim=(2, 3)) - mean_a).abs()
    return cos_bg, cos_new, gap_bg, gap_new


def md_masks(
    feat: torch.Tensor,
    feat_bg_erased: torch.Tensor,
    feat_new_erased: torch.Tensor,
    labels: torch.Tensor,
    old_classes: int,
    ignore_index: int = 255,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """MD masks as released: one image at a time, ``torch.quantile``.

    ``labels [N, Hl, Wl]`` (any resolution); ``rho_old = |{y < O}| / |y|`` and
    ``rho_new = |{O <= y != ignore}| / |y|``, ``|y|`` counting every label
    pixel. Returns ``(spatial_mask [N, 1, H, W] bool, channel_mask [N, C] bool)``:
    ``M = [cos_bg >= Q(cos_bg, rho_old)] | [cos_new <= Q(cos_new, rho_new)]``
    and ``Nc = [gap_bg >= Q(gap_bg, rho_old)] | [gap_new <= Q(gap_new, rho_new)]``
    with per-image linear-interpolation quantiles.
    """
    cos_bg, cos_new, gap_bg, gap_new = md_statistics(feat, feat_bg_erased, feat_new_erased, eps)
    spatial, channel = [], []
    for i in range(feat.shape[0]):
        y = labels[i]
        total = y.numel()
        rho_old = (y < old_classes).sum() / total
        rho_new = ((y >= old_classes) & (y != ignore_index)).sum() / total
        q_old = rho_old.to(cos_bg.dtype)
        q_new = rho_new.to(cos_bg.dtype)
        m = (cos_bg[i] >= torch.quantile(cos_bg[i].flatten(), q_old)) | (
            cos_new[i] <= torch.quantile(cos_new[i].flatten(), q_new)
        )
        nc = (gap_bg[i] >= torch.quantile(gap_bg[i], q_old)) | (gap_new[i] <= torch.quantile(gap_new[i], q_new))
        spatial.append(m)
        channel.append(nc)
    return torch.stack(spatial)[:, None], torch.stack(channel)


def ce_unkd_sums(
    student: torch.Tensor,
    teacher: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    size: Tuple[int, int],
    ignore_index: int = 255,
    merged: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image sums of the cross-entropy and of UNKD on the logits upsampled to ``size``
    (docs/MATHEMATICS.md §2.4): ``(ce [N], unkd [N])``, zeros for a term whose input is None.

    student ``[N, K, h, w]``; teacher ``[N, O, h, w]`` (O <= K, no gradient); targets ``[N, H, W]``
    int64 in [0, K) or ``ignore_index``; weight ``[N]`` (per-image factor of the CE) or None;
    merged ``M`` in [1, K]: the CE of a target y < M is ``lse(z) - lse(z[:M])`` (MiB's unbiased CE,
    background and the old classes merged); 1 is the plain CE.
    """
    z = F.interpolate(student, size=tuple(size), mode="bilinear", align_corners=False)
    n = z.shape[0]
    lse = torch.logsumexp(z, dim=1)  # [N, H, W]
    ce = unkd = z.new_zeros(n)
    if targets is not None:
        valid = targets != ignore_index
        picked = z.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
        if merged > 1:
            picked = torch.where(targets < merged, torch.logsumexp(z[:, :merged], dim=1), picked)
        per_pixel = torch.where(valid, lse - picked, 0.0)
        if weight is not None:
            per_pixel = per_pixel * weight.to(z.dtype)[:, None, None]
        ce = per_pixel.sum(dim=(1, 2))
    if teacher is not None:
        t = F.interpolate(teacher.detach(), size=tuple(size), mode="bilinear", align_corners=False)
        o = t.shape[1]
        p = torch.softmax(t, dim=1)
        lse_bg = torch.logsumexp(torch.cat([z[:, :1], z[:, o:]], dim=1), dim=1)
        inner = p[:, 0] * (lse_bg - lse) + (p[:, 1:] * (z[:, 1:o] - lse[:, None])).sum(dim=1)
        unkd = (-inner / o).sum(dim=(1, 2))
    return ce, unkd


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` logits -> ``[N, H, W]``: the Shannon entropy of the softmax over C divided by
    log C, in [0, 1] (0 when C == 1), in the logits' dtype (docs/MATHEMATICS.md §2.5)."""
    c = logits.shape[1]
    if c == 1:
        return torch.zeros_like(logits[:, 0])
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1) / math.log(c)


def pseudo_labels(
    teacher: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int = 255,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PLOP's entropy pseudo-labels (docs/MATHEMATICS.md §2.5): ``(targets [N, H, W] int64,
    accepted [N] int64, eligible [N] int64)``.

    teacher ``[N, O, h, w]`` logits, upsampled bilinearly to the labels' ``[H, W]``; labels
    ``[N, H, W]`` int64; thresholds ``[O]``. A pixel with label < O is eligible and becomes the
    teacher's first argmax class c* where ``normalized_entropy < thresholds[c*]``, else
    ``ignore_index``; other pixels keep their label. The counts are per image.
    """
    t = teacher
    if tuple(t.shape[-2:]) != tuple(labels.shape[-2:]):
        t = F.interpolate(t, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    ent = normalized_entropy(t)
    pred = t.max(dim=1).indices  # the first largest, NaN the largest, as argmax
    accepted = ent < thresholds.to(device=ent.device, dtype=ent.dtype)[pred]
    eligible = labels < t.shape[1]
    targets = torch.where(eligible, torch.where(accepted, pred, torch.full_like(pred, ignore_index)), labels)
    return targets, (eligible & accepted).sum(dim=(1, 2)), eligible.sum(dim=(1, 2))
