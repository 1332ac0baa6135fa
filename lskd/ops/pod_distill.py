"""pod_distill: masked Local POD distance (PLOP; "MD" when masks are given).

Reference: lskd.reference.pod_distances. CPU kernel: csrc/cpu/pod_distill.cpp.
CUDA kernel: csrc/cuda/pod_distill.cu. Triton kernel: kernels/pod_distill.py.
Schema: csrc/ops.cpp. This module registers, once for the C++ ops ("lskd::")
and once for the Triton ops ("lskd_triton::"), the fake kernels that
torch.compile needs, and for the Triton ops the autograd formula (backward =
the *_backward op). The C++ ops have C++ autograd kernels (csrc/autograd.cpp),
and the "cpu"/"cuda" backends call lskd::pod_distill, which also reduces over
the batch (one op and one autograd node per call).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _extension, reference
from .._validation import (
    acc_dtype,
    check_pair,
    check_scales,
    pod_embedding_length,
    prepare_masks,
    reduce,
    reduction_code,
)
from ._backends import on_triton_load, resolve_backend

__all__ = ["pod_distill"]


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


def _register(ns: str) -> None:
    forward = f"{ns}::pod_forward"
    backward_op = getattr(torch.ops, ns).pod_backward

    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(f"{ns}::pod_backward")(_fake_backward)
    if ns == "lskd" and _extension.has_cpp_autograd():
        # lskd::pod_forward and lskd::pod_distill have C++ autograd kernels (csrc/autograd.cpp).
        torch.library.register_fake(f"{ns}::pod_distill")(_fake_distill)
        return

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
    _register("lskd")
_FUSED = _extension.has_cpp_autograd()  # lskd::pod_distill exists
on_triton_load(lambda: _register("lskd_triton"))


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
    n, c, h, w = student.shape
    scales = check_scales(op, scales, h, w)
    code = reduction_code(op, reduction)
    if spatial_mask is None and channel_mask is None:
        m = k = None
    else:
        m, k = prepare_masks(op, student, spatial_mask, channel_mask)
    impl = resolve_backend(op, backend, student.device)
    if (impl == "cpu" or impl == "cuda") and _FUSED:
        # One op and one autograd node: the C++ forward and the reduction; the
        # C++ autograd kernel keeps the teacher and the masks out of the graph.
        return torch.ops.lskd.pod_distill(student, teacher, m, k, scales, bool(square), code)
    if impl == "reference":
        acc = acc_dtype(student.dtype)
        dist = reference.pod_distances(
            student.to(acc),
            teacher.to(acc),
            None if m is None else m[:, None],
            k,
            scales,
            bool(square),
        )
    else:
        ops = torch.ops.lskd_triton if impl == "triton" else torch.ops.lskd
        dist, _ = ops.pod_forward(student, teacher.detach(), m, k, list(scales), bool(square))
    return reduce(dist, reduction)
