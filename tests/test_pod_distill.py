"""pod_distill (Local POD / MD): every available backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    DTYPES_TRITON,
    F64,
    LAYOUTS,
    MASK_COMBOS,
    MASK_COMBOS_TRITON,
    POD,
    REDUCTIONS,
    TOLERANCES,
    assert_rel_close,
    channel_mask,
    check_against_reference,
    check_all_masked_image,
    check_deterministic,
    check_module,
    check_nan_propagates,
    check_no_grad_to_teacher_and_masks,
    check_zero_distance,
    dtype_id,
    features,
    random_case,
    raw_ops,
    small_shape,
    spatial_mask,
)

import lskd

DT = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


@pytest.mark.cases(default=6, triton=2)
@DT
def test_random_cases_match_reference(backend, case, dtype, rng):
    student, teacher, sm, cm, reduction, params = random_case(POD, rng, backend, dtype)
    check_against_reference(POD, backend, student, teacher, sm, cm, reduction, **params)


@pytest.mark.backend_params("sk,ck", MASK_COMBOS, triton=MASK_COMBOS_TRITON)
def test_mask_kinds(backend, sk, ck):
    n, c, h, w = small_shape(backend)
    dtype = torch.float32
    s, t = features((n, c, h, w), dtype), features((n, c, h, w), dtype)
    sm, cm = spatial_mask(sk, n, h, w, dtype), channel_mask(ck, n, c, dtype)
    out, grad = check_against_reference(POD, backend, s, t, sm, cm, "none", scales=(1, 2, 4), square=True)
    if "zeros" in (sk, ck):
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_layouts(backend, layout, dtype):
    shape = small_shape(backend)
    n, c, h, w = shape
    other = LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)]
    s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=other)
    sm, cm = spatial_mask("float", n, h, w, dtype), channel_mask("bool", n, c, dtype)
    check_against_reference(POD, backend, s, t, sm, cm, "none", scales=(1, 3), square=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("square", (True, False))
def test_reductions_and_square(backend, reduction, square):
    shape = small_shape(backend)
    s, t = features(shape, torch.float64), features(shape, torch.float64)
    check_against_reference(POD, backend, s, t, None, None, reduction, scales=(1, 2), square=square)


EDGE_CASES = [
    ((1, 1, 1, 1), (1,)),
    ((1, 3, 1, 9), (1,)),
    ((2, 5, 7, 7), (7,)),  # regions of one pixel
    ((1, 2, 23, 3), (1, 3)),  # tall, remainder rows
    ((3, 4, 5, 6), (2, 4, 5)),  # remainders at every scale
    ((1, 300, 6, 5), (1, 2)),
    ((1, 1, 70, 69), (1, 2, 4, 8)),
]
EDGE_PARAMS = [(shape, scales, dtype) for shape, scales in EDGE_CASES for dtype in (torch.float32, F64)]
EDGE_PARAMS_TRITON = [(shape, scales, torch.float32) for shape, scales in EDGE_CASES if shape[0] * shape[1] <= 12]


@pytest.mark.backend_params("shape,scales,dtype", EDGE_PARAMS, triton=EDGE_PARAMS_TRITON)
def test_edge_shapes(backend, shape, scales, dtype):
    n, c, h, w = shape
    s, t = features(shape, dtype), features(shape, dtype)
    sm = spatial_mask("float", n, h, w, dtype)
    check_against_reference(POD, backend, s, t, sm, None, "none", scales=scales, square=True)
    check_against_reference(POD, backend, s, t, None, None, "sum", scales=scales, square=False)


@pytest.mark.backend_params("dtype", DTYPES, triton=DTYPES_TRITON)
def test_zero_distance_has_zero_gradient(backend, dtype):
    variants = [dict(scales=(1, 2, 4), square=True), dict(scales=(3,), square=False)]
    check_zero_distance(POD, backend, dtype, small_shape(backend), variants)


def test_all_masked_image_has_zero_distance_and_gradient(backend):
    check_all_masked_image(POD, backend, small_shape(backend), scales=(1, 2))


@pytest.mark.backend_params("dtype", (torch.float32, F64, torch.bfloat16), triton=(torch.bfloat16,))
def test_nan_in_student_gives_nan(backend, dtype):
    check_nan_propagates(POD, backend, dtype, small_shape(backend))


GRADCHECK = [(True, False), (True, True), (False, False), (False, True)]


@pytest.mark.backend_params("square,masked", GRADCHECK, triton=GRADCHECK[1:3])
def test_gradcheck(backend, square, masked):
    shape = (2, 2, 5, 4)
    n, c, h, w = shape
    s = features(shape, F64).requires_grad_(True)
    t = features(shape, F64)
    sm = spatial_mask("float", n, h, w, F64) if masked else None
    cm = channel_mask("bool", n, c, F64) if masked else None

    def fn(x):
        return lskd.pod_distill(x, t, sm, cm, scales=(1, 2, 4), square=square, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (s,), fast_mode=backend == "triton")


def plop_local_pod(x: torch.Tensor, scales) -> torch.Tensor:
    """The release's Local POD embedding (PLOP style), written literally."""
    b = x.shape[0]
    w = x.shape[-1]
    emb = []
    for scale in scales:
        k = w // scale
        for i in range(scale):
            for j in range(scale):
                tensor = x[..., i * k : (i + 1) * k, j * k : (j + 1) * k]
                horizontal_pool = tensor.mean(dim=3).view(b, -1)
                vertical_pool = tensor.mean(dim=2).view(b, -1)
                emb.append(horizontal_pool)
                emb.append(vertical_pool)
    return torch.cat(emb, dim=1)


