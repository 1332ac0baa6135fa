"""Triton kernel of PLOP's entropy pseudo-labels on upsampled teacher logits: lskd_triton::pseudo_labels.

Definitions: csrc/pseudo_labels.cpp (header comment) and docs/MATHEMATICS.md §2.5. For output pixel
p of image n with v = labels[n, p]: a pixel with v >= O keeps its label; an eligible one (v < O)
takes t = the bilinear (align_corners=False, output size (H, W)) upsampling of the teacher
[N, O, h, w] at p in acc_t, and
    c* = the first index of the largest t_c (a NaN counts as the largest, as torch.max),
    m = t_{c*}, S = sum_c exp(t_c - m),
    entropy = (log S - sum_c exp(t_c - m) (t_c - m) / S) / log O   (0 when O == 1),
    targets[n, p] = c* if entropy < thresholds[c*] (false for NaN) else ignore_index,
    accepted[n] / eligible[n] = the image's accepted / eligible pixels.
The upsampled logits are never written.

One program per (tile of BLOCK_P output pixels, image n). Each program loads its labels, computes
the interpolation rows/columns and weights of its pixels (kernels/_bilinear.py: scale = h / H
passed from the host, in acc_t exactly) and loops once over channel blocks of BLOCK_K: it
interpolates the [BLOCK_K, BLOCK_P] teacher tile at the eligible pixels only (masked loads: the
other pixels never read the teacher) and updates per pixel
  * the running first argmax: a block's first NaN, else the first index of its largest value when
    that value beats the running maximum strictly (earlier blocks win ties); after a NaN, nothing;
  * the online max m of the non-NaN logits and S = sum exp(t_c - m),
    U = sum exp(t_c - m) (t_c - m), rescaled when m grows: S' = a S, U' = a (U + (m - m') S) with
    a = exp(m - m').
The entropy is shift invariant, so the running max of the non-NaN values stands for t_{c*}. A NaN or
infinite logit makes S or U NaN (IEEE propagation, nothing is masked away), so such a pixel is
rejected, as the reference's log_softmax rejects it. When (h, w) == (H, W) the teacher is read
as it is, without interpolation (as the reference: a NaN is not spread by a zero weight). O == 1
reads no teacher at all: c* = 0 and the entropy is 0. The per-image counts are integer
tl.atomic_adds of per-program sums: the results are deterministic.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._bilinear import axis_coords, lerp, scale_parts
from ._launch import acc_dtype, clamp, device_guard, next_pow2, num_warps_for, strides4

__all__ = ["pseudo_labels"]

# Elements of one [BLOCK_K, BLOCK_P] tile: each channel block loads 4 corner tiles of the
# teacher and keeps t and its exponentials live.
PSEUDO_LABELS_TILE = 2048
PSEUDO_LABELS_MAX_BLOCK_K = 64
PSEUDO_LABELS_MAX_BLOCK_P = 256


# --------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------
@triton.jit
def _pseudo_labels_kernel(
    t_ptr, y_ptr, thr_ptr, out_ptr, acc_ptr, elig_ptr,
    O, h, w, H, W, ignore_index,
    sh_hi, sh_mid, sh_lo, sw_hi, sw_mid, sw_lo,
    st_n, st_c, st_h, st_w,
    ONE_CLASS: tl.constexpr, IDENTITY: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = thr_ptr.dtype.element_ty
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    pp = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pv = pp < HW
    v = tl.load(y_ptr + n * HW + pp, mask=pv, other=0)
    elig = pv & (v < O)

    if ONE_CLASS:
        # one class: c* = 0 and entropy 0, whatever the logit
        cs = tl.zeros([BLOCK_P], dtype=tl.int32)
        ent = tl.zeros([BLOCK_P], dtype=acc_t)
    else:
        r = pp // W
        q = pp - r * W
        if IDENTITY:
            # same size: the teacher's own pixels (one "corner" of weight 1)
            to00 = r * st_h + q * st_w
        else:
            iy0, iy1, ly0, ly1 = axis_coords(r, h, sh_hi, sh_mid, sh_lo, IS_FP64)
            ix0, ix1, lx0, lx1 = axis_coords(q, w, sw_hi, sw_mid, sw_lo, IS_FP64)
            to00 = iy0 * st_h + ix0 * st_w
            to01 = iy0 * st_h + ix1 * st_w
            to10 = iy1 * st_h + ix0 * st_w
            to11 = iy1 * st_h + ix1 * st_w
        t_img = t_ptr + n * st_n
        kk = tl.arange(0, BLOCK_K)
        NONE = 2147483647  # "no index" in the min-reductions (> any channel)
        mx = tl.full([BLOCK_P], -float("inf"), acc_t)  # running max of the non-NaN logits
        s = tl.zeros([BLOCK_P], dtype=acc_t)  # sum exp(t_c - mx)
        u = tl.zeros([BLOCK_P], dtype=acc_t)  # sum exp(t_c - mx) (t_c - mx)
        cs = tl.zeros([BLOCK_P], dtype=tl.int32)  # first argmax so far
        seen_nan = tl.zeros([BLOCK_P], dtype=tl.int1)
        for c0 in range(0, O, BLOCK_K):
            ch = c0 + kk
            cv = (ch < O)[:, None]
            m2 = cv & elig[None, :]
            if IDENTITY:
                t = tl.load(t_img + ch[:, None] * st_c + to00[None, :], mask=m2, other=0.0).to(acc_t)
            else:
                t = lerp(t_img + ch[:, None] * st_c, to00[None, :], to01[None, :], to10[None, :], to11[None, :], m2,
                         ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])
            # statistics over channels only: the other pixels see zeros (finite, discarded)
            is_nan = cv & (t != t)
            b_nan = tl.min(tl.where(is_nan, ch[:, None], NONE), axis=0)  # the block's first NaN
            t_num = tl.where(cv & (t == t), t, -float("inf"))
            b_max = tl.max(t_num, axis=0)
            b_arg = tl.min(tl.where(cv & (t_num == b_max[None, :]), ch[:, None], NONE), axis=0)
            take_nan = (b_nan != NONE) & ~seen_nan
            take_max = (b_nan == NONE) & ~seen_nan & (b_max > mx)
            cs = tl.where(take_nan, b_nan, tl.where(take_max, b_arg, cs))
            seen_nan = seen_nan | take_nan
            # online sums (a NaN or an infinity leaves S or U NaN)
            m_new = tl.maximum(mx, b_max)
            a = tl.where(mx == m_new, 1.0, tl.exp(mx - m_new))
            shift = tl.where(s == 0.0, 0.0, (mx - m_new) * s)  # s == 0: nothing yet (mx = -inf)
            d = t - m_new[None, :]
            e = tl.exp(d)
            u = a * (u + shift) + tl.sum(tl.where(cv, e * d, 0.0), axis=0)
            s = a * s + tl.sum(tl.where(cv, e, 0.0), axis=0)
            mx = m_new
        log_o = tl.log(tl.cast(O, acc_t))
        ent = (tl.log(s) - u / s) / log_o

    thr = tl.load(thr_ptr + cs, mask=elig, other=0.0)
    ok = elig & (ent < thr)  # false for a NaN entropy
    y = tl.where(elig, tl.where(ok, cs.to(tl.int64), ignore_index), v)
    tl.store(out_ptr + n * HW + pp, y, mask=pv)
    tl.atomic_add(acc_ptr + n, tl.sum(ok.to(tl.int64), axis=0), sem="relaxed")
    tl.atomic_add(elig_ptr + n, tl.sum(elig.to(tl.int64), axis=0), sem="relaxed")


# --------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------
def _check_inputs(op: str, teacher: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> None:
    """The checks of csrc/pseudo_labels.cpp (check_pseudo_labels)."""
    if not torch.is_tensor(teacher) or teacher.dim() != 4:
        got = tuple(teacher.shape) if torch.is_tensor(teacher) else type(teacher).__name__
        raise ValueError(f"lskd_triton: {op}: teacher must be [N, O, h, w], got {got}")
    if not teacher.is_floating_point():
        raise ValueError(f"lskd_triton: {op}: floating-point teacher required, got {teacher.dtype}")
    n, o, h, w = teacher.shape
    if n > 0 and (o < 1 or h < 1 or w < 1):
        raise ValueError(f"lskd_triton: {op}: teacher {tuple(teacher.shape)} has an empty class or spatial dimension")
    dev = teacher.device
    if not torch.is_tensor(labels) or labels.dim() != 3 or labels.shape[0] != n or min(labels.shape[1:]) < 1:
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"lskd_triton: {op}: labels must be [N, H, W] with N = {n}, got {got}")
    if labels.dtype != torch.int64 or not labels.is_contiguous() or labels.device != dev:
        raise ValueError(f"lskd_triton: {op}: labels must be a contiguous int64 tensor on {dev}, "
                         f"got a {'' if labels.is_contiguous() else 'non-contiguous '}{labels.dtype} tensor "
                         f"on {labels.device}")
    hh, ww = labels.shape[1:]
    # int32 pixel indices and per-image teacher offsets
    span = sum((size - 1) * abs(stride) for size, stride in zip(teacher.shape[1:], teacher.stride()[1:]))
    if hh * ww >= 2**31 or h * w >= 2**31 or span >= 2**31:
        raise ValueError(f"lskd_triton: {op}: map too large (labels {tuple(labels.shape)}, "
                         f"teacher {tuple(teacher.shape)})")
    acc = acc_dtype(teacher.dtype)
    if not torch.is_tensor(thresholds) or thresholds.dim() != 1 or thresholds.shape[0] != o:
        got = tuple(thresholds.shape) if torch.is_tensor(thresholds) else type(thresholds).__name__
        raise ValueError(f"lskd_triton: {op}: thresholds must be [O] = [{o}], got {got}")
    if thresholds.dtype != acc or not thresholds.is_contiguous() or thresholds.device != dev:
        raise ValueError(f"lskd_triton: {op}: thresholds must be a contiguous {acc} tensor on {dev}, got a "
                         f"{'' if thresholds.is_contiguous() else 'non-contiguous '}{thresholds.dtype} tensor "
                         f"on {thresholds.device}")


def _pseudo_labels_impl(teacher, labels, thresholds, ignore_index):
    op = "pseudo_labels"
    _check_inputs(op, teacher, labels, thresholds)
    n, o, h, w = teacher.shape
    hh, ww = labels.shape[1:]
    targets = torch.empty_like(labels, memory_format=torch.contiguous_format)
    accepted = torch.zeros(n, dtype=torch.int64, device=labels.device)
    eligible = torch.zeros(n, dtype=torch.int64, device=labels.device)
    if n == 0:
        return targets, accepted, eligible
    is64 = acc_dtype(teacher.dtype) == torch.float64
    one_class = o == 1
    block_k = 1 if one_class else min(next_pow2(o), PSEUDO_LABELS_MAX_BLOCK_K)
    block_p = clamp(PSEUDO_LABELS_TILE // block_k, 16, PSEUDO_LABELS_MAX_BLOCK_P)
    block_p = min(block_p, next_pow2(hh * ww))
    nt = triton.cdiv(hh * ww, block_p)
    with device_guard(teacher):
        _pseudo_labels_kernel[(nt, n)](
            teacher, labels, thresholds, targets, accepted, eligible,
            o, h, w, hh, ww, int(ignore_index),
            *scale_parts(h, hh, is64), *scale_parts(w, ww, is64),
            *strides4(teacher),
            ONE_CLASS=one_class, IDENTITY=(h, w) == (hh, ww), IS_FP64=is64,
            BLOCK_K=block_k, BLOCK_P=block_p,
            num_warps=num_warps_for(block_k * block_p),
        )
    return targets, accepted, eligible


# --------------------------------------------------------------------------
# custom op (the fake kernel is registered in lskd/ops/pseudo_labels.py; no autograd)
# --------------------------------------------------------------------------
@torch.library.custom_op(
    "lskd_triton::pseudo_labels",
    mutates_args=(),
    schema="(Tensor teacher, Tensor labels, Tensor thresholds, int ignore_index)"
    " -> (Tensor targets, Tensor accepted, Tensor eligible)",
)
def pseudo_labels(
    teacher: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor,
    ignore_index: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _pseudo_labels_impl(teacher, labels, thresholds, ignore_index)
