"""PLOP (Douillard et al., CVPR 2021): entropy pseudo-labels + Local POD on six maps.

Pseudo-labelling (shared with LSKD, :class:`EntropyPseudoLabeler`):

* once per step, the teacher runs on the step's training data; for every pixel labelled
  background/old (label < O) its argmax class c and normalised entropy
  ``H(p) / log(O)`` (in [0, 1]) go into a per-class histogram (``bins`` bins);
  ``threshold[c] = max(median_c, min_threshold)`` (PLOP: ``min_threshold = 0.001``), the
  median read from the histogram with linear interpolation inside its bin (default,
  ``pseudo_threshold="median"``, what the papers describe), or the released code's value
  (``pseudo_threshold="released"``, :func:`released_histogram_threshold`, 100 bins);
* per batch, a background pixel becomes ``argmax`` of the teacher when its normalised
  entropy is ``< threshold[argmax]`` and 255 (ignored) otherwise; new-class and ignored
  pixels keep their label;
* PLOP's per-image adaptive factor (paper: "the ratio of accepted old-class pixels over
  the total number of background pixels"): ``|{y < O and accepted}| / (|{y < O}| + 1e-6)``;
  it multiplies the whole per-pixel CE of the image, which is then averaged over ALL
  pixels of the batch (ignored ones count as 0), as PLOP does;
* per step, on the device (no host synchronisation per batch), the labeler sums what
  :meth:`EntropyPseudoLabeler.statistics` reports: ``pseudo_accepted`` (accepted / eligible
  background pixels) and ``adaptive_factor`` (mean over images of the factor).

Teacher logits are upsampled bilinearly to the label resolution first (PLOP's model
outputs full-size logits).

Differences from PLOP's code, on purpose: the entropy is the Shannon entropy divided by
log(O) (PLOP's code averages p log p over channels and divides by log(#classes) twice;
this rescales the values, so the median rule is unchanged and only the 0.001 floor means
a different entropy); by default the histogram median is the exact interpolation, on 1000
bins instead of 100 (PLOP's loop adds the bin index instead of its count to the running
sum; ``pseudo_threshold="released"`` reproduces it, on the release's 100 bins).

Local POD (``pod_distill``, square=True, scales (1, 2, 4)) on the six maps; on the
logits map the student's new-class logits are summed into its background channel.
PLOP's factors: 0.01 for maps 0-4, 0.0005 for the logits map, times
``sqrt(|C^{0:t}| / |C^t|)`` (PLOP's "pod schedule") and divided by the number of maps (6),
as in PLOP's ``features_distillation``. Each map is its own named term ``pod{l}``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import ops, reference
from ..models.deeplab import SegOutput
from .base import (
    IGNORE_INDEX,
    Method,
    StepContext,
    class_argmax,
    cross_entropy,
    distilled_maps,
    pod_scales,
    to_acc,
    upsample_logits,
)

__all__ = [
    "normalized_entropy",
    "histogram_median",
    "released_histogram_threshold",
    "PSEUDO_THRESHOLDS",
    "pseudo_label",
    "pseudo_label_counts",
    "EntropyPseudoLabeler",
    "PseudoLabelStatistics",
    "PLOP",
]

#: The threshold rules of :class:`EntropyPseudoLabeler` and their default histogram bins.
PSEUDO_THRESHOLDS: Dict[str, int] = {"median": 1000, "released": 100}


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` logits -> ``[N, H, W]`` Shannon entropy of the softmax / log(C), in [0, 1]
    (0 when C == 1), in float32 (float64 for float64 logits): :func:`lskd.reference.normalized_entropy`."""
    return reference.normalized_entropy(to_acc(logits))


def histogram_median(hist: torch.Tensor) -> torch.Tensor:
    """Median per row of a histogram over [0, 1]: ``hist [C, B]`` counts -> ``[C]``.

    Linear interpolation inside the bin that holds the middle count; rows without counts give 0.
    """
    h = hist.to(torch.float64)
    bins = h.shape[1]
    cum = h.cumsum(dim=1)
    total = cum[:, -1]
    half = total / 2
    idx = torch.searchsorted(cum, half[:, None]).clamp(max=bins - 1)  # first bin with cum >= half
    count = h.gather(1, idx).squeeze(1)
    before = cum.gather(1, idx).squeeze(1) - count
    frac = torch.where(count > 0, (half - before) / count.clamp(min=1), torch.zeros_like(half))
    median = (idx.squeeze(1).to(torch.float64) + frac) / bins
    return torch.where(total > 0, median, torch.zeros_like(median)).to(torch.float32)


