"""Triton kernels of the second-order pooling distance: lskd_triton::sop_forward / sop_backward.

Definitions: csrc/sop_distill.cpp (header comment) and docs/MATHEMATICS.md §2.2. k = C // groups,
average pooling (window, stride, padding, divisor wh * ww) of x_a and x_b;
at every pooled position and group p, q in R^k, u = p - q, v = p + q,
term = 0.5 (|u|^2 |v|^2 + (u.v)^2), dist = sqrt(sum of terms),
pooled_grad = (|v|^2 + u.v) u + (|u|^2 + u.v) v.

Forward, windowed: one program per (n, group, tile of BLOCK_P pooled
positions) holding a [BLOCK_K, BLOCK_P] tile of p and q; a loop over the
wh * ww window offsets gathers the inputs (overlapping windows are re-read from
cache, not from DRAM). Each program writes pooled_grad for its tile and its
sum of terms to part[n, g * NT + tile]; a second tiny kernel sums part[n, :]
in a fixed order and takes the square root (no atomics).

Forward, global (a single window covering the whole map, e.g. window = (H, W),
stride (1, 1), padding (0, 0)): one program per (n, c) plane sums a * m and
b * m; then one program per image runs over the groups, writes pooled_grad
[N, G k, 1, 1] and the distance.

Backward: one program per (n, c) plane, loop over row chunks; every element
gathers the pooled gradients of the (at most ceil(wh/sh) * ceil(ww/sw))
windows that cover it (global: the single value of its plane).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import (
    TILE_ELEMS,
    acc_dtype,
    as_int_list,
    check_features,
    check_masks,
    check_vector,
    clamp,
    device_guard,
    exact_sqrt,
    mask_args,
    next_pow2,
    num_warps_for,
    plane_blocks,
    rowsum_sqrt,
    strides4,
)

__all__ = ["sop_forward", "sop_backward", "sop_geometry"]

# Backward tile (elements per row chunk): up to 9 gathers per element, keep it small.
SOP_BWD_TILE = 1024


# --------------------------------------------------------------------------
# host-side geometry
# --------------------------------------------------------------------------
def sop_geometry(a: torch.Tensor, groups: int, window: List[int], stride: List[int], padding: List[int]):
    """Checks as csrc/common.h sop_geometry; returns (Ho, Wo, k, is_global)."""
    _, c, h, w = a.shape
    if not 1 <= groups <= c:
        raise ValueError(f"lskd_triton: sop: groups must be in [1, C = {c}], got {groups}")
    if len(window) != 2 or len(stride) != 2 or len(padding) != 2:
        raise ValueError("lskd_triton: sop: window, stride and padding must have two entries")
    (wh, ww), (sh, sw), (ph, pw) = window, stride, padding
    if not (wh >= 1 and ww >= 1 and sh >= 1 and sw >= 1 and ph >= 0 and pw >= 0 and 2 * ph <= wh and 2 * pw <= ww):
        raise ValueError(f"lskd_triton: sop: invalid pooling window {window} stride {stride} padding {padding}")
    ho = (h + 2 * ph - wh) // sh + 1
    wo = (w + 2 * pw - ww) // sw + 1
    if h + 2 * ph - wh < 0 or w + 2 * pw - ww < 0 or ho < 1 or wo < 1:
        raise ValueError(f"lskd_triton: sop: pooling window {window} does not fit a map of size {h}x{w}")
    k = c // groups
    # One window that covers every pixel: the plane-sum ("global") path.
    is_global = ho == 1 and wo == 1 and wh - ph >= h and ww - pw >= w
    return ho, wo, k, is_global


# --------------------------------------------------------------------------
# forward, windowed
# --------------------------------------------------------------------------
@triton.jit
def _sop_fwd_kernel(
    a_ptr, b_ptr, m_ptr, nm_ptr, pg_ptr, part_ptr,
    C, H, W, G, K, Ho, Wo, WH, WW, SH, SW, PH, PW, NT,
    sa_n, sa_c, sa_h, sa_w,
    sb_n, sb_c, sb_h, sb_w,
    HAS_M: tl.constexpr, HAS_NM: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = pg_ptr.dtype.element_ty
    pid_ng = tl.program_id(0).to(tl.int64)  # n * G + g
    tile = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng - n * G

    kk = tl.arange(0, BLOCK_K)
    kv = kk < K
    ch = g * K + kk  # int64 [BLOCK_K]
    pp = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    P = Ho * Wo
    pv = pp < P
    ho = pp // Wo
    wo = pp - ho * Wo
    h0 = ho * SH - PH
    w0 = wo * SW - PW

    a_rows = a_ptr + n * sa_n + ch[:, None] * sa_c
    b_rows = b_ptr + n * sb_n + ch[:, None] * sb_c
    m_plane = m_ptr + n * H * W
    pa = tl.zeros([BLOCK_K, BLOCK_P], dtype=acc_t)
    pb = tl.zeros([BLOCK_K, BLOCK_P], dtype=acc_t)
    for t in range(WH * WW):
        dh = t // WW
        dw = t - dh * WW
        h = h0 + dh
        w = w0 + dw
        inb = pv & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        m2 = kv[:, None] & inb[None, :]
        av = tl.load(a_rows + (h * sa_h + w * sa_w)[None, :], mask=m2, other=0.0).to(acc_t)
        bv = tl.load(b_rows + (h * sb_h + w * sb_w)[None, :], mask=m2, other=0.0).to(acc_t)
        if HAS_M:
            mv = tl.load(m_plane + h * W + w, mask=inb, other=0.0)
            av = av * mv[None, :]
            bv = bv * mv[None, :]
        pa += av
        pb += bv
    # u and v from the accumulated sums, the channel mask and the divisor applied after:
    # a product feeding the subtraction (pa*m - pb*m) would be contracted into an FMA on
    # the GPU, which is not exactly 0 when the student equals the teacher.
    u = pa - pb
    v = pa + pb
    if HAS_NM:
        nmv = tl.load(nm_ptr + n * C + ch, mask=kv, other=0.0)
        u = u * nmv[:, None]
        v = v * nmv[:, None]
    div = tl.cast(WH * WW, acc_t)
    u = u / div
    v = v / div
    uu = tl.sum(u * u, axis=0)
    vv = tl.sum(v * v, axis=0)
    uv = tl.sum(u * v, axis=0)
    term = tl.where(pv, 0.5 * (uu * vv + uv * uv), 0.0)
    tl.store(part_ptr + pid_ng * NT + tile, tl.sum(term, axis=0))
    pg = (vv + uv)[None, :] * u + (uu + uv)[None, :] * v
    GK = G * K
    tl.store(pg_ptr + (n * GK + ch)[:, None] * P + pp[None, :], pg, mask=kv[:, None] & pv[None, :])


# --------------------------------------------------------------------------
# forward, global
# --------------------------------------------------------------------------
@triton.jit
def _plane_sums_kernel(
    a_ptr, b_ptr, m_ptr, sums_ptr,
    GK, H, W,
    sa_n, sa_c, sa_h, sa_w,
    sb_n, sb_c, sb_h, sb_w,
    HAS_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """sums[n, c, 0] = sum_hw a m, sums[n, c, 1] = sum_hw b m (c < G k)."""
    acc_t = sums_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)  # n * GK + c
    n = pid // GK
    c = pid - n * GK
    a_plane = a_ptr + n * sa_n + c * sa_c
    b_plane = b_ptr + n * sb_n + c * sb_c
    m_plane = m_ptr + n * H * W
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    colmask = cols < W
    sa = tl.zeros([BLOCK_H, BLOCK_W], dtype=acc_t)
    sb = tl.zeros([BLOCK_H, BLOCK_W], dtype=acc_t)
    for r0 in range(0, H, BLOCK_H):
        r = r0 + rows
        msk = (r < H)[:, None] & colmask[None, :]
        a = tl.load(a_plane + r[:, None] * sa_h + cols[None, :] * sa_w, mask=msk, other=0.0).to(acc_t)
        b = tl.load(b_plane + r[:, None] * sb_h + cols[None, :] * sb_w, mask=msk, other=0.0).to(acc_t)
        if HAS_M:
            mv = tl.load(m_plane + r[:, None] * W + cols[None, :], mask=msk, other=0.0)
            a = a * mv
            b = b * mv
        sa += a
        sb += b
    tl.store(sums_ptr + pid * 2, tl.sum(tl.sum(sa, axis=1), axis=0))
    tl.store(sums_ptr + pid * 2 + 1, tl.sum(tl.sum(sb, axis=1), axis=0))


@triton.jit
def _sop_global_kernel(
    sums_ptr, nm_ptr, pg_ptr, dist_ptr,
    C, G, K, DIV,
    HAS_NM: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP64: tl.constexpr,
):
    """One program per image: groups in order, pooled_grad [N, G k, 1, 1] and dist."""
    acc_t = pg_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    kv = kk < K
    GK = G * K
    div = tl.cast(DIV, acc_t)
    total = tl.sum(tl.zeros([BLOCK_K], dtype=acc_t), axis=0)
    for g in range(G):
        ch = g * K + kk
        p = tl.load(sums_ptr + (n * GK + ch) * 2, mask=kv, other=0.0)
        q = tl.load(sums_ptr + (n * GK + ch) * 2 + 1, mask=kv, other=0.0)
        u = p - q  # difference first, masks after (see the windowed kernel)
        v = p + q
        if HAS_NM:
            nmv = tl.load(nm_ptr + n * C + ch, mask=kv, other=0.0)
            u = u * nmv
            v = v * nmv
        u = u / div
        v = v / div
        uu = tl.sum(u * u, axis=0)
        vv = tl.sum(v * v, axis=0)
        uv = tl.sum(u * v, axis=0)
        total += 0.5 * (uu * vv + uv * uv)
        tl.store(pg_ptr + n * GK + ch, (vv + uv) * u + (uu + uv) * v, mask=kv)
    tl.store(dist_ptr + n, exact_sqrt(total, IS_FP64))


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------
@triton.jit
def _sop_bwd_window(s, pg_plane, r, cols, msk, Ho, Wo, SH, SW, PH, PW, WH, WW, th, tw):
    """s += pooled_grad at (ho, wo) = ((r + PH) // SH - th, (q + PW) // SW - tw) when that window covers (r, q)."""
    ho = (r + PH) // SH - th
    hv = (ho >= 0) & (ho < Ho) & (r - (ho * SH - PH) < WH)
    wo = (cols + PW) // SW - tw
    wv = (wo >= 0) & (wo < Wo) & (cols - (wo * SW - PW) < WW)
    s += tl.load(pg_plane + ho[:, None] * Wo + wo[None, :], mask=msk & hv[:, None] & wv[None, :], other=0.0)
    return s


@triton.jit
def _sop_bwd_kernel(
    gd_ptr, gd_s, d_ptr, d_s, m_ptr, nm_ptr, pg_ptr, g_ptr,
    C, H, W, GK, Ho, Wo, WH, WW, SH, SW, PH, PW, NTH, NTW,
    sg_n, sg_c, sg_h, sg_w,
    HAS_M: tl.constexpr, HAS_NM: tl.constexpr, GLOBAL: tl.constexpr, UNROLL: tl.constexpr,
    NTH_C: tl.constexpr, NTW_C: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_t = pg_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)  # n * C + c
    n = pid // C
    c = pid - n * C
    active = c < GK
    gd = tl.load(gd_ptr + n * gd_s).to(acc_t)
    d = tl.load(d_ptr + n * d_s).to(acc_t)
    coef = tl.where(d == 0, 0.0, gd / (2.0 * tl.where(d == 0, 1.0, d)))  # 0 at d == 0, NaN stays NaN
    coef = coef / tl.cast(WH * WW, acc_t)
    if HAS_NM:
        coef = coef * tl.load(nm_ptr + pid)
    coef = tl.where(active, coef, 0.0)  # dropped channels (c >= G k) get 0
    pg_plane = pg_ptr + (n * GK + c) * Ho * Wo
    g_plane = g_ptr + n * sg_n + c * sg_c
    m_plane = m_ptr + n * H * W
    if GLOBAL:
        pgv = tl.load(pg_plane, mask=active, other=0.0)

    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    colmask = cols < W
    for r0 in range(0, H, BLOCK_H):
        r = r0 + rows
        msk = (r < H)[:, None] & colmask[None, :]
        if GLOBAL:
            s = tl.full([BLOCK_H, BLOCK_W], 0.0, acc_t) + pgv
        else:
            s = tl.zeros([BLOCK_H, BLOCK_W], dtype=acc_t)
            lmsk = msk & active
            if UNROLL:
                for th in tl.static_range(NTH_C):
                    for tw in tl.static_range(NTW_C):
                        s = _sop_bwd_window(s, pg_plane, r, cols, lmsk, Ho, Wo, SH, SW, PH, PW, WH, WW, th, tw)
            else:
                for th in range(NTH):
                    for tw in range(NTW):
                        s = _sop_bwd_window(s, pg_plane, r, cols, lmsk, Ho, Wo, SH, SW, PH, PW, WH, WW, th, tw)
        grad = coef * s
        if HAS_M:
            grad = grad * tl.load(m_plane + r[:, None] * W + cols[None, :], mask=msk, other=0.0)
        tl.store(g_plane + r[:, None] * sg_h + cols[None, :] * sg_w, grad, mask=msk)


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def _sop_forward_impl(student, teacher, spatial_mask, channel_mask, groups, window, stride, padding):
    check_features("sop_forward", student, teacher)
    check_masks("sop_forward", student, spatial_mask, channel_mask)
    window, stride, padding = as_int_list(window), as_int_list(stride), as_int_list(padding)
    groups = int(groups)
    n, c, h, w = student.shape
    ho, wo, k, is_global = sop_geometry(student, groups, window, stride, padding)
    gk = groups * k
    acc = acc_dtype(student.dtype)
    dev = student.device
    dist = torch.empty(n, dtype=acc, device=dev)
    pooled_grad = torch.empty(n, gk, ho, wo, dtype=acc, device=dev)
    if n == 0:
        return dist, pooled_grad
    if h * w == 0:
        return dist.zero_(), pooled_grad.zero_()
    is64 = acc == torch.float64
    block_k = next_pow2(k)
    with device_guard(student):
        if is_global:
            sums = torch.empty(n, gk, 2, dtype=acc, device=dev)
            m_ptr, nm_ptr, has_m, has_nm = mask_args(spatial_mask, channel_mask, sums)
            bh, bw = plane_blocks(h, w)
            _plane_sums_kernel[(n * gk,)](
                student, teacher, m_ptr, sums, gk, h, w,
                *strides4(student), *strides4(teacher),
                HAS_M=has_m, BLOCK_H=bh, BLOCK_W=bw, num_warps=num_warps_for(bh * bw),
            )
            _sop_global_kernel[(n,)](
                sums, nm_ptr, pooled_grad, dist, c, groups, k, window[0] * window[1],
                HAS_NM=has_nm, BLOCK_K=block_k, IS_FP64=is64, num_warps=clamp(block_k // 128, 1, 8),
            )
        else:
            npos = ho * wo
            block_p = clamp(TILE_ELEMS // block_k, 1, next_pow2(npos))
            nt = triton.cdiv(npos, block_p)
            part = torch.empty(n, groups * nt, dtype=acc, device=dev)
            m_ptr, nm_ptr, has_m, has_nm = mask_args(spatial_mask, channel_mask, part)
            _sop_fwd_kernel[(n * groups, nt)](
                student, teacher, m_ptr, nm_ptr, pooled_grad, part,
                c, h, w, groups, k, ho, wo, window[0], window[1], stride[0], stride[1], padding[0], padding[1], nt,
                *strides4(student), *strides4(teacher),
                HAS_M=has_m, HAS_NM=has_nm, BLOCK_K=block_k, BLOCK_P=block_p,
                num_warps=num_warps_for(block_k * block_p),
            )
            rowsum_sqrt(part, dist)
    return dist, pooled_grad


def _sop_backward_impl(grad_dist, student, spatial_mask, channel_mask, dist, pooled_grad, groups, window, stride,
                       padding):
    check_features("sop_backward", student)
    check_masks("sop_backward", student, spatial_mask, channel_mask)
    window, stride, padding = as_int_list(window), as_int_list(stride), as_int_list(padding)
    groups = int(groups)
    n, c, h, w = student.shape
    ho, wo, k, is_global = sop_geometry(student, groups, window, stride, padding)
    gk = groups * k
    acc = acc_dtype(student.dtype)
    check_vector("sop_backward", "grad_dist", grad_dist, n)
    check_vector("sop_backward", "dist", dist, n)
    if tuple(pooled_grad.shape) != (n, gk, ho, wo) or pooled_grad.dtype != acc:
        raise ValueError(f"lskd_triton: sop_backward: pooled_grad must be a {acc} [N, G k, Ho, Wo] = "
                         f"{[n, gk, ho, wo]} tensor, got {pooled_grad.dtype} {tuple(pooled_grad.shape)}")
    grad = torch.empty_like(student)
    if grad.numel() == 0:
        return grad
    pooled_grad = pooled_grad.contiguous()
    m_ptr, nm_ptr, has_m, has_nm = mask_args(spatial_mask, channel_mask, pooled_grad)
    bh, bw = plane_blocks(h, w, SOP_BWD_TILE)
    nth = triton.cdiv(window[0], stride[0])
    ntw = triton.cdiv(window[1], stride[1])
    unroll = nth * ntw <= 16
    with device_guard(student):
        _sop_bwd_kernel[(n * c,)](
            grad_dist, grad_dist.stride(0), dist, dist.stride(0), m_ptr, nm_ptr, pooled_grad, grad,
            c, h, w, gk, ho, wo, window[0], window[1], stride[0], stride[1], padding[0], padding[1], nth, ntw,
            *strides4(grad),
            HAS_M=has_m, HAS_NM=has_nm, GLOBAL=is_global, UNROLL=unroll,
            NTH_C=nth if unroll else 1, NTW_C=ntw if unroll else 1,
            BLOCK_H=bh, BLOCK_W=bw, num_warps=num_warps_for(bh * bw),
        )
    return grad


# --------------------------------------------------------------------------
# custom ops (fake kernels and autograd are registered in lskd/ops/)
# --------------------------------------------------------------------------
@torch.library.custom_op(
    "lskd_triton::sop_forward",
    mutates_args=(),
    schema="(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, int groups, int[] window,"
    " int[] stride, int[] padding) -> (Tensor dist, Tensor pooled_grad)",
)
def sop_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
    groups: int,
    window: List[int],
    stride: List[int],
    padding: List[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _sop_forward_impl(student, teacher, spatial_mask, channel_mask, groups, window, stride, padding)


@torch.library.custom_op(
    "lskd_triton::sop_backward",
    mutates_args=(),
    schema="(Tensor grad_dist, Tensor student, Tensor? spatial_mask, Tensor? channel_mask, Tensor dist,"
    " Tensor pooled_grad, int groups, int[] window, int[] stride, int[] padding) -> Tensor",
)
def sop_backward(
    grad_dist: torch.Tensor,
    student: torch.Tensor,
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
    dist: torch.Tensor,
    pooled_grad: torch.Tensor,
    groups: int,
    window: List[int],
    stride: List[int],
    padding: List[int],
) -> torch.Tensor:
    return _sop_backward_impl(grad_dist, student, spatial_mask, channel_mask, dist, pooled_grad, groups, window,
                              stride, padding)
