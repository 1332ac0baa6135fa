"""Launch helpers shared by the Triton kernels of lskd (pod, sop, md).

Host side: the accumulation dtype (lskd._dtypes.acc_dtype, re-exported for the
kernels), argument checks, stride packing, mask presence flags, block and warp
choice, device guard. Device side: two tiny jitted
helpers (a square root that is exact in fp32 and fp64, and the fixed-order
"sum a row of partials, take the square root" kernel that turns per-program
partial sums into the per-image distance).

Everything here works under TRITON_INTERPRET=1 on CPU tensors as well as on
CUDA tensors. Only Triton APIs present in both triton 3.6 and 3.8 are used.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from lskd._dtypes import acc_dtype

MAX_SCALES = 8  # as kMaxScales in csrc/common.h

# Target number of elements of one register tile (per loaded tensor). The
# kernels are memory bound; 2048 fp32 values over 4 warps is 16 per thread.
TILE_ELEMS = 2048


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------
def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def prev_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x).bit_length() - 1)


def clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def num_warps_for(tile: int, per_thread: int = 8) -> int:
    """Warps for a register tile of `tile` elements: about `per_thread` elements per thread, 2..8 warps.

    (Register counts from offline sm_90 compiles: the gather-heavy backward kernels
    want ~8 elements per thread; the Local POD forward ~16.)"""
    return clamp(tile // (32 * per_thread), 2, 8)


def split_eps(eps: float) -> Tuple[float, float]:
    """eps as hi + lo float32 parts: Triton passes Python floats as fp32, the
    kernel adds them in the acc dtype so that fp64 kernels see eps exactly."""
    import numpy as np

    hi = float(np.float32(eps))
    lo = float(np.float32(eps - hi))
    return hi, lo


# --------------------------------------------------------------------------
# checks and argument packing
# --------------------------------------------------------------------------
def strides4(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """Element strides (n, c, h, w) of a 4-D tensor (any memory format)."""
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def check_features(op: str, a: torch.Tensor, *others: torch.Tensor) -> None:
    if a.dim() != 4:
        raise ValueError(f"lskd_triton: {op}: features must be [N, C, H, W], got {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"lskd_triton: {op}: floating-point input required, got {a.dtype}")
    for o in others:
        if o.shape != a.shape:
            raise ValueError(f"lskd_triton: {op}: shapes {tuple(a.shape)} and {tuple(o.shape)} differ")
        if o.dtype != a.dtype:
            raise ValueError(f"lskd_triton: {op}: dtypes {a.dtype} and {o.dtype} differ")
        if o.device != a.device:
            raise ValueError(f"lskd_triton: {op}: devices {a.device} and {o.device} differ")


def check_masks(
    op: str,
    a: torch.Tensor,
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
) -> None:
    """Masks as the Python layer passes them: [N, H, W] and [N, C], contiguous, acc dtype."""
    acc = acc_dtype(a.dtype)
    n, c, h, w = a.shape
    if spatial_mask is not None:
        m = spatial_mask
        if tuple(m.shape) != (n, h, w):
            raise ValueError(f"lskd_triton: {op}: spatial_mask must be [N, H, W] = {[n, h, w]}, got {tuple(m.shape)}")
        if m.dtype != acc or not m.is_contiguous() or m.device != a.device:
            raise ValueError(f"lskd_triton: {op}: spatial_mask must be a contiguous {acc} tensor on {a.device}")
    if channel_mask is not None:
        m = channel_mask
        if tuple(m.shape) != (n, c):
            raise ValueError(f"lskd_triton: {op}: channel_mask must be [N, C] = {[n, c]}, got {tuple(m.shape)}")
        if m.dtype != acc or not m.is_contiguous() or m.device != a.device:
            raise ValueError(f"lskd_triton: {op}: channel_mask must be a contiguous {acc} tensor on {a.device}")


def check_vector(op: str, name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"lskd_triton: {op}: {name} must be [N] = [{n}], got {tuple(t.shape)}")


def mask_args(
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
    dummy: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """(m_ptr, n_ptr, HAS_M, HAS_NM): absent masks become a never-read dummy pointer."""
    has_m = spatial_mask is not None
    has_n = channel_mask is not None
    return (
        spatial_mask if has_m else dummy,
        channel_mask if has_n else dummy,
        has_m,
        has_n,
    )


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current for the launch (no-op on CPU / interpreter)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------
# block choice for "one program per (n, c) plane, loop over row chunks"
# --------------------------------------------------------------------------
def plane_blocks(h: int, w: int, tile: int = TILE_ELEMS) -> Tuple[int, int]:
    """(BLOCK_H, BLOCK_W) with BLOCK_W >= W covering a full row."""
    bw = next_pow2(w)
    bh = clamp(tile // bw, 1, next_pow2(h))
    return bh, bw


# --------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------
@triton.jit
def exact_sqrt(x, IS_FP64: tl.constexpr):
    """Correctly rounded square root in fp32 (tl.sqrt is the fast one) and fp64."""
    if IS_FP64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _rowsum_sqrt_kernel(part_ptr, out_ptr, R, BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
    """out[n] = sqrt(sum_r part[n, r]) in a fixed order (one program per n)."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    base = part_ptr + n * R
    for r0 in range(0, R, BLOCK):
        idx = r0 + offs
        acc += tl.load(base + idx, mask=idx < R, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + n, exact_sqrt(total, IS_FP64))


def rowsum_sqrt(part: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = sqrt(part[n, :].sum()) for a contiguous [N, R] acc-dtype buffer."""
    n, r = part.shape
    if n == 0:
        return
    block = clamp(next_pow2(r), 16, 1024)
    _rowsum_sqrt_kernel[(n,)](
        part, out, r, BLOCK=block, IS_FP64=out.dtype == torch.float64, num_warps=4 if block >= 512 else 1
    )


def as_int_list(x: Sequence[int]) -> List[int]:
    return [int(v) for v in x]
