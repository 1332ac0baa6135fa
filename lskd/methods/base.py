"""Common interface of the class-incremental segmentation methods.

A method turns one batch into NAMED, UNWEIGHTED loss terms (each already multiplied by
its base factor, docs/MATHEMATICS.md §3.1); the trainer forms ``total = sum_i w_i * term_i`` (w_i = 1, or
learnt by RGE / the search). Per step the trainer:

1. builds a :class:`StepContext` (step index, O, number of new classes);
2. calls ``method.prepare_step(teacher, batches, ctx)`` once when
   ``method.needs_prepare_step`` (e.g. PLOP's entropy thresholds; ``batches`` yields
   ``(images, labels)`` of the step's training data);
3. per batch: ``teacher_out, bctx = method.teacher_forward(teacher, images, labels, ctx)``
   (no grad; LSKD runs its three teacher inputs as one 3N batch and returns a copy of
   ``ctx`` carrying the erased-image outputs), ``student_out = student(images)``, then
   ``method.terms(images, labels, student_out, teacher_out, bctx)``.

Shapes: images ``[N, 3, H, W]`` (normalised), labels ``[N, H, W]`` int64 of the current
step (old classes -> 0, 255 ignore), ``SegOutput.logits [N, K, h, w]`` at feature
resolution; classification terms upsample the logits bilinearly
(``align_corners=False``) to the label resolution, as MiB/PLOP do on full-size outputs.
At step 0 (or without a teacher) every method returns ``{"ce": CE}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.deeplab import SegOutput

__all__ = [
    "IGNORE_INDEX",
    "StepContext",
    "Method",
    "to_acc",
    "upsample_logits",
    "class_argmax",
    "cross_entropy",
    "collapse_new_into_background",
    "teacher_like",
    "distilled_maps",
    "pod_scales",
]

IGNORE_INDEX = 255


@dataclass
class StepContext:
    """What a method needs to know about the current step (and, per batch, extra teacher outputs).

    step: index t of the step (0 = base step).
    old_classes: O = |C^{0:t-1}|, background and old classes (0 at step 0).
    new_classes: |C^t|, the number of classes learnt at this step.
    teacher_erased: LSKD only, per batch: teacher outputs on the image with background/old
        pixels erased and on the image with new pixels erased (set by ``teacher_forward``).
    run_teacher: optional callable ``images -> SegOutput`` (no grad) that methods may use
        to run the teacher themselves when ``teacher_erased`` is missing.
    cache: per batch, a dict where a method may keep what depends on the teacher only (LSKD's
        MD masks), so that evaluating the terms again on the same batch (the search's extra
        forward passes) does not recompute it.
    """

    step: int
    old_classes: int
    new_classes: int
    teacher_erased: Optional[Tuple[SegOutput, SegOutput]] = None
    run_teacher: Optional[Callable[[torch.Tensor], SegOutput]] = None
    cache: Optional[dict] = None

    @property
    def total_classes(self) -> int:
        """|C^{0:t}| = O + |C^t|."""
        return self.old_classes + self.new_classes

    @property
    def incremental(self) -> bool:
        """True for steps t > 0 (there is a teacher with O >= 1 classes)."""
        return self.step > 0 and self.old_classes > 0

    def replace(self, **changes) -> "StepContext":
        return dataclasses.replace(self, **changes)


def to_acc(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses accumulate in float32); other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def upsample_logits(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of ``[N, K, h, w]`` to ``[N, K, *size]`` (no-op if equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def class_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, H, W]`` int64: the first class of largest logit at each pixel, as
    ``argmax(dim=1)`` (NaN counts as the largest). ``max(dim=1)`` gives the same indices; torch's CPU
    argmax over a short channel dim is about 8x slower (7.6 against 0.9 ms on [16, 4, 64, 64]
    float32, one thread), which was 6 % of an LSKD step on the CPU."""
    return logits.max(dim=1).indices


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    pixel_weight: Optional[torch.Tensor] = None,
    mean_over: str = "valid",
    backend: str = "auto",
) -> torch.Tensor:
    """Pixel cross-entropy of ``logits [N, K, h, w]`` upsampled (bilinear) to ``targets [N, H, W]``.

    pixel_weight: optional ``[N, 1, 1]`` / ``[N, H, W]`` factor per pixel (PLOP's per-image factor).
    mean_over: ``"valid"`` averages over non-ignored pixels (``nn.CrossEntropyLoss`` with
        ignore_index; 0 when none is valid, never NaN); ``"all"`` averages over every pixel,
        ignored ones counting as 0 (PLOP's ``reduction='none'`` then ``.mean()``).
    Without a per-pixel weight the fused :func:`lskd.ops.ce_unkd` computes it (``backend``), never
    writing the upsampled logits; a per-pixel weight takes the eager path.
    """
    n = logits.shape[0]
    if pixel_weight is None or pixel_weight.numel() == n:
        weight = None if pixel_weight is None else pixel_weight.reshape(n)
        total = ops.ce_unkd(logits, None, targets, weight, ignore_index=ignore_index, backend=backend).ce.sum()
    else:
        logits = upsample_logits(logits, targets.shape[-2:])
        loss = F.cross_entropy(to_acc(logits), targets, ignore_index=ignore_index, reduction="none")
        total = (loss * pixel_weight).sum()
    if mean_over == "all":
        return total / targets.numel()
    return total / (targets != ignore_index).sum().clamp(min=1)


