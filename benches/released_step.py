"""The methods of benches/test_bench_step.py that are not the package's: LSKD's floor, LSKD as
released and PLOP in eager PyTorch. Each is a :class:`lskd.methods.Method`, so that the bench
runs them through the trainer's own iteration (:func:`lskd.train.iteration.train_iteration`,
weighting and optimiser included) exactly like the package's methods; only what the release
computes differently is overridden, from :mod:`lskd.reference` pieces.

* :class:`LSKDFloor` ((c), LSKD's floor): the student's CE plus ONE teacher pass over the 3N batch
  (input, background/old erased, new erased) that the MD masks need; no distillation term.
* :class:`ReleasedLSKD` ((f), LSKD as released, ``train.py`` of the release): four N teacher
  passes (the input twice: once for the pseudo-labels, once with the erased pair), the MD masks
  one image at a time with ``torch.quantile`` (:func:`lskd.reference.md_masks`: its quantiles'
  argument checks synchronise with the host on a GPU), every POD / MD / MCD term as eager
  PyTorch (:func:`lskd.reference.pod_distances` / :func:`~lskd.reference.sop_distances`, one
  autograd graph per term), CE and UNKD on logits upsampled by F.interpolate. With
  :class:`lskd.weighting.RGE` the trainer then takes one ``torch.autograd.grad`` per term through
  those eager graphs (the release's rule), and the pseudo-labels in eager PyTorch (upsampled
  teacher logits, their entropy and argmax: :func:`lskd.reference.pseudo_labels`).
* :class:`EagerPLOP`: PLOP with the six Local POD terms and the pseudo-labels in eager PyTorch
  (the reference POD and pseudo-labels), the rest (CE, factors) the package's.

Shapes: images ``[N, 3, H, W]``, labels ``[N, H, W]`` int64 (old classes -> 0, 255 ignored);
the terms are scalars (float32 accumulation, bf16 inputs under autocast stay bf16 in the eager
terms, as the release runs them).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lskd import reference
from lskd.methods import LSKD, PLOP, Method, StepContext, erase_images, teacher_triplet
from lskd.methods.base import distilled_maps, pod_scales, to_acc, upsample_logits
from lskd.methods.mib import unbiased_kd
from lskd.methods.plop import EntropyPseudoLabeler, pseudo_labelled_ce
from lskd.models.deeplab import SegOutput
from lskd.ops import PodTerm, SopTerm, Term
from lskd.terms import LOGITS_MAP

__all__ = ["LSKDFloor", "ReleasedLSKD", "EagerPLOP", "eager_term"]


def eager_term(term: Term) -> torch.Tensor:
    """One PodTerm / SopTerm as the release computes it: the reference distance ``[N]`` averaged
    over the batch (the reduction of :func:`lskd.pod_distill`), a scalar with its own eager graph."""
    if isinstance(term, PodTerm):
        d = reference.pod_distances(
            term.student, term.teacher, term.spatial_mask, term.channel_mask, term.scales, term.square
        )
    elif isinstance(term, SopTerm):
        d = reference.sop_distances(
            term.student, term.teacher, term.spatial_mask, term.channel_mask, term.groups, term.window, term.stride
        )
    else:  # pragma: no cover - the methods only build these two
        raise TypeError(f"eager_term: unknown term {type(term).__name__}")
    return d.mean()


class LSKDFloor(Method):
    """LSKD's floor: ``{"ce"}`` (CE on the step's labels over all pixels, the base class's) after one
    no-grad teacher pass over ``cat([A, Cb, Dn])`` (3N images, erased by the labels as given: the
    pseudo-labels' extra cost is left out, a floor must not include it)."""

    name = "lskd-floor"
    needs_teacher = True
    teacher_passes = 3

    @torch.no_grad()
    def teacher_forward(
        self, teacher, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext
    ) -> Tuple[Optional[SegOutput], StepContext]:
        if teacher is None or not ctx.incremental:
            return None, ctx
        a, cb, dn = teacher_triplet(teacher, images, labels, ctx.old_classes, fused=True)
        return a, ctx.replace(teacher_erased=(cb, dn))


class EagerPseudoLabels:
    """Mixin: the labeler's per-batch pseudo-labels on the reference backend (eager PyTorch)."""

    labeler: EntropyPseudoLabeler

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.labeler.backend = "reference"


class ReleasedLSKD(EagerPseudoLabels, LSKD):
    """LSKD with the release's costs (module doc); the same nine terms, names and factors as
    :class:`lskd.methods.LSKD` (its ``incremental_terms`` builds them, these overrides evaluate them)."""

    name = "lskd-released"

    @torch.no_grad()
    def teacher_forward(
        self, teacher, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext
    ) -> Tuple[Optional[SegOutput], StepContext]:
        """Four N passes as released (``train.py`` 253, 334-338): A for the pseudo-labels, then A,
        Cb and Dn one by one."""
        if teacher is None or not ctx.incremental:
            return None, ctx
        bctx = ctx.replace(teacher_erased=None, cache={})
        pseudo, _ = self.pseudo_labels(labels, teacher(images).logits, bctx)
        bg_erased, new_erased = erase_images(images, pseudo, ctx.old_classes, self.ignore_index)
        a = teacher(images)
        return a, bctx.replace(teacher_erased=(teacher(bg_erased), teacher(new_erased)))

    @torch.no_grad()
    def masks(
        self,
        map_index: int,
        teacher_out: SegOutput,
        teacher_erased: Tuple[SegOutput, SegOutput],
        labels: torch.Tensor,
        old_classes: int,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:func:`lskd.reference.md_masks`: a Python loop over the images, four ``torch.quantile``
        each; ``(spatial [N, 1, h, w] bool, channel [N, C] bool or None on the logits map)``."""
        cb, dn = teacher_erased
        spatial, channel = reference.md_masks(
            teacher_out.maps[map_index],
            cb.maps[map_index],
            dn.maps[map_index],
            labels,
            old_classes,
            ignore_index=self.ignore_index,
        )
        if map_index == LOGITS_MAP and not self.logits_channel_mask:
            channel = None
        return spatial, channel

    def compute_terms(self, specs: Sequence[Tuple[str, float, Term]]) -> Dict[str, torch.Tensor]:
        """``{name: factor * eager distance}``: one eager graph per term (no fused op)."""
        return {name: factor * eager_term(term) for name, factor, term in specs}

    def classification_terms(
        self, labels: torch.Tensor, student_out: SegOutput, teacher_out: SegOutput, ctx: StepContext
    ) -> Dict[str, torch.Tensor]:
        """CE (pseudo-labels, adaptive factor) and UNKD as released: on both logits upsampled to the
        labels by F.interpolate, in eager PyTorch (no :func:`lskd.ce_unkd`)."""
        size = labels.shape[-2:]
        targets, factor = self.pseudo_labels(labels, teacher_out.logits, ctx)
        s_logits = upsample_logits(student_out.logits, size)
        t_logits = upsample_logits(teacher_out.logits, size)
        ce = F.cross_entropy(to_acc(s_logits), targets, ignore_index=self.labeler.ignore_index, reduction="none")
        return {"ce": (ce * factor[:, None, None]).mean(), "unkd": self.unkd_factor * unbiased_kd(s_logits, t_logits)}


class EagerPLOP(EagerPseudoLabels, PLOP):
    """PLOP with its POD terms (:func:`lskd.reference.pod_distances`, one graph per map) and its
    pseudo-labels in eager PyTorch; the CE, the schedule and the factors are :class:`lskd.methods.PLOP`'s."""

    name = "plop-eager"

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
        scale = (ctx.total_classes / max(ctx.new_classes, 1)) ** 0.5 if self.pod_schedule else 1.0
        if self.average_over_maps:
            scale /= len(self.pod_factors)
        for i, factor in enumerate(self.pod_factors):
            s_map, t_map = distilled_maps(student_out, teacher_out, i, o)
            out[f"pod{i}"] = factor * scale * eager_term(PodTerm(s_map, t_map, scales=pod_scales(s_map, self.scales)))
        return out
