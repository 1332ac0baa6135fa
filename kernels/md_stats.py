"""Triton kernels of the MD mask statistics: lskd_triton::md_stats.

Definitions: csrc/md_stats.cpp (header comment) and docs/MATHEMATICS.md §2.3.
    cos_bg[n, h, w]  = <A, Cb> / (max(|A|, eps) max(|Cb|, eps))   (over channels)
    cos_new[n, h, w] = <A, Dn> / (max(|A|, eps) max(|Dn|, eps))
    gap_bg[n, c]  = |mean_hw Cb - mean_hw A|,  gap_new[n, c] = |mean_hw Dn - mean_hw A|

One pass over A, Cb, Dn: one program per (n, tile of BLOCK_P positions)
loops over channel chunks of a [BLOCK_C, BLOCK_P] tile, accumulates the dots
and norms per position (-> cos maps, stored at the end) and writes the
per-channel partial sums of Cb - A and Dn - A over its positions to a small
[2, N, C, NT] buffer. A second tiny kernel sums those partials over the NT
tiles in a fixed order (deterministic, no atomics) and writes the gaps.
The [BLOCK_C, BLOCK_P] tile is coalesced for NCHW (positions contiguous) and
for channels-last (channels contiguous) alike.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._launch import (
    TILE_ELEMS,
    acc_dtype,
    check_features,
    clamp,
    device_guard,
    exact_sqrt,
    next_pow2,
    num_warps_for,
    split_eps,
    strides4,
)

__all__ = ["md_stats"]


@triton.jit
def _pos_offsets(pp, W, s_h, s_w, FLAT: tl.constexpr):
    """Element offset of flattened position pp = h * W + w for strides (s_h, s_w)."""
    if FLAT:
        return pp * s_w  # s_h == W * s_w (NCHW and channels-last)
    else:
        h = pp // W
        return h * s_h + (pp - h * W) * s_w


@triton.jit
def _md_main_kernel(
    a_ptr, c_ptr, d_ptr, cos_b_ptr, cos_n_ptr, part_ptr,
    C, W, HW, NT, PART2, eps_hi, eps_lo,
    sa_n, sa_c, sa_h, sa_w,
    sc_n, sc_c, sc_h, sc_w,
    sd_n, sd_c, sd_h, sd_w,
    FLAT: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = cos_b_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    pp = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pv = pp < HW
    oa = _pos_offsets(pp, W, sa_h, sa_w, FLAT)
    oc = _pos_offsets(pp, W, sc_h, sc_w, FLAT)
    od = _pos_offsets(pp, W, sd_h, sd_w, FLAT)
    a_img = a_ptr + n * sa_n
    c_img = c_ptr + n * sc_n
    d_img = d_ptr + n * sd_n
    cc = tl.arange(0, BLOCK_C)

    dot_b = tl.zeros([BLOCK_P], dtype=acc_t)
    dot_n = tl.zeros([BLOCK_P], dtype=acc_t)
    nrm_a = tl.zeros([BLOCK_P], dtype=acc_t)
    nrm_b = tl.zeros([BLOCK_P], dtype=acc_t)
    nrm_n = tl.zeros([BLOCK_P], dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + cc
        cv = ch < C
        m2 = cv[:, None] & pv[None, :]
        A = tl.load(a_img + ch[:, None] * sa_c + oa[None, :], mask=m2, other=0.0).to(acc_t)
        B = tl.load(c_img + ch[:, None] * sc_c + oc[None, :], mask=m2, other=0.0).to(acc_t)
        D = tl.load(d_img + ch[:, None] * sd_c + od[None, :], mask=m2, other=0.0).to(acc_t)
        dot_b += tl.sum(A * B, axis=0)
        dot_n += tl.sum(A * D, axis=0)
        nrm_a += tl.sum(A * A, axis=0)
        nrm_b += tl.sum(B * B, axis=0)
        nrm_n += tl.sum(D * D, axis=0)
        prow = part_ptr + (n * C + ch) * NT + tile
        tl.store(prow, tl.sum(B - A, axis=1), mask=cv)
        tl.store(prow + PART2, tl.sum(D - A, axis=1), mask=cv)
    eps = tl.cast(eps_hi, acc_t) + tl.cast(eps_lo, acc_t)
    na = tl.maximum(exact_sqrt(nrm_a, IS_FP64), eps)
    nb = tl.maximum(exact_sqrt(nrm_b, IS_FP64), eps)
    nn = tl.maximum(exact_sqrt(nrm_n, IS_FP64), eps)
    tl.store(cos_b_ptr + n * HW + pp, dot_b / (na * nb), mask=pv)
    tl.store(cos_n_ptr + n * HW + pp, dot_n / (na * nn), mask=pv)


@triton.jit
def _md_gap_kernel(
    part_ptr, gap_b_ptr, gap_n_ptr, NC, NT, PART2, HW,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """gap[row] = |sum_t part[row, t]| / HW for rows of the [N * C, NT] partial buffers."""
    acc_t = gap_b_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rv = rows < NC
    tt = tl.arange(0, BLOCK_T)
    sb = tl.zeros([BLOCK_R, BLOCK_T], dtype=acc_t)
    sn = tl.zeros([BLOCK_R, BLOCK_T], dtype=acc_t)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + tt
        m2 = rv[:, None] & (t < NT)[None, :]
        ptrs = part_ptr + rows[:, None] * NT + t[None, :]
        sb += tl.load(ptrs, mask=m2, other=0.0)
        sn += tl.load(ptrs + PART2, mask=m2, other=0.0)
    hw = tl.cast(HW, acc_t)
    tl.store(gap_b_ptr + rows, tl.abs(tl.sum(sb, axis=1) / hw), mask=rv)
    tl.store(gap_n_ptr + rows, tl.abs(tl.sum(sn, axis=1) / hw), mask=rv)


def _flat(t: torch.Tensor) -> bool:
    _, _, h, w = t.shape
    return h <= 1 or t.stride(2) == w * t.stride(3)


def _md_stats_impl(feat, feat_bg_erased, feat_new_erased, eps):
    check_features("md_stats", feat, feat_bg_erased, feat_new_erased)
    n, c, h, w = feat.shape
    acc = acc_dtype(feat.dtype)
    dev = feat.device
    cos_bg = torch.empty(n, h, w, dtype=acc, device=dev)
    cos_new = torch.empty(n, h, w, dtype=acc, device=dev)
    gap_bg = torch.empty(n, c, dtype=acc, device=dev)
    gap_new = torch.empty(n, c, dtype=acc, device=dev)
    hw = h * w
    if n == 0 or hw == 0:
        gap_bg.fill_(float("nan"))  # mean over an empty map, as torch
        gap_new.fill_(float("nan"))
        return cos_bg, cos_new, gap_bg, gap_new
    if c == 0:
        cos_bg.zero_()
        cos_new.zero_()
        return cos_bg, cos_new, gap_bg, gap_new
    # Positions per program: enough programs to fill the GPU (~4 per SM on an
    # H100), 32..256 positions (128 B+ contiguous per channel row for NCHW).
    block_p = clamp(prev_pow2_div(n * hw, 528), 32, 256)
    block_p = min(block_p, next_pow2(hw))
    block_c = clamp(TILE_ELEMS // 2 // block_p, 1, next_pow2(c))
    nt = triton.cdiv(hw, block_p)
    part = torch.empty(2, n, c, nt, dtype=acc, device=dev)
    part2 = n * c * nt
    eps_hi, eps_lo = split_eps(float(eps))
    is64 = acc == torch.float64
    flat = _flat(feat) and _flat(feat_bg_erased) and _flat(feat_new_erased)
    with device_guard(feat):
        _md_main_kernel[(n, nt)](
            feat, feat_bg_erased, feat_new_erased, cos_bg, cos_new, part,
            c, w, hw, nt, part2, eps_hi, eps_lo,
            *strides4(feat), *strides4(feat_bg_erased), *strides4(feat_new_erased),
            FLAT=flat, IS_FP64=is64, BLOCK_C=block_c, BLOCK_P=block_p,
            num_warps=num_warps_for(block_c * block_p),
        )
        block_t = clamp(next_pow2(nt), 1, 64)
        block_r = clamp(2048 // block_t, 1, 256)
        _md_gap_kernel[(triton.cdiv(n * c, block_r),)](
            part, gap_bg, gap_new, n * c, nt, part2, hw,
            BLOCK_R=block_r, BLOCK_T=block_t, num_warps=4,
        )
    return cos_bg, cos_new, gap_bg, gap_new


def prev_pow2_div(total: int, programs: int) -> int:
    """Largest power of two p with total / p >= programs (at least 1)."""
    p = 1
    while total // (2 * p) >= programs:
        p *= 2
    return p


# --------------------------------------------------------------------------
# custom op (fake kernel registered in lskd/ops/)
# --------------------------------------------------------------------------
@torch.library.custom_op(
    "lskd_triton::md_stats",
    mutates_args=(),
    schema="(Tensor feat, Tensor feat_bg_erased, Tensor feat_new_erased, float eps)"
    " -> (Tensor cos_bg, Tensor cos_new, Tensor gap_bg, Tensor gap_new)",
)
def md_stats(
    feat: torch.Tensor,
    feat_bg_erased: torch.Tensor,
    feat_new_erased: torch.Tensor,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _md_stats_impl(feat, feat_bg_erased, feat_new_erased, eps)
