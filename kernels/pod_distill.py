"""Triton kernels of the Local POD distance: lskd_triton::pod_forward / pod_backward.

Definitions: csrc/pod_distill.cpp (header comment) and docs/MATHEMATICS.md §2.1. For scale s,
kh = H // s, kw = W // s, Hs = s * kh, Ws = s * kw; the embedding of one
(n, c) plane at offset off_s holds the width pools
    emb[off_s + j * Hs + r]          = mean_{col in [j kw, (j+1) kw)} z[r, col]
and the height pools
    emb[off_s + s * Hs + i * Ws + q] = mean_{row in [i kh, (i+1) kh)} z[row, q].

Forward: one program per (n, c) plane, a loop over chunks of BLOCK_H full
rows (BLOCK_W >= W). Width pools are complete within a chunk (stored at once);
height pools are accumulated per (scale, region row) in a small register
accumulator and stored when the region row is complete. Each program writes
the sum of squares of its embedding values to part[n, c]; a second tiny kernel
sums part[n, :] in a fixed order and takes the square root (no atomics).

Two compile-time fast paths, both chosen on the host:
  ALIGN_W  W is a power of two == BLOCK_W and every s divides W: the width
           pools of a scale are one reshape [BLOCK_H, s, kw] + sum.
  ALIGN_H  BLOCK_H divides every kh: a chunk lies inside one region row of
           every scale, so one column sum per chunk serves all scales.
The generic path handles any H, W (masked segment sums).

Backward: one program per plane, loop over row chunks; per element gathers
the (cached, tiny) embedding values of the regions that contain it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import (
    MAX_SCALES,
    TILE_ELEMS,
    acc_dtype,
    as_int_list,
    check_features,
    check_masks,
    check_vector,
    device_guard,
    mask_args,
    next_pow2,
    num_warps_for,
    plane_blocks,
    rowsum_sqrt,
    strides4,
)

__all__ = ["pod_forward", "pod_backward", "pod_layout"]


# --------------------------------------------------------------------------
# host-side geometry
# --------------------------------------------------------------------------
def pod_layout(h: int, w: int, scales: List[int]) -> int:
    """Checks the scales (as make_pod_layout) and returns L."""
    if not 1 <= len(scales) <= MAX_SCALES:
        raise ValueError(f"lskd_triton: pod: between 1 and {MAX_SCALES} scales are supported, got {len(scales)}")
    total = 0
    for s in scales:
        if not (1 <= s <= h and s <= w):
            raise ValueError(f"lskd_triton: pod: scale {s} does not fit a map of size {h}x{w}")
        total += s * (s * (h // s)) + s * (s * (w // s))
    return total


def _pod_config(h: int, w: int, scales: List[int]):
    """(BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W, forward num_warps, backward num_warps)."""
    bh_max, bw = plane_blocks(h, w, TILE_ELEMS)
    # Largest power-of-two chunk height that divides every kh.
    p = bh_max
    while p > 1 and any((h // s) % p for s in scales):
        p //= 2
    align_h = p >= min(bh_max, 8)
    bh = p if align_h else bh_max
    align_w = (w == bw) and all(w % s == 0 for s in scales)
    return bh, bw, align_h, align_w, num_warps_for(bh * bw, 16), num_warps_for(bh * bw, 8)


def _scale_args(scales: List[int]):
    s = list(scales) + [0] * (MAX_SCALES - len(scales))
    return dict(NS=len(scales), S0=s[0], S1=s[1], S2=s[2], S3=s[3], S4=s[4], S5=s[5], S6=s[6], S7=s[7])


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------
@triton.jit
def _pod_fwd_scale(
    z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
    S: tl.constexpr, SI: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ALIGN_H: tl.constexpr, ALIGN_W: tl.constexpr,
):
    """One scale of one row chunk: store the width pools of the chunk's rows,
    accumulate the height pools, store those whose region row is complete."""
    acc_t = hacc.dtype
    kh = H // S
    kw = W // S
    Hs = S * kh
    Ws = S * kw
    khf = tl.cast(kh, acc_t)
    kwf = tl.cast(kw, acc_t)
    rin = r < Hs

    # ---- width pools (complete within the chunk)
    if ALIGN_W:
        wp = tl.sum(tl.reshape(z, (BLOCK_H, S, BLOCK_W // S)), axis=2) / kwf  # [BLOCK_H, S]
        jj = tl.arange(0, S)
        tl.store(emb_row + off + jj[None, :] * Hs + r[:, None], wp, mask=rin[:, None])
        sq_r += tl.sum(tl.where(rin[:, None], wp * wp, 0.0), axis=1)
    else:
        for j in tl.static_range(S):
            seg = (cols >= j * kw) & (cols < (j + 1) * kw)
            wsum = tl.sum(tl.where(seg[None, :], z, 0.0), axis=1) / kwf  # [BLOCK_H]
            tl.store(emb_row + off + j * Hs + r, wsum, mask=rin)
            sq_r += tl.where(rin, wsum * wsum, 0.0)

    # ---- height pools (accumulated over chunks)
    sel_s = sidx[:, None] == SI
    cur = tl.sum(tl.where(sel_s, hacc, 0.0), axis=0)  # [BLOCK_W]
    cin = cols < Ws
    hbase = emb_row + off + S * Hs
    if ALIGN_H:
        # The chunk lies inside region row i (or entirely below Hs).
        in_s = r0 < Hs
        cur += tl.where(in_s, csum, 0.0)
        done = in_s & (((r0 + BLOCK_H) % kh) == 0)
        i = r0 // kh
        hp = cur / khf
        tl.store(hbase + i * Ws + cols, hp, mask=cin & done)
        sq_c += tl.where(cin & done, hp * hp, 0.0)
        cur = tl.where(done, 0.0, cur)
    else:
        i_lo = r0 // kh
        i_hi = (tl.minimum(r0 + BLOCK_H, Hs) - 1) // kh
        for i in range(i_lo, i_hi + 1):
            rsel = (r >= i * kh) & (r < (i + 1) * kh)
            cur += tl.sum(tl.where(rsel[:, None], z, 0.0), axis=0)
            done = (i + 1) * kh <= r0 + BLOCK_H
            hp = cur / khf
            tl.store(hbase + i * Ws + cols, hp, mask=cin & done)
            sq_c += tl.where(cin & done, hp * hp, 0.0)
            cur = tl.where(done, 0.0, cur)
    hacc = tl.where(sel_s, cur[None, :], hacc)
    off = off + S * Hs + S * Ws
    return hacc, sq_r, sq_c, off


@triton.jit
def _pod_fwd_kernel(
    a_ptr, b_ptr, m_ptr, nm_ptr, emb_ptr, part_ptr,
    C, H, W, L,
    sa_n, sa_c, sa_h, sa_w,
    sb_n, sb_c, sb_h, sb_w,
    NS: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
    HAS_M: tl.constexpr, HAS_NM: tl.constexpr, SQUARE: tl.constexpr,
    ALIGN_H: tl.constexpr, ALIGN_W: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, NSP: tl.constexpr,
):
    acc_t = emb_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)  # plane n * C + c
    n = pid // C
    c = pid - n * C
    a_plane = a_ptr + n * sa_n + c * sa_c
    b_plane = b_ptr + n * sb_n + c * sb_c
    m_plane = m_ptr + n * H * W
    emb_row = emb_ptr + pid * L
    if HAS_NM:
        nmv = tl.load(nm_ptr + pid)

    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    colmask = cols < W
    sidx = tl.arange(0, NSP)
    hacc = tl.zeros([NSP, BLOCK_W], dtype=acc_t)
    sq_r = tl.zeros([BLOCK_H], dtype=acc_t)
    sq_c = tl.zeros([BLOCK_W], dtype=acc_t)

    for r0 in range(0, H, BLOCK_H):
        r = r0 + rows
        msk = (r < H)[:, None] & colmask[None, :]
        a = tl.load(a_plane + r[:, None] * sa_h + cols[None, :] * sa_w, mask=msk, other=0.0).to(acc_t)
        b = tl.load(b_plane + r[:, None] * sb_h + cols[None, :] * sb_w, mask=msk, other=0.0).to(acc_t)
        # The difference is taken on the loaded values and the masks applied after:
        # (a m)^2 - (b m)^2 = (a - b)(a + b) m^2. Any product feeding a subtraction
        # (a*a - b*b, a*m - b*m) is contracted by the GPU compiler into an FMA, which
        # is not exactly 0 when a == b.
        if SQUARE:
            z = (a - b) * (a + b)
        else:
            z = a - b
        if HAS_M:
            mv = tl.load(m_plane + r[:, None] * W + cols[None, :], mask=msk, other=0.0)
            z = z * (mv * mv) if SQUARE else z * mv
        if HAS_NM:
            z = z * (nmv * nmv) if SQUARE else z * nmv
        if ALIGN_H:
            csum = tl.sum(z, axis=0)
        else:
            csum = sq_c  # unused
        off = 0
        if NS > 0:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S0, 0, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 1:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S1, 1, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 2:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S2, 2, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 3:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S3, 3, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 4:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S4, 4, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 5:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S5, 5, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 6:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S6, 6, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)
        if NS > 7:
            hacc, sq_r, sq_c, off = _pod_fwd_scale(z, csum, r, r0, cols, H, W, emb_row, off, hacc, sidx, sq_r, sq_c,
                                                   S7, 7, BLOCK_H, BLOCK_W, ALIGN_H, ALIGN_W)

    total = tl.sum(sq_r, axis=0) + tl.sum(sq_c, axis=0)
    tl.store(part_ptr + pid, total)


# --------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------
@triton.jit
def _pod_bwd_scale(
    G, r, r0, cols, msk, H, W, emb_row, off,
    S: tl.constexpr, ALIGN_H: tl.constexpr,
):
    """G += [r < Hs, q < Ws] * (emb_w(j = q // kw, r) / kw + emb_h(i = r // kh, q) / kh)."""
    acc_t = G.dtype
    kh = H // S
    kw = W // S
    Hs = S * kh
    Ws = S * kw
    inv_kh = 1.0 / tl.cast(kh, acc_t)
    inv_kw = 1.0 / tl.cast(kw, acc_t)
    rin = r < Hs
    cin = cols < Ws
    inside = rin[:, None] & cin[None, :] & msk
    jw = cols // kw
    ew = tl.load(emb_row + off + jw[None, :] * Hs + r[:, None], mask=inside, other=0.0)
    hbase = emb_row + off + S * Hs
    if ALIGN_H:
        i = r0 // kh
        eh = tl.load(hbase + i * Ws + cols, mask=cin & (r0 < Hs), other=0.0)  # [BLOCK_W]
        G += ew * inv_kw + eh[None, :] * inv_kh
    else:
        ih = r // kh
        eh = tl.load(hbase + ih[:, None] * Ws + cols[None, :], mask=inside, other=0.0)
        G += ew * inv_kw + eh * inv_kh
    off = off + S * Hs + S * Ws
    return G, off


@triton.jit
def _pod_bwd_kernel(
    gd_ptr, gd_s, d_ptr, d_s, a_ptr, m_ptr, nm_ptr, emb_ptr, g_ptr,
    C, H, W, L,
    sa_n, sa_c, sa_h, sa_w,
    sg_n, sg_c, sg_h, sg_w,
    NS: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr,
    S4: tl.constexpr, S5: tl.constexpr, S6: tl.constexpr, S7: tl.constexpr,
    HAS_M: tl.constexpr, HAS_NM: tl.constexpr, SQUARE: tl.constexpr,
    ALIGN_H: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_t = emb_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    n = pid // C
    c = pid - n * C
    gd = tl.load(gd_ptr + n * gd_s).to(acc_t)
    d = tl.load(d_ptr + n * d_s).to(acc_t)
    coef = tl.where(d == 0, 0.0, gd / tl.where(d == 0, 1.0, d))  # 0 at d == 0, NaN stays NaN
    if HAS_NM:
        nmv = tl.load(nm_ptr + pid)
    a_plane = a_ptr + n * sa_n + c * sa_c
    g_plane = g_ptr + n * sg_n + c * sg_c
    m_plane = m_ptr + n * H * W
    emb_row = emb_ptr + pid * L

    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    colmask = cols < W
    for r0 in range(0, H, BLOCK_H):
        r = r0 + rows
        msk = (r < H)[:, None] & colmask[None, :]
        G = tl.zeros([BLOCK_H, BLOCK_W], dtype=acc_t)
        off = 0
        if NS > 0:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S0, ALIGN_H)
        if NS > 1:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S1, ALIGN_H)
        if NS > 2:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S2, ALIGN_H)
        if NS > 3:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S3, ALIGN_H)
        if NS > 4:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S4, ALIGN_H)
        if NS > 5:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S5, ALIGN_H)
        if NS > 6:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S6, ALIGN_H)
        if NS > 7:
            G, off = _pod_bwd_scale(G, r, r0, cols, msk, H, W, emb_row, off, S7, ALIGN_H)
        # dz/da = 2 a (m n)^2 when square, else m n
        f = tl.full([BLOCK_H, BLOCK_W], 1.0, acc_t)
        if HAS_M:
            f = tl.load(m_plane + r[:, None] * W + cols[None, :], mask=msk, other=0.0)
        if HAS_NM:
            f = f * nmv
        if SQUARE:
            a = tl.load(a_plane + r[:, None] * sa_h + cols[None, :] * sa_w, mask=msk, other=0.0).to(acc_t)
            dz = 2.0 * a * f * f
        else:
            dz = f
        grad = (coef * G) * dz
        tl.store(g_plane + r[:, None] * sg_h + cols[None, :] * sg_w, grad, mask=msk)


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def _pod_forward_impl(student, teacher, spatial_mask, channel_mask, scales, square):
    check_features("pod_forward", student, teacher)
    check_masks("pod_forward", student, spatial_mask, channel_mask)
    scales = as_int_list(scales)
    n, c, h, w = student.shape
    length = pod_layout(h, w, scales)
    acc = acc_dtype(student.dtype)
    dist = torch.empty(n, dtype=acc, device=student.device)
    emb = torch.empty(n, c, length, dtype=acc, device=student.device)
    if n == 0:
        return dist, emb
    if c == 0:
        return dist.zero_(), emb
    part = torch.empty(n, c, dtype=acc, device=student.device)
    m_ptr, nm_ptr, has_m, has_nm = mask_args(spatial_mask, channel_mask, part)
    bh, bw, align_h, align_w, warps, _ = _pod_config(h, w, scales)
    with device_guard(student):
        _pod_fwd_kernel[(n * c,)](
            student, teacher, m_ptr, nm_ptr, emb, part,
            c, h, w, length,
            *strides4(student), *strides4(teacher),
            **_scale_args(scales),
            HAS_M=has_m, HAS_NM=has_nm, SQUARE=bool(square),
            ALIGN_H=align_h, ALIGN_W=align_w,
            BLOCK_H=bh, BLOCK_W=bw, NSP=next_pow2(len(scales)),
            num_warps=warps,
        )
        rowsum_sqrt(part, dist)
    return dist, emb


