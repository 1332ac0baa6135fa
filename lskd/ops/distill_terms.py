"""distill_terms: several pod_distill / sop_distill loss terms in one call.

A whole LSKD loss is seven terms over six maps (docs/MATHEMATICS.md §3.1). Called one by one,
each term pays its own Python call, validation, dispatcher round trip and
autograd node: on a GPU that host time (about 0.1-0.2 ms per term) is longer
than the kernels of the smaller maps. ``distill_terms`` takes the terms as a
list and, for the "cpu" and "cuda" backends, runs them as ONE op
(``lskd::distill_terms``, csrc/ops.cpp) with ONE C++ autograd node
(csrc/autograd.cpp) that has one output per term. The kernels are those of
pod_distill and sop_distill (csrc/cpu, csrc/cuda); nothing is recomputed.

A term whose output receives no gradient runs no backward kernel, so
``torch.autograd.grad(terms[i], ...)`` (per-term gradients, as RGE/GradNorm
need) costs one term's backward, and zero gradients never flow into the maps
of the other terms.

The "reference" and "triton" backends run the terms one by one (same results).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from .. import _extension
from .._validation import acc_dtype, check_pair, check_scales, prepare_masks, reduction_code, sop_geometry
from ._backends import resolve_backend
from .pod_distill import pod_distill
from .sop_distill import sop_distill

__all__ = ["PodTerm", "SopTerm", "Term", "distill_terms"]


class PodTerm(NamedTuple):
    """One :func:`lskd.pod_distill` term (same arguments and defaults)."""

    student: torch.Tensor
    teacher: torch.Tensor
    spatial_mask: Optional[torch.Tensor] = None
    channel_mask: Optional[torch.Tensor] = None
    scales: Sequence[int] = (1, 2, 4)
    square: bool = True


class SopTerm(NamedTuple):
    """One :func:`lskd.sop_distill` term (same arguments and defaults)."""

    student: torch.Tensor
    teacher: torch.Tensor
    spatial_mask: Optional[torch.Tensor] = None
    channel_mask: Optional[torch.Tensor] = None
    groups: int = 20
    window: Optional[int] = 5
    stride: int = 2


Term = Union[PodTerm, SopTerm]


def _fake(student, teacher, spatial_mask, channel_mask, params, reduction):
    out = []
    for s in student:
        shape = (s.shape[0],) if reduction == 0 else ()
        out.append(s.new_empty(shape, dtype=acc_dtype(s.dtype)))
    return out


_FUSED = _extension.has_cpp_distill_terms()
if _FUSED:
    torch.library.register_fake("lskd::distill_terms")(_fake)


def _prepared(where: str, term: Term, cache: dict):
    """A checked term's masks as the kernels take them, and its params."""
    n, c, h, w = term.student.shape
    if isinstance(term, PodTerm):
        scales = check_scales(where, term.scales, h, w)
        params = [0, int(bool(term.square)), len(scales), *scales]
    else:
        win, strd, pad = sop_geometry(where, c, h, w, term.groups, term.window, term.stride)
        params = [1, int(term.groups), *win, *strd, *pad]
    if term.spatial_mask is None and term.channel_mask is None:
        return None, None, params
    # The same masks often serve several terms (MD and MCD of one map): convert them once.
    key = (id(term.spatial_mask), id(term.channel_mask), term.student.dtype, term.student.shape)
    if key not in cache:
        cache[key] = prepare_masks(where, term.student, term.spatial_mask, term.channel_mask)
    m, k = cache[key]
    return m, k, params


def distill_terms(terms: Sequence[Term], reduction: str = "mean", backend: str = "auto") -> List[torch.Tensor]:
    """Several Local POD / MCD loss terms in one fused call.

    Args:
        terms: :class:`PodTerm` / :class:`SopTerm` entries, each with the
            arguments of :func:`lskd.pod_distill` / :func:`lskd.sop_distill`.
            Maps may differ in shape and dtype from term to term (each term's
            student and teacher agree); all on one device. The same student
            tensor may appear in several terms: its gradients add up.
        reduction: "mean" (over images, default), "sum" or "none" (``[N]`` per term).
        backend: "auto", "reference", "cpu", "cuda" or "triton" (for every term).

    Returns:
        A list with one tensor per term, each equal to what the single-term
        function returns (float32, float64 for float64 inputs).

    Example (the released LSKD distillation of docs/MATHEMATICS.md §3.1, maps s/t, masks m/k)::

        pod0, pod1, md2, md3, md4, mcd, md5 = lskd.distill_terms([
            PodTerm(s[0], t[0]), PodTerm(s[1], t[1]),
            PodTerm(s[2], t[2], m[2], k[2]), PodTerm(s[3], t[3], m[3], k[3]),
            PodTerm(s[4], t[4], m[4], k[4]), SopTerm(s[4], t[4], m[4], k[4]),
            PodTerm(s[5], t[5], m[5])])
    """
    op = "distill_terms"
    if isinstance(terms, (PodTerm, SopTerm)) or not isinstance(terms, (list, tuple)):
        raise TypeError(f"{op}: terms must be a list of PodTerm/SopTerm, got {type(terms).__name__}")
    code = reduction_code(op, reduction)
    device = None
    for i, term in enumerate(terms):
        if not isinstance(term, (PodTerm, SopTerm)):
            raise TypeError(f"{op}: term {i} must be a PodTerm or SopTerm, got {type(term).__name__}")
        check_pair(f"{op} (term {i})", term.student, term.teacher)
        if device is None:
            device = term.student.device
        elif term.student.device != device:
            raise ValueError(f"{op}: term {i} is on {term.student.device} but term 0 is on {device}")
    if device is None:
        return []
    impl = resolve_backend(op, backend, device)
    if (impl == "cpu" or impl == "cuda") and _FUSED:
        cache: dict = {}
        spatial, channel, params = [], [], []
        for i, term in enumerate(terms):
            m, k, p = _prepared(f"{op} (term {i})", term, cache)
            spatial.append(m)
            channel.append(k)
            params += p
        students = [term.student for term in terms]
        teachers = [term.teacher for term in terms]
        return list(torch.ops.lskd.distill_terms(students, teachers, spatial, channel, params, code))
    return [_one(term, reduction, impl) for term in terms]


def _one(term: Term, reduction: str, backend: str) -> torch.Tensor:
    if isinstance(term, PodTerm):
        return pod_distill(*term, reduction=reduction, backend=backend)
    return sop_distill(*term, reduction=reduction, backend=backend)
