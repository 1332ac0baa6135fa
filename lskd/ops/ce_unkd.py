"""ce_unkd: cross-entropy and unbiased KD on bilinearly upsampled logits, fused.

Reference: lskd.reference.ce_unkd_sums. CPU kernel: csrc/cpu/ce_unkd.cpp. CUDA
kernel: csrc/cuda/ce_unkd.cu. Triton kernel: kernels/ce_unkd.py. Schema:
csrc/ce_unkd.cpp. The kernels interpolate the logits to the label resolution on
the fly and never write them there; they return the gradients with respect to the
low-resolution student logits with the losses (the losses are terminal, so the
forward pass computes them, as Liger-Kernel's fused cross-entropy does). This
module registers the fake kernels and the autograd (backward = the saved
gradients times the incoming per-image gradients) of both the C++ ("lskd::") and
the Triton ("lskd_triton::") op.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .. import _extension, reference
from .._dtypes import acc_dtype
from .._validation import check_features
from ._backends import on_triton_load, resolve_backend

__all__ = ["ce_unkd", "CeUnkd"]

OP = "ce_unkd"


class CeUnkd(NamedTuple):
    """Per-image sums over the output pixels, ``[N]`` each (float32; float64 for float64 logits)."""

    ce: torch.Tensor
    unkd: torch.Tensor


def _fake_forward(student, teacher, targets, weight, size, ignore_index, merged, with_grad):
    n = student.shape[0]
    acc = acc_dtype(student.dtype)

    def grad(present: bool) -> torch.Tensor:
        shape = tuple(student.shape) if with_grad and present else (0,)
        return student.new_empty(shape, dtype=acc)

    return (
        student.new_empty((n,), dtype=acc),
        student.new_empty((n,), dtype=acc),
        grad(targets is not None),
        grad(teacher is not None),
    )


def _setup_context(ctx, inputs, output):
    student = inputs[0]
    _ce, _unkd, grad_ce, grad_unkd = output
    ctx.save_for_backward(grad_ce, grad_unkd)
    ctx.dtype = student.dtype
    ctx.set_materialize_grads(False)  # an unused loss gets no zero-filled gradient


def _backward(ctx, g_ce, g_unkd, _g1, _g2):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the saved gradients are constants, a second derivative would be silently 0
        raise RuntimeError(f"{OP}: double backward is not supported (its gradient is computed in the forward pass)")
    grad_ce, grad_unkd = ctx.saved_tensors
    grad = None
    for g, saved in ((g_ce, grad_ce), (g_unkd, grad_unkd)):
        if g is None or saved.numel() == 0:
            continue
        part = g.to(saved.dtype)[:, None, None, None] * saved
        grad = part if grad is None else grad + part
    if grad is not None:
        grad = grad.to(ctx.dtype)
    return grad, None, None, None, None, None, None, None


def _register(namespace: str) -> None:
    name = f"{namespace}::ce_unkd_forward"
    torch.library.register_fake(name)(_fake_forward)
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)


if _extension.has_cpu_kernels():
    _register("lskd")
on_triton_load(lambda: _register("lskd_triton"))


def _check_inputs(student, teacher, targets, weight, size):
    """Shapes, dtypes and devices (module doc); returns the output size ``[H, W]``."""
    check_features(OP, student=student)
    n, k, h, w = student.shape
    if teacher is not None:
        check_features(OP, teacher=teacher)
        o = teacher.shape[1]
        if (teacher.shape[0], teacher.shape[2], teacher.shape[3]) != (n, h, w) or o > k:
            raise ValueError(
                f"{OP}: teacher must have shape [N, O, h, w] = [{n}, O <= {k}, {h}, {w}] like the student, "
                f"got {list(teacher.shape)}"
            )
        if teacher.dtype != student.dtype or teacher.device != student.device:
            raise TypeError(
                f"{OP}: teacher is {teacher.dtype} on {teacher.device}, the student {student.dtype} on {student.device}"
            )
    if targets is not None:
        if targets.dtype != torch.int64 or targets.dim() != 3 or targets.shape[0] != n:
            raise ValueError(f"{OP}: targets must be int64 [N={n}, H, W], got {targets.dtype} {list(targets.shape)}")
        if targets.device != student.device:
            raise ValueError(f"{OP}: targets are on {targets.device}, the student on {student.device}")
        if size is not None and list(size) != list(targets.shape[1:]):
            raise ValueError(f"{OP}: size {list(size)} differs from the targets' {list(targets.shape[1:])}")
        size = targets.shape[1:]
    if size is None:
        raise ValueError(f"{OP}: give the output size (or the targets, which have it)")
    size = [int(s) for s in size]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{OP}: size must be [H, W] with H, W >= 1, got {size}")
    if weight is not None and (not torch.is_tensor(weight) or weight.shape != (n,) or not weight.is_floating_point()):
        raise ValueError(f"{OP}: weight must be a float tensor of shape [N] = [{n}], got {weight!r:.80}")
    return size


def _check_target_values(targets: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Every target in [0, K) or ignore_index. Only for CPU tensors outside torch.compile: on a GPU
    the check would stop the host once per iteration; there the kernels make the image's ce NaN."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= classes))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"{OP}: target value {value} is neither a class of the {classes} logit channels "
            f"nor ignore_index {ignore_index}"
        )


def ce_unkd(
    student: torch.Tensor,
    teacher: Optional[torch.Tensor] = None,
    targets: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    size: Optional[Sequence[int]] = None,
    ignore_index: int = 255,
    backend: str = "auto",
    merged_classes: int = 1,
) -> CeUnkd:
    """Cross-entropy and UNKD of the logits upsampled to the label resolution (docs/MATHEMATICS.md §2.4).

    Args:
        student: logits ``[N, K, h, w]``, float32/float64/bfloat16/float16, any strides. Gradients
            flow to it.
        teacher: None or the teacher's logits ``[N, O, h, w]`` (O <= K), same dtype and device; no
            gradient. None: ``unkd`` is zeros.
        targets: None or labels ``[N, H, W]`` int64 in [0, K) or ``ignore_index``. None: ``ce`` is zeros.
        weight: None or ``[N]``, a per-image factor of the cross-entropy (PLOP's adaptive factor).
        size: the output size ``[H, W]``; default the targets' (required without targets).
        ignore_index: the target value that contributes nothing to ``ce``.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        merged_classes: M in [1, K]. M > 1 makes ``ce`` MiB's unbiased cross-entropy: the classes
            [0, M) (background and the old classes) are one class, so a target y < M costs
            ``logsumexp(z) - logsumexp(z[:M])``. 1: the plain cross-entropy.

    Returns:
        :class:`CeUnkd` of per-image SUMS over the ``H * W`` output pixels: ``ce[n] = sum of
        weight[n] * (logsumexp(z) - z[y])`` over non-ignored pixels (``logsumexp(z[:M])`` in place of
        ``z[y]`` when y < M), ``unkd[n] = sum over all pixels of
        -(1/O) (P_0 log q_bg + sum_{c=1}^{O-1} P_c log q_c)``, with z the bilinearly upsampled student
        logits (align_corners=False, torch's rule) and P the softmax of the upsampled teacher's.
        Divide by ``N * H * W`` for the means PLOP, MiB and LSKD use.
    """
    size = _check_inputs(student, teacher, targets, weight, size)
    if teacher is None and targets is None:
        raise ValueError(f"{OP}: give the teacher's logits, the targets or both (nothing to compute)")
    merged = int(merged_classes)
    if not 1 <= merged <= student.shape[1]:
        raise ValueError(f"{OP}: merged_classes must be in [1, K = {student.shape[1]}], got {merged_classes}")
    acc = acc_dtype(student.dtype)
    if weight is not None:
        weight = weight.detach().to(device=student.device, dtype=acc).contiguous()
    if targets is not None:
        targets = targets.contiguous()
        if targets.device.type == "cpu" and not torch.compiler.is_compiling():  # a value check breaks graphs
            _check_target_values(targets, student.shape[1], ignore_index)
    impl = resolve_backend(OP, backend, student.device)
    if impl == "reference":
        t = None if teacher is None else teacher.to(acc)
        return CeUnkd(*reference.ce_unkd_sums(student.to(acc), t, targets, weight, size, ignore_index, merged))
    with_grad = student.requires_grad and torch.is_grad_enabled()
    teacher = None if teacher is None else teacher.detach()
    ops = torch.ops.lskd_triton if impl == "triton" else torch.ops.lskd
    ignore_index = int(ignore_index)
    if merged > 1 and teacher is not None and targets is not None:
        # the kernels keep one merged channel group per call: UNKD's background or the CE's [0, M)
        ce = ops.ce_unkd_forward(student, None, targets, weight, size, ignore_index, merged, with_grad)[0]
        unkd = ops.ce_unkd_forward(student, teacher, None, None, size, ignore_index, 1, with_grad)[1]
        return CeUnkd(ce, unkd)
    merged = merged if targets is not None else 1
    ce, unkd, _, _ = ops.ce_unkd_forward(student, teacher, targets, weight, size, ignore_index, merged, with_grad)
    return CeUnkd(ce, unkd)