def _pod_backward_impl(grad_dist, student, spatial_mask, channel_mask, dist, emb, scales, square):
    check_features("pod_backward", student)
    check_masks("pod_backward", student, spatial_mask, channel_mask)
    scales = as_int_list(scales)
    n, c, h, w = student.shape
    length = pod_layout(h, w, scales)
    acc = acc_dtype(student.dtype)
    check_vector("pod_backward", "grad_dist", grad_dist, n)
    check_vector("pod_backward", "dist", dist, n)
    if tuple(emb.shape) != (n, c, length) or emb.dtype != acc:
        raise ValueError(f"lskd_triton: pod_backward: emb must be a {acc} [N, C, L] = {[n, c, length]} tensor, "
                         f"got {emb.dtype} {tuple(emb.shape)}")
    grad = torch.empty_like(student)
    if grad.numel() == 0:
        return grad
    emb = emb.contiguous()
    m_ptr, nm_ptr, has_m, has_nm = mask_args(spatial_mask, channel_mask, emb)
    bh, bw, align_h, _, _, warps = _pod_config(h, w, scales)
    with device_guard(student):
        _pod_bwd_kernel[(n * c,)](
            grad_dist, grad_dist.stride(0), dist, dist.stride(0), student, m_ptr, nm_ptr, emb, grad,
            c, h, w, length,
            *strides4(student), *strides4(grad),
            **_scale_args(scales),
            HAS_M=has_m, HAS_NM=has_nm, SQUARE=bool(square),
            ALIGN_H=align_h,
            BLOCK_H=bh, BLOCK_W=bw,
            num_warps=warps,
        )
    return grad


# --------------------------------------------------------------------------
# custom ops (fake kernels and autograd are registered in lskd/ops/)
# --------------------------------------------------------------------------
@torch.library.custom_op(
    "lskd_triton::pod_forward",
    mutates_args=(),
    schema="(Tensor student, Tensor teacher, Tensor? spatial_mask, Tensor? channel_mask, int[] scales, bool square)"
    " -> (Tensor dist, Tensor emb)",
)
def pod_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
    scales: List[int],
    square: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _pod_forward_impl(student, teacher, spatial_mask, channel_mask, scales, square)


@torch.library.custom_op(
    "lskd_triton::pod_backward",
    mutates_args=(),
    schema="(Tensor grad_dist, Tensor student, Tensor? spatial_mask, Tensor? channel_mask, Tensor dist, Tensor emb,"
    " int[] scales, bool square) -> Tensor",
)
def pod_backward(
    grad_dist: torch.Tensor,
    student: torch.Tensor,
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
    dist: torch.Tensor,
    emb: torch.Tensor,
    scales: List[int],
    square: bool,
) -> torch.Tensor:
    return _pod_backward_impl(grad_dist, student, spatial_mask, channel_mask, dist, emb, scales, square)