def collapse_new_into_background(logits: torch.Tensor, old_classes: int) -> torch.Tensor:
    """``[N, K, h, w] -> [N, O, h, w]``: channel 0 = background + sum of the new-class logits
    (channels >= O), channels 1..O-1 unchanged (docs/MATHEMATICS.md §1.2: the student's logits map distilled
    against the teacher's O channels, PLOP's ``extra_channels="sum"``). The result keeps the
    dtype of ``logits`` (under CUDA autocast the sum runs in float32)."""
    k = logits.shape[1]
    if k < old_classes:
        raise ValueError(f"logits have {k} channels, fewer than the {old_classes} old classes")
    if k == old_classes:
        return logits
    bg = logits[:, :1] + logits[:, old_classes:].sum(dim=1, keepdim=True)
    return torch.cat([bg.to(logits.dtype), logits[:, 1:old_classes]], dim=1)


def teacher_like(teacher_map: torch.Tensor, student_map: torch.Tensor) -> torch.Tensor:
    """The teacher's map in the student map's dtype (the distillation ops take one dtype; under
    autocast the two can differ)."""
    return teacher_map if teacher_map.dtype == student_map.dtype else teacher_map.to(student_map.dtype)


def distilled_maps(student_out, teacher_out, index: int, old_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (student, teacher) pair of map ``index`` as the distillation terms take it: the logits
    map (the last one) collapsed to the O old channels, the teacher in the student's dtype."""
    s_map, t_map = student_out.maps[index], teacher_out.maps[index]
    if index == len(student_out.maps) - 1:
        s_map = collapse_new_into_background(s_map, old_classes)
    return s_map, teacher_like(t_map, s_map)


def pod_scales(feature: torch.Tensor, scales: Tuple[int, ...] = (1, 2, 4)) -> Tuple[int, ...]:
    """The Local POD scales that fit the map (``s <= min(h, w)``): (1, 2, 4) on real crops,
    fewer on the tiny maps of small test images (a choice: the op rejects empty regions)."""
    h, w = feature.shape[-2:]
    fit = tuple(s for s in scales if s <= min(h, w))
    return fit or (1,)


class Method:
    """Base class. Subclasses set ``name``, ``needs_teacher``, ``teacher_passes`` and implement
    :meth:`terms`."""

    name: str = "method"
    needs_teacher: bool = False
    teacher_passes: int = 0
    needs_prepare_step: bool = False

    def term_names(self, ctx: StepContext) -> List[str]:
        """Names of the terms :meth:`terms` returns at this step, in order."""
        return ["ce"]

    def prepare_step(
        self,
        teacher: Optional[nn.Module],
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        ctx: StepContext,
    ) -> None:
        """Once per step, before training (default: nothing; ``batches`` is not consumed)."""

    def reset_statistics(self) -> None:
        """Called by the trainer at the start of each epoch: clear the statistics (default: none
        to clear)."""

    def step_statistics(self) -> Dict[str, float]:
        """Read by the trainer at the end of each epoch: ``{name: value}`` of the statistics
        gathered since :meth:`reset_statistics` on this process (default: none, ``{}``). The
        trainer averages them over the ranks, records them per epoch in history.json and their
        mean over the step's epochs in summary.json."""
        return {}

    def statistics_paused(self) -> contextlib.AbstractContextManager:
        """A context in which the method's terms leave its statistics as they are (the search's
        evaluations on held-out batches are not training batches)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def teacher_forward(
        self,
        teacher: Optional[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        ctx: StepContext,
    ) -> Tuple[Optional[SegOutput], StepContext]:
        """Run the frozen teacher on the batch (``None`` when not needed); return
        ``(teacher_out, ctx_for_this_batch)``."""
        if teacher is None or not self.needs_teacher or not ctx.incremental:
            return None, ctx
        return teacher(images), ctx

    ignore_index: int = IGNORE_INDEX

    def terms(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        student_out: SegOutput,
        teacher_out: Optional[SegOutput],
        ctx: StepContext,
    ) -> Dict[str, torch.Tensor]:
        """Named, unweighted loss terms of one batch. Step 0 (or no teacher) is plain
        cross-entropy, averaged over all pixels with ignored ones counting 0 as in the release
        (``reduction='none'`` then ``.mean()``); later steps call :meth:`incremental_terms` with
        the teacher's outputs."""
        if not ctx.incremental:
            return {"ce": cross_entropy(student_out.logits, labels, self.ignore_index, mean_over="all")}
        if self.needs_teacher:
            self._check_teacher(teacher_out, ctx)
        return self.incremental_terms(images, labels, student_out, teacher_out, ctx)

    def incremental_terms(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        student_out: SegOutput,
        teacher_out: SegOutput,
        ctx: StepContext,
    ) -> Dict[str, torch.Tensor]:
        """The terms of a step t > 0 (default: cross-entropy only, as fine-tuning; over all pixels)."""
        return {"ce": cross_entropy(student_out.logits, labels, self.ignore_index, mean_over="all")}

    def _check_teacher(self, teacher_out: Optional[SegOutput], ctx: StepContext) -> None:
        if teacher_out is None:
            raise ValueError(f"{self.name}: step {ctx.step} > 0 needs the teacher's outputs")
        if teacher_out.logits.shape[1] != ctx.old_classes:
            raise ValueError(
                f"{self.name}: the teacher has {teacher_out.logits.shape[1]} classes but "
                f"ctx.old_classes = {ctx.old_classes}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
