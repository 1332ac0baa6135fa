"""md_masks: the spatial and channel masks of mask-guided distillation (docs/MATHEMATICS.md §2.3).

The statistics (cosine maps and channel-mean gaps of the teacher's features on
the image, on the image with background/old pixels erased and on the image
with new pixels erased) come from one fused pass: reference
lskd.reference.md_statistics, CPU kernel csrc/cpu/md_stats.cpp, CUDA kernel
csrc/cuda/md_stats.cu, Triton kernel kernels/md_stats.py. The per-image
quantiles are then taken in batch, in PyTorch, without host synchronisation.
For the "cpu" and "cuda" backends the statistics and the quantiles run in one
C++ op, lskd::md_masks, for one Python call instead of about thirty: on the CPU
csrc/md_masks.cpp (the same ATen calls as the Python code below), on CUDA
csrc/cuda/md_masks.cu (radix select instead of sorts, 2 launches, the same
arithmetic); the same masks bit for bit from the same statistics.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import _extension, reference
from .._validation import check_triple
from ._backends import on_triton_load, resolve_backend

__all__ = ["md_masks", "md_statistics", "batched_quantile"]


def _fake_stats(feat, feat_bg_erased, feat_new_erased, eps):
    n, c, h, w = feat.shape
    acc = torch.float64 if feat.dtype == torch.float64 else torch.float32
    return (
        feat.new_empty((n, h, w), dtype=acc),
        feat.new_empty((n, h, w), dtype=acc),
        feat.new_empty((n, c), dtype=acc),
        feat.new_empty((n, c), dtype=acc),
    )


def _fake_masks(feat, feat_bg_erased, feat_new_erased, labels, old_classes, ignore_index, eps, float64_ranks):
    n, c, h, w = feat.shape
    return feat.new_empty((n, 1, h, w), dtype=torch.bool), feat.new_empty((n, c), dtype=torch.bool)


def _register(ns: str) -> None:
    torch.library.register_fake(f"{ns}::md_stats")(_fake_stats)
    if ns == "lskd" and _extension.has_cpp_md_masks():
        torch.library.register_fake(f"{ns}::md_masks")(_fake_masks)


if _extension.has_cpu_kernels():
    _register("lskd")
on_triton_load(lambda: _register("lskd_triton"))
# lskd::md_masks (csrc/md_masks.cpp, csrc/cuda/md_masks.cu): md_stats and the code of
# md_masks below in one op, bitwise the same masks; used by the "cpu" and "cuda" backends.
_ONE_OP = _extension.has_cpp_md_masks()


def _quantile_uses_float64_ranks() -> bool:
    """Whether this torch's ``torch.quantile`` computes float32 ranks in float64.

    Newer torch versions do (pytorch/pytorch#187574, all devices but MPS), older
    ones compute ``q * (L - 1)`` in the input dtype. Probed once: the weight of
    the lerp between 0 and 1 is the rank's fractional part, which differs.
    """
    values = torch.zeros(67)
    values[60:] = 1.0
    q = torch.tensor(0.9037463665008545)  # rank 59.647...: float32 and float64 fractions differ
    r64 = q.double() * 66
    return bool(torch.quantile(values, q) == (r64 - r64.floor()).float())


_FLOAT64_RANKS = _quantile_uses_float64_ranks()


def batched_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row quantile with linear interpolation, like ``torch.quantile``.

    ``values [N, L]``, ``q [N]`` in [0, 1] -> ``[N]``. Rows holding a NaN give
    NaN. Same arithmetic as the installed torch.quantile (rank ``q * (L - 1)``
    in float64 or in the input dtype as that torch does, lerp in the input
    dtype), so the thresholds are bitwise those of the per-image released code.
    """
    ordered = values.sort(dim=1).values
    rank_dtype = torch.float64 if _FLOAT64_RANKS and values.device.type != "mps" else values.dtype
    if q.dtype != values.dtype:
        q = q.to(values.dtype)
    ranks = q.to(rank_dtype) * (values.shape[1] - 1)
    below = ranks.floor()
    lo = below.long().unsqueeze(1)
    hi = ranks.ceil().long().unsqueeze(1)
    weight = (ranks - below).to(values.dtype).unsqueeze(1)
    out = torch.lerp(ordered.gather(1, lo), ordered.gather(1, hi), weight).squeeze(1)
    # torch.sort puts NaN last (CPU and CUDA): a row holds a NaN iff its last sorted value is NaN.
    return out.masked_fill(ordered[:, -1].isnan(), float("nan"))


def md_statistics(
    feat: torch.Tensor,
    feat_bg_erased: torch.Tensor,
    feat_new_erased: torch.Tensor,
    eps: float = 1e-8,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused statistics: ``(cos_bg [N, H, W], cos_new [N, H, W], gap_bg [N, C], gap_new [N, C])``.

    See :func:`lskd.reference.md_statistics` for the definitions.
    """
    op = "md_masks"
    check_triple(op, _FEATURE_NAMES, feat, feat_bg_erased, feat_new_erased)
    return _statistics(op, feat, feat_bg_erased, feat_new_erased, eps, backend)


_FEATURE_NAMES = ("feat", "feat_bg_erased", "feat_new_erased")


def _statistics(op, feat, feat_bg_erased, feat_new_erased, eps, backend):
    """md_statistics after the feature checks."""
    impl = resolve_backend(op, backend, feat.device)
    # The statistics never get gradients (md_stats has no autograd formula).
    a = feat.detach() if feat.requires_grad else feat
    cb = feat_bg_erased.detach() if feat_bg_erased.requires_grad else feat_bg_erased
    dn = feat_new_erased.detach() if feat_new_erased.requires_grad else feat_new_erased
    if impl == "reference":
        return reference.md_statistics(a, cb, dn, eps)
    ops = torch.ops.lskd_triton if impl == "triton" else torch.ops.lskd
    return ops.md_stats(a, cb, dn, float(eps))


def md_masks(
    feat: torch.Tensor,
    feat_bg_erased: torch.Tensor,
    feat_new_erased: torch.Tensor,
    labels: torch.Tensor,
    old_classes: int,
    ignore_index: int = 255,
    eps: float = 1e-8,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spatial and channel masks of LSKD's mask-guided distillation (docs/MATHEMATICS.md §2.3).

    Args:
        feat: teacher features on the input, ``[N, C, H, W]``.
        feat_bg_erased: teacher features on the input with background/old pixels
            (label < old_classes) set to 0 in the normalised image, same shape.
        feat_new_erased: teacher features on the input with new pixels
            (old_classes <= label != ignore_index) erased, same shape.
        labels: ``[N, Hl, Wl]`` integer labels of the current step (any resolution).
        old_classes: O, the number of background + old classes (>= 1).
        ignore_index: the ignore label (255).
        eps: cosine-similarity epsilon.
        backend: backend of the fused statistics ("auto", "reference", "cpu", "cuda", "triton").

    Returns:
        ``(spatial_mask [N, 1, H, W] bool, channel_mask [N, C] bool)`` where
        ``M = [cos_bg >= Q(cos_bg, rho_old)] | [cos_new <= Q(cos_new, rho_new)]``,
        ``Nc = [gap_bg >= Q(gap_bg, rho_old)] | [gap_new <= Q(gap_new, rho_new)]``,
        Q the per-image quantile, ``rho_old`` and ``rho_new`` the fractions of old
        and new label pixels (ignored pixels count in the denominator).
    """
    op = "md_masks"
    first = check_triple(op, _FEATURE_NAMES, feat, feat_bg_erased, feat_new_erased)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 3 or labels.shape[0] != first.shape[0] or labels.numel() == 0:
        raise ValueError(
            f"{op}: labels must have shape [N, Hl, Wl] with N = {first.shape[0]}, got {list(labels.shape)}"
        )
    if labels.device != first.device:
        raise ValueError(f"{op}: labels are on {labels.device} but the features are on {first.device}")
    if isinstance(old_classes, bool) or not isinstance(old_classes, int) or old_classes < 1:
        raise ValueError(f"{op}: old_classes must be an int >= 1 (background counts), got {old_classes!r}")

    impl = resolve_backend(op, backend, feat.device)
    if (impl == "cpu" or impl == "cuda") and _ONE_OP and type(ignore_index) is int:
        a = feat.detach() if feat.requires_grad else feat
        cb = feat_bg_erased.detach() if feat_bg_erased.requires_grad else feat_bg_erased
        dn = feat_new_erased.detach() if feat_new_erased.requires_grad else feat_new_erased
        return torch.ops.lskd.md_masks(a, cb, dn, labels, old_classes, ignore_index, float(eps), _FLOAT64_RANKS)
    cos_bg, cos_new, gap_bg, gap_new = _statistics(op, feat, feat_bg_erased, feat_new_erased, eps, backend)
    n, c, h, w = feat.shape
    total = labels[0].numel()
    is_old = labels < old_classes
    is_new = ~is_old & (labels != ignore_index)
    # q = [rho_old, rho_new] (one count for both; count / total in the default float dtype, as
    # lskd.reference.md_masks computes rho, so that the quantile levels are the same bit for bit).
    q = torch.cat([is_old, is_new]).sum(dim=(1, 2)) / total
    # One sort for both cosine maps and one for both gap vectors (rows: bg then new).
    cos = torch.cat([cos_bg.reshape(n, -1), cos_new.reshape(n, -1)])
    gap = torch.cat([gap_bg, gap_new])
    q_cos, q_gap = batched_quantile(cos, q)[:, None], batched_quantile(gap, q)[:, None]
    spatial = (cos[:n] >= q_cos[:n]) | (cos[n:] <= q_cos[n:])
    channel = (gap[:n] >= q_gap[:n]) | (gap[n:] <= q_gap[n:])
    return spatial.reshape(n, 1, h, w), channel
