"""md_masks: the spatial and channel masks of mask-guided distillation (docs/MATHEMATICS.md §2.3).

The statistics (cosine maps and channel-mean gaps of the teacher's features on
the image, on the image with background/old pixels erased and on the image
with new pixels erased) come from one fused pass: reference
lskd.reference.md_statistics, CPU kernel csrc/cpu/md_stats.cpp, CUDA kernel
csrc/cuda/md_stats.cu, Triton kernel kernels/md_stats.py (schema:
csrc/md_stats.cpp). The per-image quantiles are then taken in batch, in
PyTorch, without host synchronisation: :func:`md_masks_from_statistics`, the
one rule of the masks, which the reference and Triton backends run. The "cpu"
and "cuda" backends run the statistics and the rule in one op, lskd::md_masks
(csrc/md_masks.cpp; kernels csrc/cpu/md_masks.cpp, selection per image, and
csrc/cuda/md_masks.cu, radix select in 2 launches), which gives the rule's
masks bit for bit from the same statistics. The CPU kernel is there for speed:
at the demo's step shapes (16 images, 8x8 maps) the rule's ATen calls cost
about 0.45 ms a map on one thread, more than the statistics.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _extension, reference
from .._dtypes import acc_dtype
from .._validation import check_triple
from ._backends import on_triton_load, resolve_backend

__all__ = ["md_masks", "md_statistics", "md_masks_from_statistics", "batched_quantile"]


def _fake_stats(feat, feat_bg_erased, feat_new_erased, eps):
    n, c, h, w = feat.shape
    acc = acc_dtype(feat.dtype)
    return (
        feat.new_empty((n, h, w), dtype=acc),
        feat.new_empty((n, h, w), dtype=acc),
        feat.new_empty((n, c), dtype=acc),
        feat.new_empty((n, c), dtype=acc),
    )


def _fake_masks(feat, feat_bg_erased, feat_new_erased, labels, old_classes, ignore_index, eps):
    n, c, h, w = feat.shape
    return feat.new_empty((n, 1, h, w), dtype=torch.bool), feat.new_empty((n, c), dtype=torch.bool)


if _extension.has_cpu_kernels():
    torch.library.register_fake("lskd::md_stats")(_fake_stats)
    torch.library.register_fake("lskd::md_masks")(_fake_masks)
on_triton_load(lambda: torch.library.register_fake("lskd_triton::md_stats")(_fake_stats))


def _quantile_uses_float64_ranks() -> bool:
    """Whether this torch's ``torch.quantile`` computes float32 ranks in float64.

    Newer torch versions do (pytorch/pytorch#187574, all devices but MPS), older
    ones compute ``q * (L - 1)`` in the input dtype. Probed once: the weight of
    the lerp between 0 and 1 is the rank's fractional part, which differs. (The
    CUDA kernel of lskd::md_masks probes it the same way.)
    """
    values = torch.zeros(67)
    values[60:] = 1.0
    q = torch.tensor(0.9037463665008545)  # rank 59.647...: float32 and float64 fractions differ
    r64 = q.double() * 66
    return bool(torch.quantile(values, q) == (r64 - r64.floor()).float())


_FLOAT64_RANKS = _quantile_uses_float64_ranks()


def batched_quantile(values: torch.Tensor, q: torch.Tensor, *, float64_ranks: Optional[bool] = None) -> torch.Tensor:
    """Per-row quantile with linear interpolation, like ``torch.quantile``.

    ``values [N, L]``, ``q [N]`` in [0, 1] -> ``[N]``. Rows holding a NaN give
    NaN. Same arithmetic as the installed torch.quantile (rank ``q * (L - 1)``
    in float64 or in the input dtype as that torch does, lerp in the input
    dtype), so the thresholds are bitwise those of the per-image released code.
    ``float64_ranks`` overrides how the ranks of float32 values are computed
    (None: as this torch does), to test a kernel under the other rule.
    """
    if float64_ranks is None:
        float64_ranks = _FLOAT64_RANKS and values.device.type != "mps"
    ordered = values.sort(dim=1).values
    rank_dtype = torch.float64 if float64_ranks else values.dtype
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
    return _statistics(resolve_backend(op, backend, feat.device), feat, feat_bg_erased, feat_new_erased, eps)


_FEATURE_NAMES = ("feat", "feat_bg_erased", "feat_new_erased")


def _detached(*features: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The features without autograd history: the statistics and masks never get gradients
    (md_stats and md_masks have no autograd formula)."""
    return tuple(f.detach() if f.requires_grad else f for f in features)


def _statistics(impl, feat, feat_bg_erased, feat_new_erased, eps):
    """md_statistics after the feature checks, on the resolved backend ``impl``."""
    a, cb, dn = _detached(feat, feat_bg_erased, feat_new_erased)
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
    if impl in ("cpu", "cuda") and type(ignore_index) is int:
        a, cb, dn = _detached(feat, feat_bg_erased, feat_new_erased)
        return torch.ops.lskd.md_masks(a, cb, dn, labels, old_classes, ignore_index, float(eps))
    stats = _statistics(impl, feat, feat_bg_erased, feat_new_erased, eps)
    return md_masks_from_statistics(stats, labels, old_classes, ignore_index)


def md_masks_from_statistics(
    stats: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    old_classes: int,
    ignore_index: int = 255,
    *,
    float64_ranks: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The masks of :func:`md_masks` from the statistics ``(cos_bg, cos_new, gap_bg, gap_new)``.

    The rule of the masks, in one place: every backend runs it, and the CUDA kernel of
    lskd::md_masks is tested bit for bit against it (``float64_ranks`` as in
    :func:`batched_quantile`).
    """
    cos_bg, cos_new, gap_bg, gap_new = stats
    n, h, w = cos_bg.shape
    total = labels[0].numel()
    is_old = labels < old_classes
    is_new = ~is_old & (labels != ignore_index)
    # q = [rho_old, rho_new] (one count for both; count / total in the default float dtype, as
    # lskd.reference.md_masks computes rho, so that the quantile levels are the same bit for bit).
    q = torch.cat([is_old, is_new]).sum(dim=(1, 2)) / total
    # One sort for both cosine maps and one for both gap vectors (rows: bg then new).
    cos = torch.cat([cos_bg.reshape(n, -1), cos_new.reshape(n, -1)])
    gap = torch.cat([gap_bg, gap_new])
    q_cos = batched_quantile(cos, q, float64_ranks=float64_ranks)[:, None]
    q_gap = batched_quantile(gap, q, float64_ranks=float64_ranks)[:, None]
    spatial = (cos[:n] >= q_cos[:n]) | (cos[n:] <= q_cos[n:])
    channel = (gap[:n] >= q_gap[:n]) | (gap[n:] <= q_gap[n:])
    return spatial.reshape(n, 1, h, w), channel
