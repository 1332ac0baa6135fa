"""Input checks shared by every operator and backend.

Bad input raises a ``TypeError`` (wrong kind or dtype) or ``ValueError``
(shapes, devices, parameters) that names the argument and the shapes, before
any kernel runs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._dtypes import acc_dtype

__all__ = [
    "check_features",
    "check_pair",
    "check_triple",
    "prepare_masks",
    "check_scales",
    "check_reduction",
    "reduction_code",
    "pod_embedding_length",
    "sop_geometry",
    "reduce",
]

REDUCTIONS = ("mean", "sum", "none")
# The reduction argument of the fused ops lskd::pod_distill / lskd::sop_distill (as at::Reduction).
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_features(op: str, **tensors: torch.Tensor) -> torch.Tensor:
    """Check feature maps given by name: 4-D, floating, same shape/dtype/device, non-empty.

    Returns the first one (the reference for shape, dtype and device).
    """
    names = list(tensors)
    first_name = names[0]
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape [N, C, H, W], got {_shape(t)}")
        if first is None:
            first = t
            if t.numel() == 0:
                raise ValueError(f"{op}: {name} is empty (shape {_shape(t)}): N, C, H and W must be >= 1")
            continue
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {_shape(t)} but {first_name} has shape {_shape(first)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    assert first is not None
    return first


def _same_features(first: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether (first, other) certainly pass check_features: the fast path of valid input."""
    return (
        isinstance(first, torch.Tensor)
        and isinstance(other, torch.Tensor)
        and first.dim() == 4
        and first.is_floating_point()
        and first.shape == other.shape
        and first.dtype == other.dtype
        and first.device == other.device
        and first.numel() != 0
    )


def check_pair(op: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``check_features(op, student=student, teacher=teacher)``, with a fast path.

    Valid input (the common case) is accepted by a few comparisons; anything
    else goes through :func:`check_features`, which raises the same errors as
    before. Returns the student.
    """
    if _same_features(student, teacher):
        return student
    return check_features(op, student=student, teacher=teacher)


def check_triple(
    op: str, names: Tuple[str, str, str], a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``check_features(op, **dict(zip(names, (a, b, c))))`` with the fast path of :func:`check_pair`."""
    if _same_features(a, b) and _same_features(a, c):
        return a
    return check_features(op, **{names[0]: a, names[1]: b, names[2]: c})


def _check_mask(op: str, name: str, mask: torch.Tensor, ref: torch.Tensor, expected: Tuple[int, ...]) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{op}: {name} must be bool or floating point, got {mask.dtype}")
    if tuple(mask.shape) != expected:
        exp = "[" + ", ".join(str(s) for s in expected) + "]"
        raise ValueError(f"{op}: {name} must have shape {exp} for features of shape {_shape(ref)}, got {_shape(mask)}")
    if mask.device != ref.device:
        raise ValueError(f"{op}: {name} is on {mask.device} but the features are on {ref.device}")


def prepare_masks(
    op: str,
    student: torch.Tensor,
    spatial_mask: Optional[torch.Tensor],
    channel_mask: Optional[torch.Tensor],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Check the user masks and convert them for the kernels.

    ``spatial_mask [N, 1, H, W]`` -> ``[N, H, W]`` and ``channel_mask [N, C]``,
    contiguous, in the accumulation dtype, detached (masks never get gradients).
    """
    n, c, h, w = student.shape
    acc = acc_dtype(student.dtype)
    m = k = None
    if spatial_mask is not None:
        _check_mask(op, "spatial_mask", spatial_mask, student, (n, 1, h, w))
        m = spatial_mask.detach() if spatial_mask.requires_grad else spatial_mask
        m = m.reshape(n, h, w).to(acc).contiguous()
    if channel_mask is not None:
        _check_mask(op, "channel_mask", channel_mask, student, (n, c))
        k = channel_mask.detach() if channel_mask.requires_grad else channel_mask
        k = k.to(acc).contiguous()
    return m, k


def check_scales(op: str, scales: Sequence[int], height: int, width: int) -> Tuple[int, ...]:
    """Local POD scales: 1 to 8 positive integers, each at most min(H, W)."""
    if isinstance(scales, int) or not isinstance(scales, (list, tuple)):
        raise TypeError(f"{op}: scales must be a list or tuple of ints, got {scales!r}")
    if not 1 <= len(scales) <= 8:
        raise ValueError(f"{op}: between 1 and 8 scales are supported, got {len(scales)}")
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{op}: scales must be ints, got {s!r} in {tuple(scales)}")
        if s < 1:
            raise ValueError(f"{op}: scales must be >= 1, got {s} in {tuple(scales)}")
        if s > height or s > width:
            raise ValueError(
                f"{op}: scale {s} exceeds the feature map of size {height}x{width} "
                f"(each of the {s}x{s} regions would be empty)"
            )
        out.append(int(s))
    return tuple(out)


def check_reduction(op: str, reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduction_code(op: str, reduction: str) -> int:
    """The reduction as the fused ops take it (0 none, 1 mean, 2 sum); checks it like check_reduction."""
    if isinstance(reduction, str):
        code = REDUCTION_CODES.get(reduction)
        if code is not None:
            return code
    check_reduction(op, reduction)
    raise AssertionError("unreachable")  # check_reduction raised


def pod_embedding_length(height: int, width: int, scales: Sequence[int]) -> int:
    """Length L of the Local POD embedding per (n, c): sum_s s*(s*(H//s)) + s*(s*(W//s))."""
    return sum(s * (s * (height // s)) + s * (s * (width // s)) for s in scales)


def sop_geometry(
    op: str,
    channels: int,
    height: int,
    width: int,
    groups: int,
    window: Optional[int],
    stride: int,
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Check the second-order pooling parameters; return (window, stride, padding) pairs.

    ``window=None`` is the global window (H, W) with stride 1 and no padding;
    otherwise padding is ``window // 2`` on both axes.
    """
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    if not 1 <= groups <= channels:
        raise ValueError(f"{op}: groups must be between 1 and the channel count C = {channels}, got {groups}")
    if window is None:
        return (height, width), (1, 1), (0, 0)
    for name, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {name} must be an int, got {v!r}")
        if v < 1:
            raise ValueError(f"{op}: {name} must be >= 1, got {v}")
    pad = window // 2
    if height + 2 * pad < window or width + 2 * pad < window:
        raise ValueError(f"{op}: window {window} does not fit a feature map of size {height}x{width}")
    return (window, window), (stride, stride), (pad, pad)


def reduce(dist: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply "mean" | "sum" | "none" to per-image distances ``[N]``."""
    if reduction == "mean":
        return dist.mean()
    if reduction == "sum":
        return dist.sum()
    return dist
