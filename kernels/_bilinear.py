"""Bilinear upsampling helpers shared by the Triton kernels that interpolate logits per output pixel
(ce_unkd, pseudo_labels).

The rule is torch's upsample_bilinear2d with align_corners=False and an output size (no scale
factor): for an output coordinate o along an axis of n_in input and n_out output points,
    src = max(scale (o + 0.5) - 0.5, 0),   scale = n_in / n_out (in the acc dtype),
    i0 = min(floor(src), n_in - 1),  l1 = src - i0,  l0 = 1 - l1,
    i1 = i0 + 1 when i0 < n_in - 1 and l1 != 0, else i0 (a neighbour of weight 0 is not read).
Host side: ``scale_parts`` passes the scale exactly (Triton passes Python floats as float32).
Device side: ``axis_coords`` (indices and weights of one axis) and ``lerp`` (the value from the
four corners, in the weights' dtype).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import triton
import triton.language as tl

__all__ = ["axis_coords", "lerp", "scale_parts"]


def scale_parts(n_in: int, n_out: int, is64: bool) -> Tuple[float, float, float]:
    """(acc_t) n_in / n_out as float32 parts (Triton passes Python floats as fp32): hi alone for
    fp32 (double rounding of a quotient is innocuous), hi + mid + lo for fp64 (exact)."""
    s = n_in / n_out
    hi = float(np.float32(s))
    if not is64:
        return hi, 0.0, 0.0
    mid = float(np.float32(s - hi))
    lo = float(np.float32(s - hi - mid))
    return hi, mid, lo


@triton.jit
def axis_coords(o, n_in, hi, mid, lo, IS_FP64: tl.constexpr):
    """Source indices (i0, i1) and weights (l0, l1) of output coordinates o (torch's
    align_corners=False rule; scale = hi + mid + lo, exact in the acc dtype)."""
    if IS_FP64:
        scale = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
        src = scale * (o.to(tl.float64) + 0.5) - 0.5
    else:
        scale = tl.cast(hi, tl.float32)
        src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0: truncation is floor
    l1 = src - i0.to(src.dtype)
    # a neighbour of weight 0 is not read: 0 * NaN would leak one pixel's NaN (or inf) into the next
    i1 = i0 + ((i0 < n_in - 1) & (l1 != 0)).to(tl.int32)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def lerp(base, o00, o01, o10, o11, mask, ly0, ly1, lx0, lx1):
    """Bilinear value from the four corners base + o.. (any broadcastable shapes), in the weights' dtype."""
    acc_t = ly0.dtype
    x00 = tl.load(base + o00, mask=mask, other=0.0).to(acc_t)
    x01 = tl.load(base + o01, mask=mask, other=0.0).to(acc_t)
    x10 = tl.load(base + o10, mask=mask, other=0.0).to(acc_t)
    x11 = tl.load(base + o11, mask=mask, other=0.0).to(acc_t)
    return ly0 * (lx0 * x00 + lx1 * x01) + ly1 * (lx0 * x10 + lx1 * x11)
