"""sop_distill: second-order context pooling distance (MCD).

Reference: lskd.reference.sop_distances. CPU kernel: csrc/cpu/sop_distill.cpp.
CUDA kernel: csrc/cuda/sop_distill.cu. Triton kernel: kernels/sop_distill.py.
Schemas and C++ autograd: csrc/sop_distill.cpp. Fake kernels are registered
here for the C++ ("lskd::") and Triton ("lskd_triton::") ops, and the autograd
formula for the Triton ops. The "cpu"/"cuda" backends call lskd::sop_distill,
which also reduces over the batch (one op and one autograd node per call).
:class:`SopTerm` is a sop_distill term of lskd.distill_terms.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from .. import _extension, reference
from .._dtypes import acc_dtype
from .._validation import check_pair, prepare_masks, reduce, reduction_code, sop_geometry
from ._backends import on_triton_load, resolve_backend

__all__ = ["sop_distill", "SopTerm", "op_params"]


class SopTerm(NamedTuple):
    """One :func:`lskd.sop_distill` term of :func:`lskd.distill_terms` (same arguments and defaults)."""

    student: torch.Tensor
    teacher: torch.Tensor
    spatial_mask: Optional[torch.Tensor] = None
    channel_mask: Optional[torch.Tensor] = None
    groups: int = 20
    window: Optional[int] = 5
    stride: int = 2


def op_params(where: str, term: SopTerm) -> Tuple[int, List[int], List[int], List[int]]:
    """The term's checked parameters as the ``lskd::sop_*`` schemas take them, between the masks
    and the reduction: ``(groups, window, stride, padding)``, the last three (rows, columns) pairs.
    Every caller of the raw ops builds them here."""
    _, c, h, w = term.student.shape
    win, strd, pad = sop_geometry(where, c, h, w, term.groups, term.window, term.stride)
    return int(term.groups), list(win), list(strd), list(pad)


def _term_params(where: str, term: SopTerm) -> List[int]:
    """The term's parameters in lskd::distill_terms' params, after its kind (read_sop_term, csrc/sop_distill.cpp)."""
    groups, win, strd, pad = op_params(where, term)
    return [groups, *win, *strd, *pad]


def _fake_forward(student, teacher, spatial_mask, channel_mask, groups, window, stride, padding):
    n, c, h, w = student.shape
    ho = (h + 2 * padding[0] - window[0]) // stride[0] + 1
    wo = (w + 2 * padding[1] - window[1]) // stride[1] + 1
    acc = acc_dtype(student.dtype)
    k = c // groups
    return student.new_empty((n,), dtype=acc), student.new_empty((n, groups * k, ho, wo), dtype=acc)


def _fake_backward(grad_dist, student, spatial_mask, channel_mask, dist, pooled_grad, groups, window, stride, padding):
    return torch.empty_like(student)


def _fake_distill(student, teacher, spatial_mask, channel_mask, groups, window, stride, padding, reduction):
    shape = (student.shape[0],) if reduction == 0 else ()
    return student.new_empty(shape, dtype=acc_dtype(student.dtype))


def _register_cpp() -> None:
    # Autograd of lskd::sop_forward and lskd::sop_distill is C++ (csrc/sop_distill.cpp).
    torch.library.register_fake("lskd::sop_forward")(_fake_forward)
    torch.library.register_fake("lskd::sop_backward")(_fake_backward)
    torch.library.register_fake("lskd::sop_distill")(_fake_distill)


def _register_triton() -> None:
    forward = "lskd_triton::sop_forward"
    backward_op = torch.ops.lskd_triton.sop_backward

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake("lskd_triton::sop_backward")(_fake_backward)

    def setup_context(ctx, inputs, output):
        student, _teacher, spatial_mask, channel_mask, groups, window, stride, padding = inputs
        dist, pooled_grad = output
        ctx.save_for_backward(student, spatial_mask, channel_mask, dist, pooled_grad)
        ctx.geometry = (int(groups), list(window), list(stride), list(padding))
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the auxiliary output

    def backward(ctx, grad_dist, _grad_pooled):
        student, spatial_mask, channel_mask, dist, pooled_grad = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_dist is not None:
            grad = backward_op(
                grad_dist.contiguous(), student, spatial_mask, channel_mask, dist, pooled_grad, *ctx.geometry
            )
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd(forward, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    _register_cpp()
on_triton_load(_register_triton)


def sop_distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    spatial_mask: Optional[torch.Tensor] = None,
    channel_mask: Optional[torch.Tensor] = None,
    groups: int = 20,
    window: Optional[int] = 5,
    stride: int = 2,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Second-order (outer-product) pooling distance, MCD (docs/MATHEMATICS.md §2.2).

    Channels are split into ``groups`` groups of ``k = C // groups`` channels
    (the last ``C - groups * k`` are left out). Each group is average-pooled
    with a ``window`` x ``window`` window, ``stride`` and padding
    ``window // 2`` (divisor ``window**2``, padding counted); ``window=None``
    pools globally (a covariance context). At every pooled position the
    student's k-vector p and the teacher's q give ``||p p^T - q q^T||_F^2``,
    computed without forming k x k matrices; ``d`` is the square root of the sum.

    Args:
        student, teacher: ``[N, C, H, W]``, as in :func:`pod_distill`.
        spatial_mask: optional ``[N, 1, H, W]`` bool/float mask; channel_mask: optional ``[N, C]``.
        groups: number of channel groups, 1 <= groups <= C (default 20 as released).
        window, stride: pooling window and stride in pixels (default 5 and 2).
        reduction: "mean" (default), "sum" or "none" (``[N]``).
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        The distance per image, reduced, in float32 (float64 for float64 inputs).
    """
    op = "sop_distill"
    check_pair(op, student, teacher)
    params = op_params(op, SopTerm(student, teacher, groups=groups, window=window, stride=stride))
    code = reduction_code(op, reduction)
    if spatial_mask is None and channel_mask is None:
        m = k = None
    else:
        m, k = prepare_masks(op, student, spatial_mask, channel_mask)
    impl = resolve_backend(op, backend, student.device)
    if impl == "cpu" or impl == "cuda":
        # One op and one autograd node: the C++ forward and the reduction; the
        # C++ autograd kernel keeps the teacher and the masks out of the graph.
        return torch.ops.lskd.sop_distill(student, teacher, m, k, *params, code)
    if impl == "reference":
        acc = acc_dtype(student.dtype)
        dist = reference.sop_distances(
            student.to(acc), teacher.to(acc), None if m is None else m[:, None], k, groups, window, stride
        )
    else:
        dist, _ = torch.ops.lskd_triton.sop_forward(student, teacher.detach(), m, k, *params)
    return reduce(dist, reduction)
