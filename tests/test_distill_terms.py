"""lskd.distill_terms: several pod/sop terms in one call (one op, one autograd node).

Checked against the single-term functions (same kernels: equal values) and
against the float64 reference; gradients of a weighted sum of the terms, of
one term alone (no backward of the others), with a student shared by two
terms; errors that name the term; opcheck and torch.compile of the op.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import (
    F64,
    POD,
    SOP,
    acc_dtype,
    assert_grad_close,
    assert_rel_close,
    channel_mask,
    dtype_id,
    features,
    mask64,
    random_case,
    spatial_mask,
    tolerance,
)

import lskd
from lskd import PodTerm, SopTerm, reference
from lskd.ops.distill_terms import _prepared

DTYPES = [torch.float32, F64, torch.bfloat16, torch.float16]


def _random_terms(rng: random.Random, backend: str, dtype: torch.dtype, count: int, device="cpu"):
    """``count`` random terms (pod or sop, random shapes, layouts and masks); the last
    sop term (if any) shares the student of a pod term, as LSKD's map 4 does."""
    terms = []
    for i in range(count):
        op = POD if rng.random() < 0.6 else SOP
        s, t, sm, cm, _, params = random_case(op, rng, backend, dtype, device)
        s.requires_grad_(True)
        if op is POD:
            terms.append(PodTerm(s, t, sm, cm, **params))
        else:
            terms.append(SopTerm(s, t, sm, cm, **params))
    pods = [x for x in terms if isinstance(x, PodTerm)]
    if pods:  # one more term on the student (and masks) of a pod term
        p = pods[0]
        c = p.student.shape[1]
        terms.append(
            SopTerm(p.student, p.teacher, p.spatial_mask, p.channel_mask, groups=min(3, c), window=3, stride=2)
        )
    return terms


def _single(term, reduction, backend):
    fn = lskd.pod_distill if isinstance(term, PodTerm) else lskd.sop_distill
    return fn(**term._asdict(), reduction=reduction, backend=backend)


def _students(terms):
    """The distinct student tensors of ``terms`` (by identity), in order."""
    out = []
    for t in terms:
        if not any(t.student is s for s in out):
            out.append(t.student)
    return out


#: The fields of a PodTerm / SopTerm that are tensors; the others are the op's parameters, which
#: its reference takes by the same names.
TENSOR_FIELDS = ("student", "teacher", "spatial_mask", "channel_mask")


def _oracle(term):
    """Float64 reference distance per image [N] of one term, differentiable in a float64 copy."""
    ref = reference.pod_distances if isinstance(term, PodTerm) else reference.sop_distances
    extra = {k: v for k, v in term._asdict().items() if k not in TENSOR_FIELDS}
    return ref, extra


@pytest.mark.cases(default=4, triton=1)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_equals_single_term_calls(backend, case, dtype, rng):
    if backend == "triton" and dtype in (F64, torch.bfloat16):
        pytest.skip("the Triton backend is checked at float32/float16 under the interpreter (slow)")
    terms = _random_terms(rng, backend, dtype, rng.randint(1, 3 if backend == "triton" else 5))
    reduction = rng.choice(["mean", "sum"])
    out = lskd.distill_terms(terms, reduction=reduction, backend=backend)
    assert len(out) == len(terms)
    students = _students(terms)
    weights = [rng.uniform(-2, 2) for _ in terms]
    grads = torch.autograd.grad(sum(w * o for w, o in zip(weights, out)), students)

    single = [_single(t, reduction, backend) for t in terms]
    for i, (a, b) in enumerate(zip(out, single)):
        assert a.dtype == acc_dtype(dtype) and a.shape == ()
        # The same kernels in the same order: the same values, bit for bit.
        assert torch.equal(a, b), f"term {i}: {a.item()} != {b.item()}"
    expected = torch.autograd.grad(sum(w * o for w, o in zip(weights, single)), students)
    for g, e in zip(grads, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, rtol=1e-6 if dtype in (torch.float32, F64) else 1e-2, atol=0)


@pytest.mark.cases(default=3, triton=1)
def test_matches_float64_reference(backend, case, rng):
    # float16 gradients of O(1e-4) underflow without loss scaling: its values are checked in
    # test_equals_single_term_calls (against the single-term functions, tested at float16).
    dtype = rng.choice([torch.float32, torch.bfloat16] if backend != "triton" else [torch.float32])
    terms = _random_terms(rng, backend, dtype, 3)
    out = lskd.distill_terms(terms, backend=backend)
    students = _students(terms)
    weights = [rng.choice([-1.0, 0.5, 2.0]) for _ in terms]
    grads = torch.autograd.grad(sum(w * o for w, o in zip(weights, out)), students)

    copies = {id(s): s.detach().to(F64).requires_grad_(True) for s in students}
    ref_total = 0
    tol = tolerance(backend, dtype)
    for i, (term, w) in enumerate(zip(terms, weights)):
        ref, extra = _oracle(term)
        d = ref(
            copies[id(term.student)],
            term.teacher.to(F64),
            mask64(term.spatial_mask),
            mask64(term.channel_mask),
            **extra,
        ).mean()
        assert_rel_close(out[i], d, tol.dist, f"term {i} ({type(term).__name__}, {backend}, {dtype})")
        ref_total = ref_total + w * d
    expected = torch.autograd.grad(ref_total, [copies[id(s)] for s in students])
    for g, e in zip(grads, expected):
        assert g.dtype == dtype
        assert_grad_close(g, e, tol.grad, f"gradient ({backend}, {dtype})")


