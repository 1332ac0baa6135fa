"""Triton kernel of the fused cross-entropy + unbiased KD on upsampled logits: lskd_triton::ce_unkd_forward.

Definitions: csrc/ce_unkd.cpp (header comment). z_p / t_p are the bilinear
(align_corners=False, output size (H, W)) upsampling of the low-res student [N, K, h, w] /
teacher [N, O, h, w] logits at output pixel p, lse(z) = log sum_c exp(z_c),
lse_bg(z) = log(exp(z_0) + sum_{c >= O} exp(z_c)), P = softmax_O(t_p), q = softmax_K(z_p):
    ce[n]   = sum_{p: y_p != ignore} weight[n] (lse(z_p) - z_p[y_p]), lse_old(z_p) = log sum_{c < M}
              exp(z_c) in place of z_p[y_p] for a merged target (M > 1, y_p < M: MiB's unbiased CE)
    unkd[n] = sum_p -(1/O) (P_0 (lse_bg - lse) + sum_{1 <= c < O} P_c (z_c - lse))
    grad_ce / grad_unkd [N, K, h, w] = the adjoint of the interpolation applied to
        weight[n] (q_c - [c == y_p])   and   (1/O) (q_c - P_0 b_c - [1 <= c < O] P_c),
        [c == y_p] replaced by [c < M] exp(z_c - lse_old) for a merged target,
        b_c = exp(z_c - lse_bg) on the background channels {0} U [O, K).
Nothing is written at the output resolution.

One program per (tile of BLOCK_P output pixels, image n). Each program computes the
interpolation rows/columns and weights of its pixels (kernels/_bilinear.py: scale = h / H passed
from the host, in acc_t exactly), then loops over channel blocks of BLOCK_K twice:
  1. interpolate the [BLOCK_K, BLOCK_P] student (and teacher) tiles; online max / sum of
     exponentials (rescaled when the max grows) for lse, lse_bg, lse_old and the teacher's lse, the
     target logit, and sum_{c >= 1} exp(t_c - max) (z_c - z_0) for the UNKD term;
  2. (with_grad only) interpolate again and scatter the per-pixel gradients to the four
     low-res corners with tl.atomic_add.
The per-image sums are accumulated with tl.atomic_add as well.

Determinism: float atomics (the gradient scatter, as torch's own upsample_bilinear2d backward
on CUDA, and the per-image sums) make the results run-to-run nondeterministic in the last bits
on CUDA; the CPU backend (csrc/cpu/ce_unkd.cpp) is deterministic.

An out-of-range target (not ignore_index, not in [0, K)) makes its image's ce NaN and the
gradient contributions of that pixel NaN.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._bilinear import axis_coords, lerp, scale_parts
from ._launch import (
    acc_dtype,
    as_int_list,
    check_features,
    clamp,
    device_guard,
    next_pow2,
    num_warps_for,
    strides4,
)

__all__ = ["ce_unkd_forward"]

# Elements of one [BLOCK_K, BLOCK_P] tile: each channel block loads 4 corner tiles of the
# student and 4 of the teacher, keeps z, t and their exponentials live.
CE_UNKD_TILE = 1024
CE_UNKD_MAX_BLOCK_K = 64


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------
@triton.jit
def _scatter(base, c00, c01, c10, c11, mask, g, ly0, ly1, lx0, lx1):
    """Adjoint of lerp: add the corner weights times g to base + c.. (zero weights skipped)."""
    w00 = ly0 * lx0
    w01 = ly0 * lx1
    w10 = ly1 * lx0
    w11 = ly1 * lx1
    tl.atomic_add(base + c00, w00 * g, mask=mask & (w00 != 0), sem="relaxed")
    tl.atomic_add(base + c01, w01 * g, mask=mask & (w01 != 0), sem="relaxed")
    tl.atomic_add(base + c10, w10 * g, mask=mask & (w10 != 0), sem="relaxed")
    tl.atomic_add(base + c11, w11 * g, mask=mask & (w11 != 0), sem="relaxed")


@triton.jit
def _online(m, s, x, msk):
    """Online (max, sum exp(x - max)) update with the [BLOCK_K, BLOCK_P] tile x over the entries msk."""
    m_new = tl.maximum(m, tl.max(tl.where(msk, x, -float("inf")), axis=0))
    e = tl.where(msk, tl.exp(x - m_new[None, :]), 0.0)
    s = s * tl.exp(m - m_new) + tl.sum(e, axis=0)
    return m_new, s


# --------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------
@triton.jit
def _ce_unkd_kernel(
    s_ptr, t_ptr, y_ptr, w_ptr, ce_ptr, un_ptr, gce_ptr, gun_ptr,
    K, O, M, h, w, H, W, ignore_index,
    sh_hi, sh_mid, sh_lo, sw_hi, sw_mid, sw_lo,
    ss_n, ss_c, ss_h, ss_w,
    st_n, st_c, st_h, st_w,
    HAS_T: tl.constexpr, HAS_Y: tl.constexpr, HAS_W: tl.constexpr, MERGED: tl.constexpr, WITH_GRAD: tl.constexpr,
    IS_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = ce_ptr.dtype.element_ty
    tile = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    HW = H * W
    pp = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pv = pp < HW
    r = pp // W
    q = pp - r * W
    iy0, iy1, ly0, ly1 = axis_coords(r, h, sh_hi, sh_mid, sh_lo, IS_FP64)
    ix0, ix1, lx0, lx1 = axis_coords(q, w, sw_hi, sw_mid, sw_lo, IS_FP64)
    # corner offsets in the student and teacher (strided) and in the contiguous gradients
    so00 = iy0 * ss_h + ix0 * ss_w
    so01 = iy0 * ss_h + ix1 * ss_w
    so10 = iy1 * ss_h + ix0 * ss_w
    so11 = iy1 * ss_h + ix1 * ss_w
    to00 = iy0 * st_h + ix0 * st_w
    to01 = iy0 * st_h + ix1 * st_w
    to10 = iy1 * st_h + ix0 * st_w
    to11 = iy1 * st_h + ix1 * st_w
    s_img = s_ptr + n * ss_n
    t_img = t_ptr + n * st_n
    kk = tl.arange(0, BLOCK_K)
    inv_o = 1.0 / tl.cast(O, acc_t)

    # channel 0 first: finite starting maxima and the reference z_0 of the UNKD sum
    z0 = lerp(s_img, so00, so01, so10, so11, pv, ly0, ly1, lx0, lx1)
    m = z0
    s = tl.zeros([BLOCK_P], dtype=acc_t)
    if HAS_Y:
        y = tl.load(y_ptr + n * HW + pp, mask=pv, other=ignore_index)
        valid = pv & (y != ignore_index)
        bad = valid & ((y < 0) | (y >= K))
        zy = tl.zeros([BLOCK_P], dtype=acc_t)
        if MERGED:
            merged = valid & (y < M)
            mo = z0
            so = tl.zeros([BLOCK_P], dtype=acc_t)
    if HAS_T:
        t0 = lerp(t_img, to00, to01, to10, to11, pv, ly0, ly1, lx0, lx1)
        mb = z0
        sb = tl.zeros([BLOCK_P], dtype=acc_t)
        mt = t0
        st = tl.zeros([BLOCK_P], dtype=acc_t)
        e1 = tl.zeros([BLOCK_P], dtype=acc_t)  # sum_{1 <= c < O} exp(t_c - mt)
        ez = tl.zeros([BLOCK_P], dtype=acc_t)  # sum_{1 <= c < O} exp(t_c - mt) (z_c - z_0)

    # ---- pass 1: online softmax statistics
    for c0 in range(0, K, BLOCK_K):
        ch = c0 + kk
        cv = ch < K
        m2 = cv[:, None] & pv[None, :]
        z = lerp(s_img + ch[:, None] * ss_c, so00[None, :], so01[None, :], so10[None, :], so11[None, :], m2,
                 ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])
        # statistics over channels only: pixels past the end see zeros (finite, discarded)
        m, s = _online(m, s, z, cv[:, None])
        if HAS_Y:
            zy += tl.sum(tl.where(ch[:, None] == y[None, :], z, 0.0), axis=0)
            if MERGED:
                mo, so = _online(mo, so, z, (cv & (ch < M))[:, None])
        if HAS_T:
            bg = (cv & ((ch == 0) | (ch >= O)))[:, None]
            mb, sb = _online(mb, sb, z, bg)
            tc = (ch < O)[:, None]
            t = lerp(t_img + ch[:, None] * st_c, to00[None, :], to01[None, :], to10[None, :], to11[None, :],
                     tc & pv[None, :], ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])
            mt_new = tl.maximum(mt, tl.max(tl.where(tc, t, -float("inf")), axis=0))
            alpha = tl.exp(mt - mt_new)
            e = tl.where(tc, tl.exp(t - mt_new[None, :]), 0.0)
            st = st * alpha + tl.sum(e, axis=0)
            e = tl.where((ch >= 1)[:, None], e, 0.0)
            e1 = e1 * alpha + tl.sum(e, axis=0)
            ez = ez * alpha + tl.sum(e * (z - z0[None, :]), axis=0)
            mt = mt_new

    log_s = tl.log(s)
    lse = m + log_s
    if HAS_Y:
        ce_p = (m - zy) + log_s
        if MERGED:
            lse_o = mo + tl.log(so)
            ce_p = tl.where(merged, lse - lse_o, ce_p)
        if HAS_W:
            wn = tl.load(w_ptr + n)
            ce_p = ce_p * wn
        ce_p = tl.where(valid, ce_p, 0.0)
        ce_p = tl.where(bad, float("nan"), ce_p)
        tl.atomic_add(ce_ptr + n, tl.sum(ce_p, axis=0), sem="relaxed")
    if HAS_T:
        lse_bg = mb + tl.log(sb)
        p0 = tl.exp(t0 - mt) / st
        rest = (ez - ((m - z0) + log_s) * e1) / st  # sum_{1 <= c < O} P_c (z_c - lse)
        un_p = -(p0 * (lse_bg - lse) + rest) * inv_o
        un_p = tl.where(pv, un_p, 0.0)
        tl.atomic_add(un_ptr + n, tl.sum(un_p, axis=0), sem="relaxed")

    # ---- pass 2: gradients, scattered to the low-res corners
    if WITH_GRAD:
        hw = h * w
        c00 = (iy0 * w + ix0)[None, :]
        c01 = (iy0 * w + ix1)[None, :]
        c10 = (iy1 * w + ix0)[None, :]
        c11 = (iy1 * w + ix1)[None, :]
        if HAS_T:
            lse_t = mt + tl.log(st)
        for c0 in range(0, K, BLOCK_K):
            ch = c0 + kk
            cv = ch < K
            m2 = cv[:, None] & pv[None, :]
            z = lerp(s_img + ch[:, None] * ss_c, so00[None, :], so01[None, :], so10[None, :], so11[None, :], m2,
                     ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])
            qz = tl.exp(z - lse[None, :])
            g_off = (n * K + ch[:, None]) * hw
            if HAS_Y:
                g = qz - (ch[:, None] == y[None, :]).to(acc_t)
                if MERGED:
                    old = merged[None, :] & (ch < M)[:, None]
                    g = tl.where(merged[None, :], qz - tl.where(old, tl.exp(z - lse_o[None, :]), 0.0), g)
                if HAS_W:
                    g = g * wn
                g = tl.where(valid[None, :], g, 0.0)
                g = tl.where(bad[None, :], float("nan"), g)
                _scatter(gce_ptr + g_off, c00, c01, c10, c11, m2, g,
                         ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])
            if HAS_T:
                bg = m2 & ((ch == 0) | (ch >= O))[:, None]
                b = tl.where(bg, tl.exp(z - lse_bg[None, :]), 0.0)
                tm2 = ((ch >= 1) & (ch < O))[:, None] & pv[None, :]
                t = lerp(t_img + ch[:, None] * st_c, to00[None, :], to01[None, :], to10[None, :], to11[None, :],
                         tm2, ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])
                pc = tl.where(tm2, tl.exp(t - lse_t[None, :]), 0.0)
                g = (qz - p0[None, :] * b - pc) * inv_o
                _scatter(gun_ptr + g_off, c00, c01, c10, c11, m2, g,
                         ly0[None, :], ly1[None, :], lx0[None, :], lx1[None, :])


# --------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------
def _ce_unkd_forward_impl(student, teacher, targets, weight, size, ignore_index, merged, with_grad):
    op = "ce_unkd_forward"
    check_features(op, student)
    size = as_int_list(size)
    if len(size) != 2 or size[0] < 1 or size[1] < 1:
        raise ValueError(f"lskd_triton: {op}: size must be [H, W] with H, W >= 1, got {size}")
    n, k, h, w = student.shape
    hh, ww = size
    acc = acc_dtype(student.dtype)
    dev = student.device
    o = k
    if teacher is not None:
        if teacher.dim() != 4 or teacher.shape[0] != n or teacher.shape[2:] != student.shape[2:]:
            raise ValueError(f"lskd_triton: {op}: teacher must be [N, O, h, w] = [{n}, O, {h}, {w}], "
                             f"got {tuple(teacher.shape)}")
        if teacher.dtype != student.dtype or teacher.device != dev:
            raise ValueError(f"lskd_triton: {op}: teacher must be a {student.dtype} tensor on {dev}")
        o = teacher.shape[1]
        if not 1 <= o <= k:
            raise ValueError(f"lskd_triton: {op}: teacher channels O must be in [1, K = {k}], got {o}")
    if targets is not None:
        if tuple(targets.shape) != (n, hh, ww) or targets.dtype != torch.int64 or not targets.is_contiguous():
            raise ValueError(f"lskd_triton: {op}: targets must be a contiguous int64 [N, H, W] = {[n, hh, ww]} "
                             f"tensor, got {targets.dtype} {tuple(targets.shape)}")
    if weight is not None:
        if tuple(weight.shape) != (n,) or weight.dtype != acc or not weight.is_contiguous():
            raise ValueError(f"lskd_triton: {op}: weight must be a contiguous {acc} [N] = [{n}] tensor, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
    if not 1 <= merged <= max(k, 1):
        raise ValueError(f"lskd_triton: {op}: merged must be in [1, K = {k}], got {merged}")
    if merged > 1 and teacher is not None:
        raise ValueError(f"lskd_triton: {op}: merged > 1 (the unbiased CE) is computed without a teacher; "
                         "make a second call for UNKD")
    has_t = teacher is not None
    has_y = targets is not None
    ce = torch.zeros(n, dtype=acc, device=dev)
    unkd = torch.zeros(n, dtype=acc, device=dev)
    grad_ce = torch.zeros(n, k, h, w, dtype=acc, device=dev) if with_grad and has_y else ce.new_empty(0)
    grad_unkd = torch.zeros(n, k, h, w, dtype=acc, device=dev) if with_grad and has_t else ce.new_empty(0)
    if n == 0 or k == 0 or not (has_t or has_y):
        return ce, unkd, grad_ce, grad_unkd
    if h == 0 or w == 0:
        raise ValueError(f"lskd_triton: {op}: cannot interpolate an empty {h}x{w} map")
    is64 = acc == torch.float64
    block_k = min(next_pow2(k), CE_UNKD_MAX_BLOCK_K)
    block_p = clamp(CE_UNKD_TILE // block_k, 16, 128)
    block_p = min(block_p, next_pow2(hh * ww))
    nt = triton.cdiv(hh * ww, block_p)
    t_arg = teacher if has_t else student
    dummy = ce
    with device_guard(student):
        _ce_unkd_kernel[(nt, n)](
            student, t_arg, targets if has_y else dummy, weight if weight is not None else dummy,
            ce, unkd, grad_ce if grad_ce.numel() else dummy, grad_unkd if grad_unkd.numel() else dummy,
            k, o, int(merged), h, w, hh, ww, int(ignore_index),
            *scale_parts(h, hh, is64), *scale_parts(w, ww, is64),
            *strides4(student), *strides4(t_arg),
            HAS_T=has_t, HAS_Y=has_y, HAS_W=weight is not None, MERGED=has_y and merged > 1, WITH_GRAD=bool(with_grad),
            IS_FP64=is64, BLOCK_K=block_k, BLOCK_P=block_p,
            num_warps=num_warps_for(block_k * block_p),
        )
    return ce, unkd, grad_ce, grad_unkd


# --------------------------------------------------------------------------
# custom op (fake kernel and autograd are registered in lskd/ops/)
# --------------------------------------------------------------------------
@torch.library.custom_op(
    "lskd_triton::ce_unkd_forward",
    mutates_args=(),
    schema="(Tensor student, Tensor? teacher, Tensor? targets, Tensor? weight, int[] size, int ignore_index,"
    " int merged, bool with_grad) -> (Tensor ce, Tensor unkd, Tensor grad_ce, Tensor grad_unkd)",
)
def ce_unkd_forward(
    student: torch.Tensor,
    teacher: Optional[torch.Tensor],
    targets: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    size: List[int],
    ignore_index: int,
    merged: int,
    with_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ce_unkd_forward_impl(student, teacher, targets, weight, size, ignore_index, merged, with_grad)
