"""ce_unkd (cross-entropy and UNKD on upsampled logits, fused) against its float64 reference.

* every backend on random cases: shapes (upsampling by non-integer factors, identity,
  downsampling), K up to 151, O <= K, ignored pixels, per-image weights, the teacher or the targets
  alone, the plain or the unbiased CE (merged classes), all four dtypes and four layouts; values
  and the gradient of a random combination;
* the reference itself against the methods' eager definitions (CE of lskd.methods.base, MiB's
  unbiased_cross_entropy and unbiased_kd on F.interpolate'd logits);
* gradcheck, opcheck, torch.compile, no-grad calls, determinism on the CPU, clear errors, and an
  out-of-range target that reaches a kernel giving NaN;
* the same random cases on a GPU (marked gpu).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, LAYOUTS, assert_grad_close, assert_rel_close, dtype_id, to_layout

import lskd
from lskd import reference
from lskd._dtypes import acc_dtype
from lskd.methods.base import cross_entropy
from lskd.methods.mib import unbiased_cross_entropy, unbiased_kd

F64 = torch.float64
IGNORE = 255
#: Relative error of the per-image sums (float32 accumulation from exactly upcast inputs) and
#: relative norm error of the gradient (rounded to the input dtype: 2^-9 for bf16, 2^-12 for f16).
VALUE_TOL = {F64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {F64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def _sizes(rng: random.Random, small: bool):
    """``(h, w, H, W)``: upsampling by a non-integer factor, the identity or downsampling."""
    h, w = rng.randint(1, 5 if small else 12), rng.randint(1, 5 if small else 12)
    kind = rng.choice(["up", "up", "same", "down"])
    if kind == "same":
        return h, w, h, w
    if kind == "down":
        return h + 3, w + 4, max(1, h - 1), rng.randint(1, w + 2)
    top = 3 if small else 8
    return h, w, h * rng.randint(1, top) + rng.randint(0, 3), w * rng.randint(1, top) + rng.randint(0, 3)


def random_inputs(rng: random.Random, dtype: torch.dtype, layout: str, small: bool, device="cpu", k=None):
    """``(student, teacher or None, targets or None, weight or None, size)`` of one random case."""
    n = rng.randint(1, 3)
    k = k or rng.randint(1, 12 if small else 40)
    o = rng.randint(1, k)
    h, w, hh, ww = _sizes(rng, small)
    student = to_layout((torch.randn(n, k, h, w) * rng.choice([1.0, 4.0])).to(dtype), layout).to(device)
    teacher = None if rng.random() < 0.2 else (torch.randn(n, o, h, w) * 3).to(dtype).to(device)
    targets = None
    if teacher is None or rng.random() < 0.8:
        targets = torch.randint(0, k, (n, hh, ww))
        targets[torch.rand(n, hh, ww) < rng.choice([0.0, 0.3, 1.0])] = IGNORE
        targets = targets.to(device)
    weight = torch.rand(n, device=device) if rng.random() < 0.5 else None
    return student, teacher, targets, weight, (hh, ww)


def random_merged(rng: random.Random, k: int) -> int:
    """The CE's merged classes M: plain (1) half of the time, else any M in [1, K - 1] (M = K makes
    the CE 0 with a zero gradient, which a relative gradient check cannot judge)."""
    return 1 if rng.random() < 0.5 else rng.randint(1, max(1, k - 1))


def check_case(backend, student, teacher, targets, weight, size, rng, merged: int = 1) -> None:
    """Values and the gradient of ``a * ce + b * unkd`` (random per-image a, b) against the float64
    reference on the same (upcast) inputs."""
    dtype = student.dtype
    student = student.detach().requires_grad_()
    got = lskd.ce_unkd(student, teacher, targets, weight, size, IGNORE, backend=backend, merged_classes=merged)
    n = student.shape[0]
    a, b = torch.rand(n, dtype=F64), torch.rand(n, dtype=F64)
    (got.ce.double().cpu() * a + got.unkd.double().cpu() * b).sum().backward()
    s64 = student.detach().double().cpu().requires_grad_()
    t64 = None if teacher is None else teacher.double().cpu()
    w64 = None if weight is None else weight.double().cpu()
    y = None if targets is None else targets.cpu()
    ce, unkd = reference.ce_unkd_sums(s64, t64, y, w64, size, IGNORE, merged)
    (ce * a + unkd * b).sum().backward()
    for name, g, e in (("ce", got.ce, ce), ("unkd", got.unkd, unkd)):
        assert g.dtype == acc_dtype(dtype) and g.shape == (n,), (name, g.dtype, g.shape)
        assert_rel_close(g, e, VALUE_TOL[dtype], name)
    assert student.grad is not None and student.grad.dtype == dtype
    assert_grad_close(student.grad, s64.grad, GRAD_TOL[dtype])


def check_raw_op(op, student, teacher, targets, weight, size, merged: int = 1) -> None:
    """The raw op ``op`` (lskd::ce_unkd_forward or its emulated CUDA twin): values and both returned
    gradients against the float64 reference's autograd on the same (upcast) inputs."""
    acc = acc_dtype(student.dtype)
    w = None if weight is None else weight.to(acc)
    ce, unkd, grad_ce, grad_unkd = op(student, teacher, targets, w, list(size), IGNORE, merged, True)
    s64 = student.detach().double().requires_grad_()
    t64 = None if teacher is None else teacher.double()
    w64 = None if weight is None else weight.double()
    ref = reference.ce_unkd_sums(s64, t64, targets, w64, size, IGNORE, merged)
    for name, g, e, grad, present in (
        ("ce", ce, ref[0], grad_ce, targets is not None),
        ("unkd", unkd, ref[1], grad_unkd, teacher is not None),
    ):
        assert_rel_close(g, e, VALUE_TOL[student.dtype], name)
        if not present:
            assert grad.numel() == 0, name
            continue
        (expected,) = torch.autograd.grad(e.sum(), s64, retain_graph=True)
        assert grad.dtype == acc and grad.is_contiguous(), name
        assert_grad_close(grad, expected, VALUE_TOL[student.dtype] * 10, f"grad_{name}")


