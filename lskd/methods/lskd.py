"""LSKD (Wang et al., IEEE TIP 2024): layer-specific knowledge distillation (docs/MATHEMATICS.md §3).

Terms at step t > 0 (each times its base factor, unweighted; released assignment):

=======  ==========================================================  ======
name     term                                                        §3.1
=======  ==========================================================  ======
ce       CE on PLOP's entropy pseudo-labels x per-image adaptive     L0
         factor (see :mod:`lskd.methods.plop`)
mcd      0.005 * sop_distill(map 4, M, Nc)                           L1
unkd     10 * UNKD (MiB, logits upsampled to the labels)             L2
pod0/1   0.01 * pod_distill(map 0 / 1), no masks                     L3, L4
md2/3    0.01 * pod_distill(map 2 / 3, M, Nc)                        L5, L6
md4      0.01 * pod_distill(map 4, M, Nc)                            L7
md5      0.0005 * pod_distill(logits map, M)                         L8
=======  ==========================================================  ======

PLOP's ``sqrt(|C^{0:t}| / |C^t|)`` factor is not applied and there is no division by
the number of maps (docs/MATHEMATICS.md §3.1). The per-map scheme is DATA (``schemes: {map: scheme}``,
scheme in :data:`SCHEMES`), so that a search can change it; the terms of each scheme and their
names are those of :mod:`lskd.terms` (``md{l}`` has masks M and Nc, on the logits map M only, as
released; the MCD term is named ``mcd`` on map 4, the released place). Factors per map are data too
(``map_factors``). MCD on a map with fewer channels than ``mcd_groups`` uses one group
per channel.

MD masks (:func:`lskd.md_masks`, docs/MATHEMATICS.md §2.3) per masked map come from the teacher's maps on
three images: the input (A), the input with background/old pixels set to 0 in the
normalised image (Cb) and the input with new pixels set to 0 (Dn). As released, both the
erasure and ``rho_old = |{y < O}| / |y|``, ``rho_new = |{O <= y != 255}| / |y|`` (|y| = every
label pixel, 255 included; md_masks at the labels' own resolution) use the labels AFTER
PLOP's entropy pseudo-labelling (release ``train.py`` 257-325 pseudo-labels ``labels`` in
place, 326-331 erases from them, 494 passes them to ``features_distillation``, whose
``sigmoid == "whc"`` branch, 1207-1214, counts ``ratio = num / h / w``): accepted
background pixels (teacher's old class, < O) are erased in Cb, new pixels in Dn, and
background pixels rejected by the entropy rule (255) in neither. The pseudo-labels of a
batch are computed once (:meth:`LSKD.pseudo_labels`, kept in ``ctx.cache``) and serve the
CE term and the masks alike.

Since the pseudo-labels need the teacher's output on A, :meth:`LSKD.teacher_forward` runs
the teacher (under no_grad, eval mode) on A first (N images), pseudo-labels, then on
``cat([Cb, Dn])`` as one 2N batch (``fused_teacher``; two N passes otherwise), and hands
the Cb/Dn outputs on in ``ctx.teacher_erased``. The teacher computes on the same 3N images
as one 3N batch would, but in two launches (its peak activation memory is that of 2N
images); the release runs four N passes, A twice (``train.py`` 253 and 334-338).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.deeplab import SegOutput
from ..terms import LOGITS_MAP, RELEASED_SCHEMES, SCHEMES, map_term, masked_scheme, scheme_terms, term_kind
from .base import (
    IGNORE_INDEX,
    Method,
    StepContext,
    distilled_maps,
    pod_scales,
    teacher_like,
)
from .plop import EntropyPseudoLabeler, PseudoLabelStatistics

__all__ = [
    "SEARCH",
    "RELEASED_MAP_FACTORS",
    "erase_images",
    "split_output",
    "teacher_erased",
    "teacher_triplet",
    "LSKD",
]

#: Not a scheme but the search's setting of a map: every candidate's basic term (pod<l>, md<l> and
#: the MCD term) is returned, for :mod:`lskd.search` to weight them (docs/MATHEMATICS.md §5).
SEARCH = "search"
#: Base factors of the POD/MD term of each map (L3..L8).
RELEASED_MAP_FACTORS: Dict[int, float] = {0: 0.01, 1: 0.01, 2: 0.01, 3: 0.01, 4: 0.01, 5: 0.0005}
#: ``ctx.cache`` key of the batch's ``(pseudo-labels [N, Hl, Wl], adaptive factor [N])``.
PSEUDO_KEY = "pseudo_labels"


def erase_images(
    images: torch.Tensor, labels: torch.Tensor, old_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``images [N, 3, H, W]``, ``labels [N, Hl, Wl]`` -> ``(bg_erased, new_erased)``, each ``[N, 3, H, W]``.

    bg_erased: pixels with label < O set to 0 (in the normalised image); new_erased: pixels
    with O <= label != ignore set to 0; ignored pixels in neither. LSKD passes the
    pseudo-labelled labels (module doc). Labels of another size are resized by nearest.
    """
    if labels.shape[-2:] != images.shape[-2:]:
        labels = F.interpolate(labels[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].long()
    old = (labels < old_classes)[:, None]
    new = ((labels >= old_classes) & (labels != ignore_index))[:, None]
    zero = images.new_zeros(())
    return torch.where(old, zero, images), torch.where(new, zero, images)


def split_output(out: SegOutput, parts: int) -> List[SegOutput]:
    """Split a SegOutput of a ``parts * N`` batch into ``parts`` SegOutputs of N images."""
    maps = [m.chunk(parts, dim=0) for m in out.maps]
    logits = out.logits.chunk(parts, dim=0)
    return [SegOutput(logits=logits[i], maps=[m[i] for m in maps]) for i in range(parts)]


@torch.no_grad()
def teacher_erased(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    old_classes: int,
    fused: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> Tuple[SegOutput, SegOutput]:
    """Teacher outputs on the two erased inputs of ``images [N, 3, H, W]``, erased by ``labels
    [N, Hl, Wl]`` (:func:`erase_images`; LSKD: the pseudo-labels): ``(Cb, Dn)``, one 2N pass
    when ``fused``, two N passes otherwise."""
    bg_erased, new_erased = erase_images(images, labels, old_classes, ignore_index)
    if fused:
        cb, dn = split_output(teacher(torch.cat([bg_erased, new_erased], dim=0)), 2)
        return cb, dn
    return teacher(bg_erased), teacher(new_erased)


Relabel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def teacher_triplet(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    old_classes: int,
    fused: bool = True,
    ignore_index: int = IGNORE_INDEX,
    relabel: Optional[Relabel] = None,
) -> Tuple[SegOutput, SegOutput, SegOutput]:
    """Teacher outputs on (input A, bg/old-erased Cb, new-erased Dn) of ``images [N, 3, H, W]``.

    relabel: ``(labels [N, Hl, Wl], teacher logits on A [N, O, h, w]) -> [N, Hl, Wl]``, the
        labels that decide the erasure (LSKD: the entropy pseudo-labels). With it, A runs first
        and then Cb/Dn (:func:`teacher_erased`: one 2N pass when ``fused``). Without it
        ``labels`` decide as given and the three inputs run as one 3N pass when ``fused``.
    """
    if relabel is not None:
        a = teacher(images)
        cb, dn = teacher_erased(teacher, images, relabel(labels, a.logits), old_classes, fused, ignore_index)
        return a, cb, dn
    if not fused:
        return (teacher(images), *teacher_erased(teacher, images, labels, old_classes, False, ignore_index))
    bg_erased, new_erased = erase_images(images, labels, old_classes, ignore_index)
    a, cb, dn = split_output(teacher(torch.cat([images, bg_erased, new_erased], dim=0)), 3)
    return a, cb, dn


class LSKD(PseudoLabelStatistics, Method):
    """LSKD's objective (module doc). ``terms`` returns the nine named terms of docs/MATHEMATICS.md §3.1.

    Args:
        schemes: map index (0..5) -> scheme in :data:`SCHEMES` (default :data:`RELEASED_SCHEMES`).
        map_factors: map index -> base factor of its POD/MD term (default :data:`RELEASED_MAP_FACTORS`).
        mcd_factor: base factor of MCD terms (0.005).
        unkd_factor: base factor of UNKD (10).
        mcd_groups, mcd_window, mcd_stride: sop_distill parameters (20, 5, 2 as released).
        scales: Local POD scales (those larger than a map are dropped for that map).
        logits_channel_mask: apply Nc on the logits map too (False: M only, as released).
        fused_teacher: run the two erased teacher inputs as one 2N batch (True) or two passes
            (the plain input always runs first, alone: the erasure needs its pseudo-labels).
        bins, min_threshold: pseudo-labelling histogram bins (default: the threshold rule's) and
            entropy floor.
        pseudo_threshold: "median" (the exact per-class median, as the papers describe; default)
            or "released" (the release's histogram rule, see :func:`lskd.methods.plop.released_histogram_threshold`).
    """

    name = "lskd"
    needs_teacher = True
    teacher_passes = 3
    needs_prepare_step = True

    def __init__(
        self,
        schemes: Optional[Mapping[int, str]] = None,
        map_factors: Optional[Mapping[int, float]] = None,
        mcd_factor: float = 0.005,
        unkd_factor: float = 10.0,
        mcd_groups: int = 20,
        mcd_window: Optional[int] = 5,
        mcd_stride: int = 2,
        scales: Sequence[int] = (1, 2, 4),
        logits_channel_mask: bool = False,
        fused_teacher: bool = True,
        bins: Optional[int] = None,
        min_threshold: float = 0.001,
        ignore_index: int = IGNORE_INDEX,
        backend: str = "auto",
        pseudo_threshold: str = "median",
    ) -> None:
        self.schemes: Dict[int, str] = dict(RELEASED_SCHEMES if schemes is None else schemes)
        self.check_schemes(self.schemes)
        self.map_factors: Dict[int, float] = dict(RELEASED_MAP_FACTORS)
        if map_factors is not None:
            self.map_factors.update({int(k): float(v) for k, v in map_factors.items()})
        self.mcd_factor = mcd_factor
        self.unkd_factor = unkd_factor
        self.mcd_groups = mcd_groups
        self.mcd_window = mcd_window
        self.mcd_stride = mcd_stride
        self.scales = tuple(scales)
        self.logits_channel_mask = logits_channel_mask
        self.fused_teacher = fused_teacher
        self.labeler = EntropyPseudoLabeler(bins, min_threshold, ignore_index, pseudo_threshold, backend)
        self.ignore_index = ignore_index
        self.backend = backend

    # -- bookkeeping -----------------------------------------------------------------
    @staticmethod
    def check_schemes(schemes: Mapping[int, str]) -> None:
        """Every map index in 0..5 and every scheme in :data:`SCHEMES` (or :data:`SEARCH`)."""
        for m, s in schemes.items():
            if s not in SCHEMES and s != SEARCH:
                raise ValueError(f"LSKD: scheme {s!r} for map {m} is not one of {SCHEMES}")
            if not 0 <= int(m) <= LOGITS_MAP:
                raise ValueError(f"LSKD: map index {m} outside 0..{LOGITS_MAP}")

    def set_schemes(self, schemes: Mapping[int, str]) -> None:
        """Replace the per-map schemes (e.g. the search's argmax); maps not given get ``"none"``."""
        new = {int(m): str(s) for m, s in schemes.items()}
        self.check_schemes(new)
        self.schemes = {m: new.get(m, "none") for m in range(LOGITS_MAP + 1)}

    @property
    def thresholds(self) -> Optional[torch.Tensor]:
        return self.labeler.thresholds

    def _maps(self) -> List[int]:
        return sorted(m for m, s in self.schemes.items() if s != "none")

    def _map_term_names(self, map_index: int) -> Tuple[str, ...]:
        """The names of the terms of one map under its scheme (:data:`SEARCH`: every candidate's)."""
        scheme = self.schemes[map_index]
        if scheme == SEARCH:
            return scheme_terms(map_index, "pod") + scheme_terms(map_index, "md+mcd")
        return scheme_terms(map_index, scheme)

    def term_names(self, ctx: StepContext) -> List[str]:
        """``ce``, the MCD terms, ``unkd``, then the POD/MD terms by map (the order of :meth:`terms`)."""
        if not ctx.incremental:
            return ["ce"]
        per_map = [n for m in self._maps() for n in self._map_term_names(m)]
        mcd = [n for n in per_map if term_kind(n) == "mcd"]
        return ["ce"] + mcd + ["unkd"] + [n for n in per_map if term_kind(n) != "mcd"]

    def _masked(self, scheme: str) -> bool:
        return scheme == SEARCH or masked_scheme(scheme)

    def masked_maps(self) -> List[int]:
        """Maps whose scheme needs the MD masks."""
        return [m for m in self._maps() if self._masked(self.schemes[m])]

    # -- step / teacher ----------------------------------------------------------------
    def prepare_step(
        self,
        teacher: Optional[nn.Module],
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        ctx: StepContext,
    ) -> None:
        if teacher is not None and ctx.incremental:
            self.labeler.prepare(teacher, batches, ctx.old_classes)

    @torch.no_grad()
    def teacher_forward(
        self,
        teacher: Optional[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        ctx: StepContext,
    ) -> Tuple[Optional[SegOutput], StepContext]:
        """Teacher on ``images [N, 3, H, W]``, then (masked maps only) pseudo-labels of ``labels
        [N, H, W]`` and the teacher on the erased pair (2N). Returns ``(out on A, batch ctx)``, the
        batch ctx with a fresh ``cache`` (pseudo-labels) and ``teacher_erased`` = (Cb, Dn)."""
        if teacher is None or not ctx.incremental:
            return None, ctx
        bctx = ctx.replace(teacher_erased=None, cache={})
        a = teacher(images)
        if not self.masked_maps():
            return a, bctx
        pseudo, _ = self.pseudo_labels(labels, a.logits, bctx)
        erased = teacher_erased(teacher, images, pseudo, ctx.old_classes, self.fused_teacher, self.ignore_index)
        return a, bctx.replace(teacher_erased=erased)

    def pseudo_labels(
        self, labels: torch.Tensor, teacher_logits: torch.Tensor, ctx: StepContext
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(targets [N, H, W] int64, adaptive factor [N])`` of ``labels [N, H, W]`` from the
        teacher's logits on the plain input (``self.labeler``); computed once per batch and kept
        in ``ctx.cache`` (when there is one), so the CE term and the MD masks share them."""
        if ctx.cache is not None and PSEUDO_KEY in ctx.cache:
            return ctx.cache[PSEUDO_KEY]
        out = self.labeler(labels, teacher_logits, ctx.old_classes)
        if ctx.cache is not None:
            ctx.cache[PSEUDO_KEY] = out
        return out

    def _erased(self, images: torch.Tensor, pseudo: torch.Tensor, ctx: StepContext) -> Tuple[SegOutput, SegOutput]:
        """(Cb, Dn) teacher outputs: from ``ctx.teacher_erased`` or, erased by the pseudo-labels
        ``pseudo [N, H, W]``, one 2N pass of ``ctx.run_teacher``."""
        if ctx.teacher_erased is not None:
            return ctx.teacher_erased
        if ctx.run_teacher is None:
            raise ValueError(
                "lskd: the MD masks need the teacher's outputs on the erased images: use "
                "LSKD.teacher_forward, or give ctx.teacher_erased or ctx.run_teacher"
            )
        return teacher_erased(ctx.run_teacher, images, pseudo, ctx.old_classes, True, self.ignore_index)

    @torch.no_grad()
    def masks(
        self,
        map_index: int,
        teacher_out: SegOutput,
        teacher_erased: Tuple[SegOutput, SegOutput],
        labels: torch.Tensor,
        old_classes: int,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """MD masks of one map: ``(spatial [N, 1, h, w] bool, channel [N, C] bool or None)``
        (channel None on the logits map unless ``logits_channel_mask``). ``labels [N, H, W]``
        decide rho: LSKD passes the pseudo-labels (module doc)."""
        cb, dn = teacher_erased
        spatial, channel = ops.md_masks(
            teacher_out.maps[map_index],
            cb.maps[map_index],
            dn.maps[map_index],
            labels,
            old_classes,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )
        if map_index == LOGITS_MAP and not self.logits_channel_mask:
            channel = None
        return spatial, channel

    # -- terms ---------------------------------------------------------------------------
    def map_terms(
        self,
        map_index: int,
        scheme: str,
        student_map: torch.Tensor,
        teacher_map: torch.Tensor,
        spatial: Optional[torch.Tensor] = None,
        channel: Optional[torch.Tensor] = None,
    ) -> List[Tuple[str, float, ops.Term]]:
        """The terms of one map under one scheme, as ``(name, base factor, PodTerm/SopTerm)``
        (student logits map already collapsed to O channels). ``spatial [N, 1, h, w]`` /
        ``channel [N, C]`` are required for md schemes. :data:`SEARCH` gives every candidate's
        basic term: ``pod{l}``, ``md{l}`` and the MCD term."""
        if scheme == "none":
            return []
        factor = self.map_factors[map_index]
        scales = pod_scales(student_map, self.scales)
        if scheme == SEARCH:
            return self.map_terms(map_index, "pod", student_map, teacher_map) + self.map_terms(
                map_index, "md+mcd", student_map, teacher_map, spatial, channel
            )
        if scheme == "pod":
            return [(map_term("pod", map_index), factor, ops.PodTerm(student_map, teacher_map, scales=scales))]
        if spatial is None:
            raise ValueError(f"lskd: scheme {scheme!r} on map {map_index} needs the MD masks")
        pod = ops.PodTerm(student_map, teacher_map, spatial, channel, scales=scales)
        out = [(map_term("md", map_index), factor, pod)]
        if scheme == "md+mcd":
            groups = min(self.mcd_groups, student_map.shape[1])
            sop = ops.SopTerm(
                student_map,
                teacher_map,
                spatial,
                channel,
                groups=groups,
                window=self.mcd_window,
                stride=self.mcd_stride,
            )
            out.append((map_term("mcd", map_index), self.mcd_factor, sop))
        return out

    def compute_terms(self, specs: Sequence[Tuple[str, float, ops.Term]]) -> Dict[str, torch.Tensor]:
        """``{name: factor * distance}`` of all the terms in ONE fused call (:func:`lskd.distill_terms`:
        one op and one autograd node; the gradient of one term runs only its own backward)."""
        values = ops.distill_terms([term for _, _, term in specs], backend=self.backend)
        return {name: factor * v for (name, factor, _), v in zip(specs, values)}

    def incremental_terms(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        student_out: SegOutput,
        teacher_out: SegOutput,
        ctx: StepContext,
    ) -> Dict[str, torch.Tensor]:
        o = ctx.old_classes
        if ctx.cache is None:  # one batch: the CE term and the masks share one pseudo-labelling
            ctx = ctx.replace(cache={})
        pseudo = self.pseudo_labels(labels, teacher_out.logits, ctx)[0]
        erased = self._erased(images, pseudo, ctx) if self.masked_maps() else None
        specs: List[Tuple[str, float, ops.Term]] = []
        for m in self._maps():
            scheme = self.schemes[m]
            s_map, t_map = distilled_maps(student_out, teacher_out, m, o)
            spatial = channel = None
            if self._masked(scheme):
                key = ("md_masks", m)
                if ctx.cache is not None and key in ctx.cache:
                    spatial, channel = ctx.cache[key]
                else:
                    spatial, channel = self.masks(m, teacher_out, erased, pseudo, o)
                    if ctx.cache is not None:
                        ctx.cache[key] = (spatial, channel)
            specs += self.map_terms(m, scheme, s_map, t_map, spatial, channel)
        per_map = self.compute_terms(specs)
        cls = self.classification_terms(labels, student_out, teacher_out, ctx)
        out: Dict[str, torch.Tensor] = {"ce": cls["ce"]}
        out.update({k: v for k, v in per_map.items() if term_kind(k) == "mcd"})
        out["unkd"] = cls["unkd"]
        out.update({k: v for k, v in per_map.items() if term_kind(k) != "mcd"})
        return out

    def classification_terms(
        self, labels: torch.Tensor, student_out: SegOutput, teacher_out: SegOutput, ctx: StepContext
    ) -> Dict[str, torch.Tensor]:
        """``{"ce": pseudo-labelled CE x adaptive factor, "unkd": 10 * UNKD}`` of a step t > 0 (the
        terms without distillation maps; also the search's upper-level objective, docs/MATHEMATICS.md §5.2).
        The CE is PLOP's (:func:`lskd.methods.plop.pseudo_labelled_ce`) on the batch's cached
        pseudo-labels (:meth:`pseudo_labels`)."""
        targets, factor = self.pseudo_labels(labels, teacher_out.logits, ctx)
        s_logits = student_out.logits
        sums = ops.ce_unkd(
            s_logits,
            teacher_like(teacher_out.logits, s_logits),
            targets,
            factor,
            ignore_index=self.labeler.ignore_index,
            backend=self.backend,
        )
        pixels = targets.numel()  # both terms are means over all N * H * W label pixels
        return {"ce": sums.ce.sum() / pixels, "unkd": self.unkd_factor * (sums.unkd.sum() / pixels)}
