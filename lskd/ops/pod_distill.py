"""pod_distill: masked Local POD distance (PLOP; "MD" when masks are given).

Reference: lskd.reference.pod_distances. CPU kernel: csrc/cpu/pod_distill.cpp.
CUDA kernel: csrc/cuda/pod_distill.cu. Triton kernel: kernels/pod_distill.py.
Schemas and C++ autograd: csrc/pod_distill.cpp. This module registers, once for
the C++ ops ("lskd::") and once for the Triton ops ("lskd_triton::"), the fake
kernels that torch.compile needs, and for the Triton ops the autograd formula
(backward = the *_backward op). The "cpu"/"cuda" backends call
lskd::pod_distill, which also reduces over the batch (one op and one autograd
node per call). :class:`PodTerm` is a pod_distill term of lskd.distill_terms.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _extension, reference
from .._dtypes import acc_dtype
from .._validation import (
    check_pair,
    check_scales,
    pod_embedding_length,
    prepare_masks,
    reduce,
    reduction_code,
)
from ._backends import on_triton_load, resolve_backend

__all__ = ["pod_distill", "PodTerm", "op_params"]


class PodTerm(NamedTuple):
    """One :func:`lskd.pod_distill` term of :func:`lskd.distill_terms` (same arguments and defaults)."""

    student: torch.Tensor
    teacher: torch.Tensor
    spatial_mask: Optional[torch.Tensor] = None
    channel_mask: Optional[torch.Tensor] = None
    scales: Sequence[int] = (1, 2, 4)
    square: bool = True


def op_params(where: str, term: PodTerm) -> Tuple[List[int], bool]:
    """The term's checked parameters as the ``lskd::pod_*`` schemas take them, between the masks
    and the reduction: ``(scales, square)``. Every caller of the raw ops builds them here."""
    _, _, h, w = term.student.shape
    return list(check_scales(where, term.scales, h, w)), bool(term.square)


def _term_params(where: str, term: PodTerm) -> List[int]:
    """The term's parameters in lskd::distill_terms' params, after its kind (read_pod_term, csrc/pod_distill.cpp)."""
    scales, square = op_params(where, term)
    return [int(square), len(scales), *scales]


def _fake_forward(student, teacher, spatial_mask, channel_mask, scales, square):
    n, c, h, w = student.shape
    acc = acc_dtype(student.dtype)
    length = pod_embedding_length(h, w, scales)
    return student.new_empty((n,), dtype=acc), student.new_empty((n, c, length), dtype=acc)


def _fake_backward(grad_dist, student, spatial_mask, channel_mask, dist, emb, scales, square):
    return torch.empty_like(student)


def _fake_distill(student, teacher, spatial_mask, channel_mask, scales, square, reduction):
    shape = (student.shape[0],) if reduction == 0 else ()
    return student.new_empty(shape, dtype=acc_dtype(student.dtype))


def _register_cpp() -> None:
    # Autograd of lskd::pod_forward and lskd::pod_distill is C++ (csrc/pod_distill.cpp).
    torch.library.register_fake("lskd::pod_forward")(_fake_forward)
    torch.library.register_fake("lskd::pod_backward")(_fake_backward)
    torch.library.register_fake("lskd::pod_distill")(_fake_distill)


def _register_triton() -> None:
    forward = "lskd_triton::pod_forward"
    backward_op = torch.ops.lskd_triton.pod_backward

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake("lskd_triton::pod_backward")(_fake_backward)

    def setup_context(ctx, inputs, output):
        student, _teacher, spatial_mask, channel_mask, scales, square = inputs
        dist, emb = output
        ctx.save_for_backward(student, spatial_mask, channel_mask, dist, emb)
        ctx.scales, ctx.square = list(scales), bool(square)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the auxiliary output

    def backward(ctx, grad_dist, _grad_emb):
        student, spatial_mask, channel_mask, dist, emb = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_dist is not None:
            grad = backward_op(
                grad_dist.contiguous(), student, spatial_mask, channel_mask, dist, emb, ctx.scales, ctx.square
            )
        return grad, None, None, None, None, None

    torch.library.register_autograd(forward, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    _register_cpp()
on_triton_load(_register_triton)


def pod_distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spatial_mask: Optional[torch.Tensor] = None,
    channel_mask: Optional[torch.Tensor] = None,
    scales: Sequence[int] = (1, 2, 4),
    square: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Local POD distance between student and teacher feature maps (docs/MATHEMATICS.md §2.1).

    Args:
        student: ``[N, C, H, W]`` float32/float64/bfloat16/float16, any memory
            format (contiguous and channels-last are the fast paths). Gradients
            flow to it.
        teacher: same shape, dtype and device; never receives gradients.
        spatial_mask: optional ``[N, 1, H, W]`` bool or float mask (float masks multiply).
        channel_mask: optional ``[N, C]`` bool or float mask.
        scales: pooling scales s; at scale s the map is cut into s x s regions of
            (H // s) x (W // s) pixels (remainder rows/columns are left out).
        square: pool the squared activations (PLOP's "pow"), else the raw ones.
        reduction: "mean" (over images, default), "sum" or "none" (``[N]``).
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        The distance ``d = ||Psi(x_a) - Psi(x_b)||_2`` per image, reduced; in
        float32 (float64 for float64 inputs) whatever the input dtype.
    """
    op = "pod_distill"
    check_pair(op, student, teacher)
    params = op_params(op, PodTerm(student, teacher, scales=scales, square=square))
    code = reduction_code(op, reduction)
    if spatial_mask is None and channel_mask is None:
        m = k = None
    else:
        m, k = prepare_masks(op, student, spatial_mask, channel_mask)
    impl = resolve_backend(op, backend, student.device)
    if impl == "cpu" or impl == "cuda":
        # One op and one autograd node: the C++ forward and the reduction; the
        # C++ autograd kernel keeps the teacher and the masks out of the graph.
        return torch.ops.lskd.pod_distill(student, teacher, m, k, *params, code)
    if impl == "reference":
        acc = acc_dtype(student.dtype)
        dist = reference.pod_distances(
            student.to(acc),
            teacher.to(acc),
            None if m is None else m[:, None],
            k,
            *params,
        )
    else:
        dist, _ = torch.ops.lskd_triton.pod_forward(student, teacher.detach(), m, k, *params)
    return reduce(dist, reduction)