def released_histogram_threshold(hist: torch.Tensor) -> torch.Tensor:
    """The released per-class "median" (PLOP's and LSKD's ``find_median``): ``hist [C, B]`` counts
    over [0, 1] -> ``[C]`` float32 (on ``hist``'s device; rows without counts give 0).

    The release walks the bins i = 0, 1, ... with a running sum S (0 at first) and stops at the
    first i where ``S <= half <= S + hist[b_i]`` (half = total / 2, float32), returning
    ``i / B + (half - S) / hist[b_i] / B``. Its bug: after each bin it adds the bin's INDEX to S
    (``(i / B) * B`` in floating point), not the bin's count; and it reads bin
    ``b_i = int((i / B) * B)``, which is i - 1 at i = 29, 57, 58 for B = 100. When no bin
    stops the walk, i and b_i are those of the last bin and S = sum of all the indices
    (4950 for B = 100).

    Effect: S stays tiny next to the counts, so the walk stops only at the first bin holding
    about half of ALL the row's counts (that bin holds the median: the value lies in it; at
    bin 0 it is the interpolated median); when no single bin does, it runs to the end and
    returns ``(B - 1) / B + (half - S) / hist[b_{B-1}] / B``, S = 4950 for B = 100: about 1 or
    more (nearly every pixel of the class accepted), +inf when that bin is empty (every pixel
    accepted), below 0 when half < S (a few pixels: the floor applies); 0/0 gives NaN (no pixel
    accepted). The arithmetic is the release's: float64 running sums, compared and combined
    in float32.

    The rule is applied to this module's entropy (H / log O, spread over [0, 1]). The release
    bins ``H / (O log O) / log |C^{0:t}|`` (at most ``1 / (O log |C^{0:t}|)``, 0.02 for VOC 15-1),
    i.e. its lowest few bins, so there the walk mostly stops at bin 0.
    """
    h = hist.detach().to("cpu", torch.int64)
    bins = h.shape[1]
    border = torch.arange(bins, dtype=torch.float64) / bins  # lower border i / B
    step = border * bins  # added to S after bin i (~ i)
    index = step.long()  # the bin read at i
    sums = step.cumsum(0)
    before = torch.cat([sums.new_zeros(1), sums[:-1]]).float()  # S when bin i is reached
    half = h.sum(1).float() / 2
    count = h[:, index].float()  # [C, B]
    hit = (half[:, None] >= before) & (half[:, None] <= before + count)
    found = hit.any(1)
    stop = torch.where(found, hit.int().argmax(1), torch.full_like(found, bins - 1, dtype=torch.long))
    run = torch.where(found, before[stop], sums[-1].float())
    at = count.gather(1, stop[:, None]).squeeze(1)
    value = border.float()[stop] + (half - run) / at * torch.tensor(1 / bins, dtype=torch.float32)
    return torch.where(h.sum(1) > 0, value, torch.zeros_like(value)).to(hist.device)