def plop_distance(a, b, m=None, n=None, scales=(1, 2, 4), square=True):
    if m is not None:
        a, b = a * m, b * m
    if n is not None:
        a, b = a * n[:, :, None, None], b * n[:, :, None, None]
    if square:
        a, b = a.pow(2), b.pow(2)
    return torch.linalg.vector_norm(plop_local_pod(a, scales) - plop_local_pod(b, scales), dim=-1)


@pytest.mark.parametrize("masked", (False, True))
def test_release_parity(backend, masked):
    sides = (4, 8) if backend == "triton" else (4, 8, 16, 32, 64)
    for side in sides:
        n, c = 2, 5
        s, t = features((n, c, side, side), F64), features((n, c, side, side), F64)
        sm = spatial_mask("bool", n, side, side, F64) if masked else None
        cm = channel_mask("float", n, c, F64) if masked else None
        for square in (True, False):
            x = s.clone().requires_grad_(True)
            out = lskd.pod_distill(x, t, sm, cm, scales=(1, 2, 4), square=square, reduction="none", backend=backend)
            y = s.clone().requires_grad_(True)
            exp = plop_distance(y, t, None if sm is None else sm.to(F64), cm, (1, 2, 4), square)
            torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-14)
            go = torch.randn(n, dtype=F64)
            out.backward(go)
            exp.backward(go)
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_deterministic(backend, dtype):
    check_deterministic(POD, backend, dtype, small_shape(backend), scales=(1, 2, 4))


def test_teacher_and_masks_get_no_gradient(backend):
    check_no_grad_to_teacher_and_masks(POD, backend, small_shape(backend))


def test_module_matches_function(backend):
    variants = [dict(), dict(scales=(1, 3), square=False, reduction="none"), dict(reduction="sum")]
    if backend == "triton":
        variants = variants[1:2]
    check_module(POD, lskd.nn.PODDistillLoss, backend, small_shape(backend), variants)


def schema_embedding(z: torch.Tensor, scales) -> torch.Tensor:
    """emb [N, C, L] laid out as in csrc/ops.cpp: per scale, width pools (j, r) then height pools (i, q)."""
    n, c, h, w = z.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        zs = z[:, :, : s * kh, : s * kw]
        parts.append(zs.reshape(n, c, s * kh, s, kw).mean(-1).transpose(2, 3).reshape(n, c, -1))
        parts.append(zs.reshape(n, c, s, kh, s * kw).mean(3).reshape(n, c, -1))
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "strided"))
@pytest.mark.parametrize("dtype", (torch.float32, F64, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("square", (True, False))
def test_raw_op_contract(compiled_backend, layout, dtype, square):
    """pod_forward -> (dist [N], emb [N, C, L]) in the acc dtype, laid out as the schema says;
    pod_backward -> gradient with the dtype and strides of empty_like(student)."""
    ops = raw_ops(compiled_backend)
    shape = small_shape(compiled_backend)
    n, c, h, w = shape
    acc = torch.float64 if dtype == F64 else torch.float32
    s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=layout)
    m, k = torch.rand(n, h, w, dtype=acc), (torch.rand(n, c) < 0.7).to(acc)
    scales = [1, 2, 3]
    dist, emb = ops.pod_forward(s, t, m, k, scales, square)
    xa = s.double() * m[:, None].double() * k[:, :, None, None].double()
    xb = t.double() * m[:, None].double() * k[:, :, None, None].double()
    z = xa * xa - xb * xb if square else xa - xb
    exp_emb = schema_embedding(z, scales)
    assert dist.dtype == acc and dist.shape == (n,)
    assert emb.dtype == acc and emb.shape == exp_emb.shape
    tol = TOLERANCES[dtype].dist
    torch.testing.assert_close(emb.double(), exp_emb, rtol=tol, atol=tol * exp_emb.abs().max().item())
    assert_rel_close(dist, exp_emb.flatten(1).norm(dim=1), tol, "dist")
    g = ops.pod_backward(torch.ones(n, dtype=acc), s, m, k, dist, emb, scales, square)
    assert g.dtype == dtype and g.shape == s.shape
    if layout != "strided":
        assert g.stride() == torch.empty_like(s).stride(), (g.stride(), s.stride())