def test_gradcheck_float64(backend):
    if backend == "triton":
        pytest.skip("float64 is not a Triton dtype")
    torch.manual_seed(0)
    s1 = torch.randn(2, 6, 8, 7, dtype=F64, requires_grad=True)
    s2 = torch.randn(2, 9, 6, 6, dtype=F64, requires_grad=True)
    t1, t2 = torch.randn_like(s1), torch.randn_like(s2)
    m2 = torch.rand(2, 1, 6, 6, dtype=F64)
    k2 = torch.rand(2, 9) < 0.7

    def f(a, b):
        out = lskd.distill_terms(
            [PodTerm(a, t1, scales=(1, 2)), PodTerm(b, t2, m2, k2), SopTerm(b, t2, m2, k2, groups=3, window=3)],
            backend=backend,
        )
        return tuple(out)

    assert torch.autograd.gradcheck(f, (s1, s2), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(backend, reduction):
    torch.manual_seed(1)
    s, t = features((3, 5, 8, 8), torch.float32), features((3, 5, 8, 8), torch.float32)
    out = lskd.distill_terms([PodTerm(s, t), SopTerm(s, t, groups=5)], reduction=reduction, backend=backend)
    assert out[0].shape == ((3,) if reduction == "none" else ())
    assert torch.equal(out[0], lskd.pod_distill(s, t, reduction=reduction, backend=backend))
    assert torch.equal(out[1], lskd.sop_distill(s, t, groups=5, reduction=reduction, backend=backend))


def test_gradient_of_one_term_runs_only_that_backward(backend):
    """autograd.grad of one term: the other terms' students get nothing (no zero gradients)."""
    torch.manual_seed(2)
    a = features((2, 4, 8, 8), torch.float32).requires_grad_(True)
    b = features((2, 6, 4, 4), torch.float32).requires_grad_(True)
    ta, tb = torch.randn_like(a), torch.randn_like(b)
    out = lskd.distill_terms([PodTerm(a, ta), PodTerm(b, tb), SopTerm(b, tb, groups=2)], backend=backend)
    ga, gb = torch.autograd.grad(out[0], [a, b], allow_unused=True, retain_graph=True)
    assert gb is None
    (expected,) = torch.autograd.grad(lskd.pod_distill(a, ta, backend=backend), a)
    torch.testing.assert_close(ga, expected, rtol=1e-6, atol=0)
    # The shared student of terms 1 and 2 gets the sum of both gradients.
    (g12,) = torch.autograd.grad(out[1] + out[2], b)
    (e1,) = torch.autograd.grad(lskd.pod_distill(b, tb, backend=backend), b)
    (e2,) = torch.autograd.grad(lskd.sop_distill(b, tb, groups=2, backend=backend), b)
    torch.testing.assert_close(g12, e1 + e2, rtol=1e-6, atol=1e-9)


def test_no_grad_and_teacher_never_gets_gradients(backend):
    s, t = features((2, 3, 6, 6), torch.float32), features((2, 3, 6, 6), torch.float32).requires_grad_(True)
    with torch.no_grad():
        (d,) = lskd.distill_terms([PodTerm(s.requires_grad_(True), t)], backend=backend)
    assert d.grad_fn is None
    (d,) = lskd.distill_terms([PodTerm(s, t)], backend=backend)
    d.backward()
    assert t.grad is None and s.grad is not None


def test_bad_input_names_the_term():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert lskd.distill_terms([]) == []
    with pytest.raises(TypeError, match="list of PodTerm/SopTerm"):
        lskd.distill_terms(PodTerm(s, t))
    with pytest.raises(TypeError, match="term 1 must be a PodTerm or SopTerm"):
        lskd.distill_terms([PodTerm(s, t), (s, t)])
    with pytest.raises(ValueError, match=r"distill_terms \(term 1\): teacher has shape"):
        lskd.distill_terms([PodTerm(s, t), PodTerm(s, t[:, :2])])
    with pytest.raises(ValueError, match=r"distill_terms \(term 0\): spatial_mask must have shape \[2, 1, 8, 8\]"):
        lskd.distill_terms([PodTerm(s, t, torch.ones(2, 8, 8))])
    with pytest.raises(ValueError, match=r"distill_terms \(term 1\): groups must be between 1 and"):
        lskd.distill_terms([PodTerm(s, t), SopTerm(s, t, groups=7)])
    with pytest.raises(ValueError, match=r"distill_terms \(term 0\): scale 9 exceeds"):
        lskd.distill_terms([PodTerm(s, t, scales=(9,))])
    with pytest.raises(ValueError, match="reduction must be one of"):
        lskd.distill_terms([PodTerm(s, t)], reduction="avg")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        lskd.distill_terms([PodTerm(s, t)], backend="cuda")


@pytest.mark.skipif(not lskd._extension.has_cpu_kernels(), reason="lskd._C not loaded")
def _packed(term) -> list:
    """A term's params as lskd::distill_terms takes them (kind first), packed by the op's own code."""
    return _prepared("test", term, {})[2]


def test_raw_op_rejects_inconsistent_params():
    s, t = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    op = torch.ops.lskd.distill_terms
    pod = _packed(PodTerm(s, t, scales=(1, 2, 4)))
    with pytest.raises(RuntimeError, match="params describe 2 terms but got 1 students"):
        op([s], [t], [None], [None], pod + pod, 1)
    with pytest.raises(RuntimeError, match="term 0 has kind 5"):
        op([s], [t], [None], [None], [5], 1)
    with pytest.raises(RuntimeError, match="params end inside the .* of term 0"):
        op([s], [t], [None], [None], pod[:-1], 1)
    with pytest.raises(RuntimeError, match="reduction must be 0"):
        op([s], [t], [None], [None], pod, 4)


@pytest.mark.compile
@pytest.mark.skipif(not lskd._extension.has_cpu_kernels(), reason="lskd._C not loaded")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    torch.manual_seed(3)
    s1 = torch.randn(2, 4, 9, 7, requires_grad=requires_grad)
    s2 = torch.randn(2, 6, 5, 5, dtype=torch.bfloat16, requires_grad=requires_grad)
    t1, t2 = torch.randn_like(s1), torch.randn_like(s2)
    m2, k2 = torch.rand(2, 5, 5), (torch.rand(2, 6) < 0.6).float()
    terms = [
        PodTerm(s1, t1, scales=(1, 2)),
        PodTerm(s2, t2, scales=(1,), square=False),
        SopTerm(s2, t2, groups=2, window=3),
    ]
    params = [p for term in terms for p in _packed(term)]
    args = ([s1, s2, s2], [t1, t2, t2], [None, m2, m2], [None, k2, k2], params, 1)
    torch.library.opcheck(torch.ops.lskd.distill_terms.default, args)


@pytest.mark.compile
def test_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(4)
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 6, 4, 4, requires_grad=True)]
    t = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    m = torch.rand(2, 1, 4, 4) > 0.5

    def loss(s0, s1):
        a, b, c = lskd.distill_terms([PodTerm(s0, t[0]), PodTerm(s1, t[1], m), SopTerm(s1, t[1], m, groups=3)])
        return 0.01 * (a + b) + 0.005 * c

    eager = loss(*s)
    ge = torch.autograd.grad(eager, s)
    compiled = torch.compile(loss, fullgraph=True)(*s)
    gc = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_lskd_maps_equal_single_calls(gpu_backend, dtype):
    """The six LSKD maps (scaled: N = 4) on the GPU: equal to the single-term calls; bitwise
    the same in two runs."""
    torch.manual_seed(5)
    shapes = [
        (4, 256, 64, 64),
        (4, 512, 32, 32),
        (4, 1024, 16, 16),
        (4, 2048, 16, 16),
        (4, 256, 16, 16),
        (4, 16, 16, 16),
    ]
    s = [features(sh, dtype, "cuda").requires_grad_(True) for sh in shapes]
    t = [features(sh, dtype, "cuda") for sh in shapes]
    m = [spatial_mask("bool", sh[0], sh[2], sh[3], dtype, "cuda") for sh in shapes]
    k = [channel_mask("bool", sh[0], sh[1], dtype, "cuda") for sh in shapes]
    terms = [PodTerm(s[0], t[0]), PodTerm(s[1], t[1])] + [PodTerm(s[i], t[i], m[i], k[i]) for i in (2, 3, 4)]
    terms += [SopTerm(s[4], t[4], m[4], k[4]), PodTerm(s[5], t[5], m[5])]

    def run(fn):
        out = fn()
        grads = torch.autograd.grad(sum(out), s)
        return [o.detach() for o in out], grads

    out, grads = run(lambda: lskd.distill_terms(terms, backend=gpu_backend))
    out2, grads2 = run(lambda: lskd.distill_terms(terms, backend=gpu_backend))
    single, sgrads = run(lambda: [_single(x, "mean", gpu_backend) for x in terms])
    for a, b, c in zip(out, out2, single):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b, c in zip(grads, grads2, sgrads):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-12)