def pseudo_label(
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    thresholds: torch.Tensor,
    old_classes: int,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PLOP's entropy pseudo-labels and per-image adaptive factor.

    Args:
        labels: ``[N, H, W]`` int64 labels of the step (values < O = background/old).
        teacher_logits: ``[N, O, h, w]`` (upsampled bilinearly to ``[H, W]`` if needed).
        thresholds: ``[O]`` per-class normalised-entropy thresholds.
        old_classes: O.
        backend: of the fused :func:`lskd.ops.pseudo_labels` ("reference": eager PyTorch).

    Returns:
        ``(targets [N, H, W] int64, factor [N] float32)``: background pixels -> the teacher's
        argmax where ``entropy < thresholds[argmax]``, else ``ignore_index``; other pixels
        unchanged. ``factor = #accepted background pixels / (#background pixels + 1e-6)``.
    """
    targets, num, den = pseudo_label_counts(labels, teacher_logits, thresholds, old_classes, ignore_index, backend)
    return targets, adaptive_factor(num, den)


def adaptive_factor(accepted: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """PLOP's per-image factor ``accepted / (eligible + 1e-6)`` of the pixel counts ``[N]`` (float32)."""
    return accepted.float() / (eligible.float() + 1e-6)


def pseudo_label_counts(
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    thresholds: torch.Tensor,
    old_classes: int,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pseudo_label`'s targets and counts: ``(targets [N, H, W], accepted [N], eligible [N])``,
    the counts int64: per image, the background pixels (label < O, eligible for pseudo-labels)
    whose pseudo-label was accepted, and all of them. The fused :func:`lskd.ops.pseudo_labels`
    (upsampling, entropy, argmax and threshold per pixel) on ``backend``."""
    if teacher_logits.shape[1] != old_classes or thresholds.numel() != old_classes:
        raise ValueError(
            f"pseudo_label: teacher has {teacher_logits.shape[1]} channels and {thresholds.numel()} thresholds, "
            f"expected O = {old_classes}"
        )
    return tuple(ops.pseudo_labels(teacher_logits, labels, thresholds, ignore_index, backend=backend))


class EntropyPseudoLabeler:
    """Per-step entropy thresholds (``prepare``) and pseudo-labels (``__call__``); see the module doc.

    Args:
        bins: histogram bins (default: :data:`PSEUDO_THRESHOLDS` of the rule, 1000 or the release's 100).
        min_threshold: floor of the thresholds (PLOP's 0.001).
        pseudo_threshold: ``"median"`` (exact per-class median, default) or ``"released"``
            (:func:`released_histogram_threshold`, the released code's value).
        backend: of the per-batch pseudo-labels (:func:`lskd.ops.pseudo_labels`).

    Every call also adds to per-step sums kept on the labels' device (:meth:`statistics`,
    cleared by :meth:`reset_statistics`).
    """

    def __init__(
        self,
        bins: Optional[int] = None,
        min_threshold: float = 0.001,
        ignore_index: int = IGNORE_INDEX,
        pseudo_threshold: str = "median",
        backend: str = "auto",
    ) -> None:
        if pseudo_threshold not in PSEUDO_THRESHOLDS:
            raise ValueError(f"pseudo_threshold must be one of {tuple(PSEUDO_THRESHOLDS)}, got {pseudo_threshold!r}")
        self.pseudo_threshold = pseudo_threshold
        self.bins = int(bins) if bins is not None else PSEUDO_THRESHOLDS[pseudo_threshold]
        self.min_threshold = min_threshold
        self.ignore_index = ignore_index
        self.backend = backend
        self.thresholds: Optional[torch.Tensor] = None  # [O]
        self.histogram: Optional[torch.Tensor] = None  # [O, bins] int64 (for inspection)
        self.reset_statistics()

    def threshold_rule(self, hist: torch.Tensor) -> torch.Tensor:
        """``hist [O, bins]`` -> ``[O]`` thresholds before the floor, by ``pseudo_threshold``."""
        if self.pseudo_threshold == "released":
            return released_histogram_threshold(hist)
        return histogram_median(hist)

    @torch.no_grad()
    def prepare(
        self,
        teacher: nn.Module,
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        old_classes: int,
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """One teacher pass over ``batches`` of ``(images [N, 3, H, W], labels [N, H, W])``;
        under torch.distributed the histograms of all ranks are summed. Returns ``[O]``."""
        if device is None:
            device = next(teacher.parameters()).device
        hist = torch.zeros(old_classes * self.bins, dtype=torch.int64, device=device)
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = upsample_logits(teacher(images).logits, labels.shape[-2:])
            bg = labels < old_classes
            ent = normalized_entropy(logits)[bg]
            cls = class_argmax(logits)[bg]
            b = (ent * self.bins).long().clamp(0, self.bins - 1)
            hist += torch.bincount(cls * self.bins + b, minlength=old_classes * self.bins)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(hist)
        self.histogram = hist.view(old_classes, self.bins)
        self.thresholds = self.threshold_rule(self.histogram).clamp(min=self.min_threshold)
        return self.thresholds

    def __call__(
        self, labels: torch.Tensor, teacher_logits: torch.Tensor, old_classes: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(targets [N, H, W] int64, factor [N] float32)`` (:func:`pseudo_label`); adds the batch
        to the per-step statistics."""
        if self.thresholds is None:
            raise RuntimeError("pseudo-labels need prepare_step(teacher, batches, ctx) first (entropy thresholds)")
        targets, num, den = pseudo_label_counts(
            labels, teacher_logits, self.thresholds, old_classes, self.ignore_index, self.backend
        )
        factor = adaptive_factor(num, den)
        self._record(num, den, factor)
        return targets, factor

    # -- per-step statistics (device sums; read once in statistics()) ------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Labelling inside this context is not counted in the statistics."""
        saved = (self._sums, self._images)
        try:
            yield
        finally:
            self._sums, self._images = saved

    def reset_statistics(self) -> None:
        """Clear the sums (the trainer: at the start of each epoch)."""
        self._sums: Optional[torch.Tensor] = None  # [3] float64: accepted, eligible, sum of factors
        self._images = 0

    def _record(self, num: torch.Tensor, den: torch.Tensor, factor: torch.Tensor) -> None:
        """Add ``num [N]``, ``den [N]`` (accepted / eligible pixels per image) and ``factor [N]``."""
        part = torch.stack([num.sum().double(), den.sum().double(), factor.detach().double().sum()])
        self._sums = part if self._sums is None else self._sums + part
        self._images += factor.numel()

    def statistics(self) -> Dict[str, float]:
        """``{"pseudo_accepted": accepted / eligible background pixels, "adaptive_factor": mean over
        images of the factor}`` since :meth:`reset_statistics` (this process's batches; ``{}``
        when none). One device-to-host copy."""
        if self._sums is None or self._images == 0:
            return {}
        accepted, eligible, factors = self._sums.tolist()
        return {
            "pseudo_accepted": accepted / eligible if eligible > 0 else 0.0,
            "adaptive_factor": factors / self._images,
        }


class PseudoLabelStatistics:
    """Mixin for methods holding an :class:`EntropyPseudoLabeler` as ``self.labeler``: the
    :class:`Method` statistics hooks report the labeler's per-step statistics."""

    labeler: EntropyPseudoLabeler

    def reset_statistics(self) -> None:
        """Called by the trainer at the start of each epoch: clears the labeler's sums."""
        self.labeler.reset_statistics()

    def step_statistics(self) -> Dict[str, float]:
        """Read by the trainer at the end of each epoch: ``pseudo_accepted``, ``adaptive_factor``."""
        return self.labeler.statistics()

    def statistics_paused(self) -> contextlib.AbstractContextManager:
        """The labeler's :meth:`EntropyPseudoLabeler.paused`."""
        return self.labeler.paused()


def pseudo_labelled_ce(
    labeler: EntropyPseudoLabeler,
    labels: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    old_classes: int,
) -> torch.Tensor:
    """PLOP's classification term: CE on pseudo-labelled targets times the per-image adaptive
    factor, averaged over all pixels."""
    targets, factor = labeler(labels, teacher_logits, old_classes)
    return cross_entropy(
        student_logits, targets, labeler.ignore_index, pixel_weight=factor[:, None, None], mean_over="all"
    )


class PLOP(PseudoLabelStatistics, Method):
    """PLOP: ``{"ce", "pod0", ..., "pod5"}`` at steps t > 0 (``{"ce"}`` at step 0).

    Args:
        pod_factors: base factor per map (0.01 x 5, 0.0005 for the logits map).
        pod_schedule: multiply the POD terms by ``sqrt(|C^{0:t}| / |C^t|)`` (PLOP default).
        average_over_maps: divide the POD terms by the number of maps (PLOP's code does).
        scales: Local POD scales (those larger than a map are dropped for that map).
        bins, min_threshold, pseudo_threshold: pseudo-labelling histogram bins (None: the rule's
            default), entropy floor and threshold rule (:class:`EntropyPseudoLabeler`).

    Per-step statistics (:meth:`step_statistics`): ``pseudo_accepted``, ``adaptive_factor``.
    """

    name = "plop"
    needs_teacher = True
    teacher_passes = 1
    needs_prepare_step = True

    def __init__(
        self,
        pod_factors: Sequence[float] = (0.01, 0.01, 0.01, 0.01, 0.01, 0.0005),
        pod_schedule: bool = True,
        average_over_maps: bool = True,
        scales: Sequence[int] = (1, 2, 4),
        bins: Optional[int] = None,
        min_threshold: float = 0.001,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        pseudo_threshold: str = "median",
    ) -> None:
        self.pod_factors = tuple(float(f) for f in pod_factors)
        self.pod_schedule = pod_schedule
        self.average_over_maps = average_over_maps
        self.scales = tuple(scales)
        self.labeler = EntropyPseudoLabeler(bins, min_threshold, ignore_index, pseudo_threshold, backend)
        self.ignore_index = ignore_index
        self.backend = backend

    @property
    def thresholds(self) -> Optional[torch.Tensor]:
        return self.labeler.thresholds

    def term_names(self, ctx: StepContext) -> List[str]:
        if not ctx.incremental:
            return ["ce"]
        return ["ce"] + [f"pod{i}" for i in range(len(self.pod_factors))]

    def prepare_step(
        self,
        teacher: Optional[nn.Module],
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        ctx: StepContext,
    ) -> None:
        if teacher is not None and ctx.incremental:
            self.labeler.prepare(teacher, batches, ctx.old_classes)

    def incremental_terms(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        student_out: SegOutput,
        teacher_out: SegOutput,
        ctx: StepContext,
    ) -> Dict[str, torch.Tensor]:
        o = ctx.old_classes
        out = {"ce": pseudo_labelled_ce(self.labeler, labels, student_out.logits, teacher_out.logits, o)}
        scale = math.sqrt(ctx.total_classes / max(ctx.new_classes, 1)) if self.pod_schedule else 1.0
        if self.average_over_maps:
            scale /= len(self.pod_factors)
        terms = []
        for i in range(len(self.pod_factors)):
            s_map, t_map = distilled_maps(student_out, teacher_out, i, o)
            terms.append(ops.PodTerm(s_map, t_map, scales=pod_scales(s_map, self.scales)))
        # All maps in one fused call (one op, one autograd node).
        for i, (factor, d) in enumerate(zip(self.pod_factors, ops.distill_terms(terms, backend=self.backend))):
            out[f"pod{i}"] = factor * scale * d
        return out
