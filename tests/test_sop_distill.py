"""sop_distill (MCD, second-order context pooling): every available backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    DTYPES_TRITON,
    F64,
    LAYOUTS,
    MASK_COMBOS,
    MASK_COMBOS_TRITON,
    REDUCTIONS,
    SOP,
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
    random_shape,
    random_sop_params,
    raw_ops,
    small_shape,
    spatial_mask,
)

import lskd

DT = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
# (window, stride): global, and windows 3 / 5 with strides 1 / 2 (padding window // 2).
GEOMETRIES = [(None, 1), (3, 1), (3, 2), (5, 1), (5, 2)]


@pytest.mark.cases(default=6, triton=2)
@DT
def test_random_cases_match_reference(backend, case, dtype, rng):
    student, teacher, sm, cm, reduction, params = random_case(SOP, rng, backend, dtype)
    check_against_reference(SOP, backend, student, teacher, sm, cm, reduction, **params)


GRID = [(g, win, st) for g in (1, 3, 4, 10) for win, st in GEOMETRIES]
GRID_TRITON = [(1, None, 1), (3, 3, 2), (4, 5, 1), (3, 5, 2), (2, 3, 1)]


@pytest.mark.backend_params("groups,window,stride", GRID, triton=GRID_TRITON)
def test_groups_window_stride(backend, groups, window, stride):
    """groups 1..C (also not dividing C: the remainder channels get no gradient), every pooling geometry."""
    shape = small_shape(backend)
    n, c, h, w = shape
    s, t = features(shape, F64, layout="channels_last"), features(shape, F64)
    sm = spatial_mask("float", n, h, w, F64)
    _, grad = check_against_reference(SOP, backend, s, t, sm, None, "none", groups=groups, window=window, stride=stride)
    k = c // groups
    assert torch.equal(grad[:, groups * k :], torch.zeros_like(grad[:, groups * k :]))


@pytest.mark.backend_params("sk,ck", MASK_COMBOS, triton=MASK_COMBOS_TRITON)
def test_mask_kinds(backend, sk, ck):
    n, c, h, w = small_shape(backend)
    dtype = torch.float32
    s, t = features((n, c, h, w), dtype), features((n, c, h, w), dtype)
    sm, cm = spatial_mask(sk, n, h, w, dtype), channel_mask(ck, n, c, dtype)
    out, grad = check_against_reference(SOP, backend, s, t, sm, cm, "none", groups=2, window=5, stride=2)
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
    check_against_reference(SOP, backend, s, t, sm, cm, "none", groups=3, window=3, stride=2)
    check_against_reference(SOP, backend, s, t, sm, cm, "none", groups=1, window=None, stride=1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions(backend, reduction):
    shape = small_shape(backend)
    s, t = features(shape, F64), features(shape, F64)
    check_against_reference(SOP, backend, s, t, None, None, reduction, groups=2, window=5, stride=2)


EDGE_CASES = [
    ((1, 1, 1, 1), dict(groups=1, window=3, stride=1)),
    ((1, 2, 2, 3), dict(groups=1, window=5, stride=2)),  # window larger than the map
    ((2, 7, 1, 13), dict(groups=3, window=3, stride=2)),  # one row, C % groups != 0
    ((1, 5, 6, 5), dict(groups=5, window=None, stride=1)),  # k = 1, global
    ((3, 300, 4, 4), dict(groups=20, window=5, stride=2)),  # released defaults
    ((1, 40, 70, 1), dict(groups=40, window=3, stride=1)),  # one column
    ((2, 9, 13, 2), dict(groups=2, window=None, stride=2)),  # global ignores the stride
]
EDGE_PARAMS = [(shape, p, dtype) for shape, p in EDGE_CASES for dtype in (torch.float32, F64)]
EDGE_PARAMS_TRITON = [(shape, p, torch.float32) for shape, p in EDGE_CASES if shape[0] * shape[1] <= 18]


@pytest.mark.backend_params("shape,params,dtype", EDGE_PARAMS, triton=EDGE_PARAMS_TRITON)
def test_edge_shapes(backend, shape, params, dtype):
    n, c, h, w = shape
    s, t = features(shape, dtype), features(shape, dtype)
    sm = spatial_mask("float", n, h, w, dtype)
    check_against_reference(SOP, backend, s, t, sm, None, "none", **params)
    check_against_reference(SOP, backend, s, t, None, None, "sum", **params)


SOP_VARIANTS = [
    dict(groups=2, window=5, stride=2),
    dict(groups=3, window=None, stride=1),
    dict(groups=1, window=3, stride=1),
]


@pytest.mark.backend_params("dtype", DTYPES, triton=DTYPES_TRITON)
def test_zero_distance_has_zero_gradient(backend, dtype):
    check_zero_distance(SOP, backend, dtype, small_shape(backend), SOP_VARIANTS)


def test_all_masked_image_has_zero_distance_and_gradient(backend):
    check_all_masked_image(SOP, backend, small_shape(backend), groups=2, window=3, stride=2)


@pytest.mark.backend_params("dtype", (torch.float32, F64, torch.bfloat16), triton=(torch.bfloat16,))
def test_nan_in_student_gives_nan(backend, dtype):
    check_nan_propagates(SOP, backend, dtype, small_shape(backend), groups=2, window=3, stride=2)
    check_nan_propagates(SOP, backend, dtype, small_shape(backend), groups=1, window=None, stride=1)


GRADCHECK = [(1, None, 1), (2, 3, 2), (3, 5, 1), (2, 5, 2)]


@pytest.mark.backend_params("groups,window,stride", GRADCHECK, triton=GRADCHECK[1:3])
def test_gradcheck(backend, groups, window, stride):
    shape = (2, 5, 5, 4)
    n, c, h, w = shape
    s = features(shape, F64).requires_grad_(True)
    t = features(shape, F64)
    sm = spatial_mask("float", n, h, w, F64)
    cm = channel_mask("bool", n, c, F64)

    def fn(x):
        return lskd.sop_distill(x, t, sm, cm, groups, window, stride, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (s,), fast_mode=backend == "triton")


def explicit_sop_distance(a, b, m, n, groups, window, stride):
    """MCD written out: masks, F.avg_pool2d, explicit k x k outer products, Frobenius norm."""

    def embed(x):
        if m is not None:
            x = x * m
        if n is not None:
            x = x * n[:, :, None, None]
        nb, c, h, w = x.shape
        k = c // groups
        x = x[:, : groups * k]
        if window is None:
            pooled = F.avg_pool2d(x, (h, w))
        else:
            pooled = F.avg_pool2d(x, window, stride, window // 2, count_include_pad=True)
        p = pooled.reshape(nb, groups, k, -1)
        return torch.einsum("ngip,ngjp->ngpij", p, p)  # [N, G, positions, k, k]

    return (embed(a) - embed(b)).flatten(1).norm(dim=1)


@pytest.mark.cases(default=8, triton=2)
def test_matches_explicit_outer_products(backend, case, rng):
    shape = random_shape(rng, backend)
    n, c, h, w = shape
    params = random_sop_params(rng, shape, backend)
    print(shape, params)
    s, t = features(shape, F64), features(shape, F64)
    sm, cm = spatial_mask("bool", n, h, w, F64), channel_mask("float", n, c, F64)
    x = s.clone().requires_grad_(True)
    out = lskd.sop_distill(x, t, sm, cm, reduction="none", backend=backend, **params)
    y = s.clone().requires_grad_(True)
    exp = explicit_sop_distance(y, t, sm.to(F64), cm, **params)
    torch.testing.assert_close(out, exp, rtol=1e-10, atol=1e-300)
    go = torch.randn(n, dtype=F64)
    out.backward(go)
    exp.backward(go)
    assert_rel_close(x.grad.norm().reshape(1), y.grad.norm().reshape(1), 1e-9, "grad norm")
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-9 * y.grad.abs().max().item())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_deterministic(backend, dtype):
    check_deterministic(SOP, backend, dtype, small_shape(backend), groups=2, window=5, stride=2)
    check_deterministic(SOP, backend, dtype, small_shape(backend), groups=3, window=None, stride=1)


def test_teacher_and_masks_get_no_gradient(backend):
    check_no_grad_to_teacher_and_masks(SOP, backend, small_shape(backend), groups=2, window=3, stride=1)


def test_module_matches_function(backend):
    variants = [
        dict(groups=2),
        dict(groups=3, window=None, reduction="none"),
        dict(groups=1, window=3, stride=1, reduction="sum"),
    ]
    if backend == "triton":
        variants = variants[1:2]
    check_module(SOP, lskd.nn.SOPDistillLoss, backend, small_shape(backend), variants)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "strided"))
@pytest.mark.parametrize("dtype", (torch.float32, F64, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize(
    "geometry", [((5, 5), (2, 2), (2, 2)), ((3, 5), (1, 2), (1, 0))], ids=["5x5s2", "3x5-anisotropic"]
)
def test_raw_op_contract(compiled_backend, layout, dtype, geometry):
    """sop_forward -> (dist [N], pooled_grad [N, G*k, Ho, Wo]) in the acc dtype as the schema defines them
    (any window/stride/padding pairs); sop_backward -> gradient like empty_like(student)."""
    ops = raw_ops(compiled_backend)
    window, stride, padding = geometry
    shape = small_shape(compiled_backend)
    n, c, h, w = shape
    groups = 3 if c % 3 else 2
    k = c // groups
    acc = torch.float64 if dtype == F64 else torch.float32
    s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=layout)
    m, kk = torch.rand(n, h, w, dtype=acc), (torch.rand(n, c) < 0.7).to(acc)
    dist, pooled_grad = ops.sop_forward(s, t, m, kk, groups, list(window), list(stride), list(padding))

    def pool(x):
        x = (x.double() * m[:, None].double() * kk[:, :, None, None].double())[:, : groups * k]
        return F.avg_pool2d(x, window, stride, padding, count_include_pad=True)

    p, q = pool(s), pool(t)
    ho, wo = p.shape[-2:]
    u = (p - q).reshape(n, groups, k, ho, wo)
    v = (p + q).reshape(n, groups, k, ho, wo)
    uu, vv, uv = (u * u).sum(2, keepdim=True), (v * v).sum(2, keepdim=True), (u * v).sum(2, keepdim=True)
    exp_dist = (0.5 * (uu * vv + uv * uv)).flatten(1).sum(1).sqrt()
    exp_pg = ((vv + uv) * u + (uu + uv) * v).reshape(n, groups * k, ho, wo)
    assert dist.dtype == acc and dist.shape == (n,)
    assert pooled_grad.dtype == acc and pooled_grad.shape == exp_pg.shape
    tol = TOLERANCES[dtype].dist
    assert_rel_close(dist, exp_dist, tol, "dist")
    torch.testing.assert_close(pooled_grad.double(), exp_pg, rtol=tol, atol=tol * exp_pg.abs().max().item())
    g = ops.sop_backward(
        torch.ones(n, dtype=acc), s, m, kk, dist, pooled_grad, groups, list(window), list(stride), list(padding)
    )
    assert g.dtype == dtype and g.shape == s.shape
    if layout != "strided":
        assert g.stride() == torch.empty_like(s).stride(), (g.stride(), s.stride())