@pytest.mark.cases(default=12, triton=4)
def test_random_cases(backend, case, seed):
    rng = random.Random(seed)
    dtype = DTYPES[case % len(DTYPES)]
    layout = LAYOUTS[(case // len(DTYPES)) % len(LAYOUTS)]
    inputs = random_inputs(rng, dtype, layout, small=backend == "triton")
    check_case(backend, *inputs, rng, merged=random_merged(rng, inputs[0].shape[1]))


@pytest.mark.cases(default=6, triton=3)
def test_unbiased_ce_with_unkd(backend, case, seed):
    """The unbiased CE (merged classes [0, M), M > 1) with UNKD in one call, as MiB makes it: the
    kernels compute it in two passes of the op (one merged group each)."""
    rng = random.Random(seed)
    dtype = DTYPES[case % len(DTYPES)]
    k = rng.randint(3, 12)
    student, teacher, targets, weight, size = random_inputs(rng, dtype, LAYOUTS[case % len(LAYOUTS)], True, k=k)
    n = student.shape[0]
    if teacher is None or teacher.shape[1] == 1:  # one teacher class: UNKD is 0, with no gradient
        teacher = torch.randn(n, rng.randint(2, k), *student.shape[2:]).to(dtype)
    targets = torch.randint(0, k, (n, *size))  # valid targets: the CE has a gradient to compare
    check_case(backend, student, teacher, targets, weight, size, rng, merged=rng.randint(2, k - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_many_classes(backend, dtype, seed):
    """K = 151 (ADE20K with the background): the kernels loop over channel blocks."""
    rng = random.Random(seed)
    student, teacher, targets, weight, size = random_inputs(rng, dtype, "channels_last", small=True, k=151)
    if teacher is None:
        teacher = torch.randn(student.shape[0], 100, *student.shape[2:]).to(dtype)
    check_case(backend, student, teacher, targets, weight, size, rng)


def test_reference_is_the_methods_losses(seed):
    """The reference sums, divided by N*H*W, are the methods' eager CE (mean over all pixels, per-image
    factor) and MiB's UNKD on F.interpolate'd logits."""
    s = torch.randn(2, 6, 5, 7, dtype=F64)
    t = torch.randn(2, 4, 5, 7, dtype=F64)
    y = torch.randint(0, 6, (2, 17, 19))
    y[:, :3] = IGNORE
    w = torch.rand(2, dtype=F64)
    ce, unkd = reference.ce_unkd_sums(s, t, y, w, (17, 19), IGNORE)
    pixels = y.numel()
    # a per-pixel weight takes cross_entropy's eager path (F.cross_entropy on upsampled logits)
    eager_ce = cross_entropy(s, y, IGNORE, pixel_weight=w[:, None, None].expand(2, 17, 19), mean_over="all")
    up = lambda x: F.interpolate(x, size=(17, 19), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(ce.sum() / pixels, eager_ce, rtol=1e-12, atol=0)
    fused_ce = cross_entropy(s, y, IGNORE, pixel_weight=w[:, None, None], mean_over="all")
    torch.testing.assert_close(fused_ce, eager_ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(unkd.sum() / pixels, unbiased_kd(up(s), up(t)), rtol=1e-12, atol=0)
    for merged in (1, 3, 6):  # merged classes: MiB's UNCE (sum over valid pixels / all pixels)
        unce, _ = reference.ce_unkd_sums(s, None, y, None, (17, 19), IGNORE, merged)
        eager = unbiased_cross_entropy(s, y, merged, IGNORE)
        torch.testing.assert_close(unce.sum() / pixels, eager, rtol=1e-12, atol=0)


def test_no_grad_and_determinism(backend, seed):
    rng = random.Random(seed)
    student, teacher, targets, weight, size = random_inputs(rng, torch.float32, "contiguous", small=True)
    with_grad = lskd.ce_unkd(student.requires_grad_(), teacher, targets, weight, size, backend=backend)
    with torch.no_grad():
        plain = lskd.ce_unkd(student, teacher, targets, weight, size, backend=backend)
    assert plain.ce.grad_fn is None and plain.unkd.grad_fn is None
    if backend in ("cpu", "reference"):  # the GPU kernels add with atomics
        assert torch.equal(plain.ce, with_grad.ce.detach()) and torch.equal(plain.unkd, with_grad.unkd.detach())


def test_unused_term_gets_no_gradient(backend):
    """Backward through ce alone equals the gradient of ce computed alone (unkd's saved gradient unused)."""
    s = torch.randn(2, 5, 4, 4, requires_grad=True)
    t, y = torch.randn(2, 3, 4, 4), torch.randint(0, 5, (2, 9, 9))
    both = lskd.ce_unkd(s, t, y, backend=backend)
    (g_both,) = torch.autograd.grad(both.ce.sum(), s)
    (g_alone,) = torch.autograd.grad(lskd.ce_unkd(s, None, y, backend=backend).ce.sum(), s)
    # Not bitwise: with a teacher the kernels take the background exps relative to the background
    # max, so the softmax rounds differently. A leaked unkd gradient would be of the size of g itself.
    torch.testing.assert_close(g_both, g_alone, rtol=1e-5, atol=1e-6)


def test_double_backward_refused(compiled_backend):
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    out = lskd.ce_unkd(s, None, torch.zeros(1, 3, 3, dtype=torch.int64), backend=compiled_backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.ce.sum(), s, create_graph=True)


@pytest.mark.parametrize("merged", [1, 3])
def test_gradcheck(backend, merged):
    s = torch.randn(2, 4, 3, 4, dtype=F64, requires_grad=True)
    t, y, w = torch.randn(2, 3, 3, 4, dtype=F64), torch.randint(0, 4, (2, 7, 5)), torch.rand(2, dtype=F64)
    y[0, 0] = IGNORE

    def fn(x):
        out = lskd.ce_unkd(x, t, y, w, backend=backend, merged_classes=merged)
        return out.ce, out.unkd

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def _raw_op(backend):
    return torch.ops.lskd_triton.ce_unkd_forward if backend == "triton" else torch.ops.lskd.ce_unkd_forward


@pytest.mark.compile
def test_opcheck(compiled_backend):
    op = _raw_op(compiled_backend)
    s = torch.randn(2, 5, 3, 4, requires_grad=True)
    t, y, w = torch.randn(2, 3, 3, 4), torch.randint(0, 5, (2, 6, 7)), torch.rand(2)
    for args in (
        (s, t, y, w, [6, 7], IGNORE, 1, True),
        (s, None, y, None, [6, 7], IGNORE, 1, False),
        (s, None, y, w, [6, 7], IGNORE, 3, True),
        (s, t, None, None, [5, 5], IGNORE, 1, True),
    ):
        torch.library.opcheck(op, args)


@pytest.mark.compile
def test_compile_matches_eager(compiled_backend):
    s = torch.randn(2, 5, 4, 4, requires_grad=True)
    t, y, w = torch.randn(2, 3, 4, 4), torch.randint(0, 5, (2, 9, 11)), torch.rand(2)

    def loss(x):
        out = lskd.ce_unkd(x, t, y, w, backend=compiled_backend)
        return out.ce.mean() + 10 * out.unkd.mean()

    eager = loss(s)
    (g_eager,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(loss, fullgraph=True)(s)
    (g_compiled,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


def test_out_of_range_target_in_kernel_is_nan(compiled_backend):
    """The wrapper rejects bad targets on the CPU; a kernel that gets one (a GPU call, unchecked there
    to keep the host out of the iteration) makes that image's ce NaN, never a number."""
    s, y = torch.randn(2, 3, 2, 2), torch.zeros(2, 4, 4, dtype=torch.int64)
    y[1, 2, 2] = 7
    ce = _raw_op(compiled_backend)(s, None, y, None, [4, 4], IGNORE, 1, False)[0]
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1])


@pytest.mark.parametrize("merged,teacher,match", [(0, False, "merged"), (4, False, "merged"), (2, True, "teacher")])
def test_raw_op_merged_errors(compiled_backend, merged, teacher, match):
    """The raw op takes M in [1, K], and M > 1 only without a teacher (the wrapper splits the call)."""
    s, y = torch.randn(2, 3, 2, 2), torch.zeros(2, 4, 4, dtype=torch.int64)
    t = torch.randn(2, 2, 2, 2) if teacher else None
    with pytest.raises((ValueError, RuntimeError), match=match):
        _raw_op(compiled_backend)(s, t, y, None, [4, 4], IGNORE, merged, False)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(targets=torch.full((2, 4, 4), 9)), "target value 9"),
        (dict(targets=torch.full((2, 4, 4), -1)), "target value -1"),
        (dict(targets=torch.zeros(2, 4, 4, dtype=torch.int32)), "int64"),
        (dict(teacher=torch.randn(2, 6, 3, 3)), "teacher must have shape"),
        (dict(teacher=torch.randn(2, 2, 3, 3, dtype=F64)), "teacher is torch.float64"),
        (dict(size=(5, 5)), "differs from the targets"),
        (dict(weight=torch.ones(3)), "weight must be"),
        (dict(teacher=None, targets=None, size=(4, 4)), "nothing to compute"),
        (dict(targets=None), "give the output size"),
        (dict(student=torch.randn(2, 5, 3)), r"shape \[N, C, H, W\]"),
        (dict(merged_classes=0), "merged_classes must be in"),
        (dict(merged_classes=6), "merged_classes must be in"),
    ],
)
def test_clear_errors(change, match):
    args = dict(student=torch.randn(2, 5, 3, 3), teacher=torch.randn(2, 2, 3, 3), targets=torch.zeros(2, 4, 4).long())
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        lskd.ce_unkd(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(8))
def test_random_cases_gpu(gpu_backend, case, seed):
    rng = random.Random(seed)
    dtype = DTYPES[case % len(DTYPES)]
    inputs = random_inputs(rng, dtype, LAYOUTS[case % len(LAYOUTS)], small=False, device="cuda")
    check_case(gpu_backend, *inputs, rng, merged=random_merged(rng, inputs[0].shape[1]))


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_mib_unkd_is_the_eager_one(alpha):
    """MiB's fused UNKD term (teacher scaled by alpha before the op) equals unbiased_kd on upsampled logits."""
    from lskd.methods import MiB, StepContext
    from lskd.models.deeplab import SegOutput

    s, t = torch.randn(2, 5, 4, 6, dtype=F64), torch.randn(2, 3, 4, 6, dtype=F64)
    labels = torch.randint(0, 5, (2, 13, 17))
    ctx = StepContext(step=1, old_classes=3, new_classes=2)
    mib = MiB(alpha=alpha)
    terms = mib.incremental_terms(None, labels, SegOutput(logits=s, maps=[]), SegOutput(logits=t, maps=[]), ctx)
    up = lambda x: F.interpolate(x, size=(13, 17), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(terms["unkd"], mib.kd_factor * unbiased_kd(up(s), up(t), alpha), rtol=1e-10, atol=0)


@pytest.mark.parametrize("mean_over", ["all", "valid"])
def test_mib_unce_is_the_eager_one(mean_over, seed):
    """MiB's fused UNCE term (lskd.ce_unkd with the old classes merged) equals unbiased_cross_entropy,
    with ignored pixels, under both normalisations."""
    from lskd.methods import MiB, StepContext
    from lskd.models.deeplab import SegOutput

    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(2, 6, 4, 6, dtype=F64, generator=g), torch.randn(2, 4, 4, 6, dtype=F64, generator=g)
    labels = torch.randint(0, 6, (2, 13, 17), generator=g)
    labels[:, :2] = IGNORE
    ctx = StepContext(step=1, old_classes=4, new_classes=2)
    terms = MiB(mean_over=mean_over).incremental_terms(
        None, labels, SegOutput(logits=s, maps=[]), SegOutput(logits=t, maps=[]), ctx
    )
    eager = unbiased_cross_entropy(s, labels, 4, IGNORE, mean_over)
    torch.testing.assert_close(terms["unce"], eager, rtol=1e-10, atol=0)
