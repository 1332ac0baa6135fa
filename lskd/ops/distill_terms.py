"""distill_terms: several pod_distill / sop_distill loss terms in one call.

A whole LSKD loss is seven terms over six maps (docs/MATHEMATICS.md §3.1). Called one by one,
each term pays its own Python call, validation, dispatcher round trip and
autograd node: on a GPU that host time (about 0.1-0.2 ms per term) is longer
than the kernels of the smaller maps. ``distill_terms`` takes the terms as a
list and, for the "cpu" and "cuda" backends, runs them as ONE op
(``lskd::distill_terms``, csrc/distill_terms.cpp) with ONE C++ autograd node
that has one output per term. The kernels are those of pod_distill and
sop_distill (csrc/cpu, csrc/cuda); nothing is recomputed. Each term type
(:class:`PodTerm`, :class:`SopTerm`) and the encoding of its parameters live in
its op's module.

A term whose output receives no gradient runs no backward kernel, so
``torch.autograd.grad(terms[i], ...)`` (per-term gradients, as RGE/GradNorm
need) costs one term's backward, and zero gradients never flow into the maps
of the other terms.

The "reference" and "triton" backends run the terms one by one (same results).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch

from .. import _extension
from .._dtypes import acc_dtype
from .._validation import check_pair, prepare_masks, reduction_code
from ._backends import resolve_backend
from .pod_distill import PodTerm, pod_distill
from .pod_distill import _term_params as _pod_params
from .sop_distill import SopTerm, sop_distill
from .sop_distill import _term_params as _sop_params

__all__ = ["PodTerm", "SopTerm", "Term", "distill_terms"]

Term = Union[PodTerm, SopTerm]

# Per term type: its kind in lskd::distill_terms (csrc/distill_terms.cpp), the encoding of its
# parameters, and its single-term function (the term's fields are arguments of that function).
_KINDS = {
    PodTerm: (0, _pod_params, pod_distill),
    SopTerm: (1, _sop_params, sop_distill),
}


def _kind_of(term: Term):
    for cls, kind in _KINDS.items():
        if isinstance(term, cls):
            return kind
    return None


def _fake(student, teacher, spatial_mask, channel_mask, params, reduction):
    out = []
    for s in student:
        shape = (s.shape[0],) if reduction == 0 else ()
        out.append(s.new_empty(shape, dtype=acc_dtype(s.dtype)))
    return out


if _extension.has_cpu_kernels():
    torch.library.register_fake("lskd::distill_terms")(_fake)


def _prepared(where: str, term: Term, cache: dict):
    """A checked term's masks as the kernels take them, and its params."""
    kind, term_params, _ = _kind_of(term)
    params = [kind, *term_params(where, term)]
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
        if _kind_of(term) is None:
            raise TypeError(f"{op}: term {i} must be a PodTerm or SopTerm, got {type(term).__name__}")
        check_pair(f"{op} (term {i})", term.student, term.teacher)
        if device is None:
            device = term.student.device
        elif term.student.device != device:
            raise ValueError(f"{op}: term {i} is on {term.student.device} but term 0 is on {device}")
    if device is None:
        return []
    impl = resolve_backend(op, backend, device)
    if impl == "cpu" or impl == "cuda":
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
    # By name: the term's fields are that function's arguments, in whatever order it takes them.
    return _kind_of(term)[2](**term._asdict(), reduction=reduction, backend=backend)
