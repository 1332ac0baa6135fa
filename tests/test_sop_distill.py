"""sop_distill (MCD, second-order context pooling): every available backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    F64,
    SOP,
    assert_rel_close,
    channel_mask,
    check_against_reference,
    features,
    random_shape,
    random_sop_params,
    small_shape,
    sop_schema_reference,
    spatial_mask,
)
from op_tester import DistillOpTester

import lskd

# (window, stride): global, and windows 3 / 5 with strides 1 / 2 (padding window // 2).
GEOMETRIES = [(None, 1), (3, 1), (3, 2), (5, 1), (5, 2)]
EDGE_CASES = [
    ((1, 1, 1, 1), dict(groups=1, window=3, stride=1)),
    ((1, 2, 2, 3), dict(groups=1, window=5, stride=2)),  # window larger than the map
    ((2, 7, 1, 13), dict(groups=3, window=3, stride=2)),  # one row, C % groups != 0
    ((1, 5, 6, 5), dict(groups=5, window=None, stride=1)),  # k = 1, global
    ((3, 300, 4, 4), dict(groups=20, window=5, stride=2)),  # released defaults
    ((1, 40, 70, 1), dict(groups=40, window=3, stride=1)),  # one column
    ((2, 9, 13, 2), dict(groups=2, window=None, stride=2)),  # global ignores the stride
]


class TestSopDistill(DistillOpTester):
    op = SOP
    module_cls = lskd.nn.SOPDistillLoss
    module_variants = [
        dict(groups=2),
        dict(groups=3, window=None, reduction="none"),
        dict(groups=1, window=3, stride=1, reduction="sum"),
    ]
    module_variants_triton = module_variants[1:2]
    mask_params = dict(groups=2, window=5, stride=2)
    layout_params = [dict(groups=3, window=3, stride=2), dict(groups=1, window=None, stride=1)]
    zero_distance_variants = [
        dict(groups=2, window=5, stride=2),
        dict(groups=3, window=None, stride=1),
        dict(groups=1, window=3, stride=1),
    ]
    all_masked_params = dict(groups=2, window=3, stride=2)
    nan_params = [dict(groups=2, window=3, stride=2), dict(groups=1, window=None, stride=1)]
    deterministic_params = [dict(groups=2, window=5, stride=2), dict(groups=3, window=None, stride=1)]
    no_grad_params = dict(groups=2, window=3, stride=1)
    edge_params = [(shape, p, dtype) for shape, p in EDGE_CASES for dtype in (torch.float32, F64)]
    edge_params_triton = [(shape, p, torch.float32) for shape, p in EDGE_CASES if shape[0] * shape[1] <= 18]
    variants = {
        "test_reductions": {"g2w5s2": dict(groups=2, window=5, stride=2)},
        "test_raw_op_contract": {"5x5s2": ((5, 5), (2, 2), (2, 2)), "3x5-anisotropic": ((3, 5), (1, 2), (1, 0))},
    }

    def raw_op_grad(self, ops, s, t, m, k, geometry, tol):
        """sop_forward -> (dist [N], pooled_grad [N, G*k, Ho, Wo]) as the schema defines them (any
        window/stride/padding pairs)."""
        window, stride, padding = (list(x) for x in geometry)
        n, c = s.shape[:2]
        groups = 3 if c % 3 else 2
        dist, pooled_grad = ops.sop_forward(s, t, m, k, groups, window, stride, padding)
        exp_dist, exp_pg = sop_schema_reference(s, t, m[:, None], k, groups, window, stride, padding)
        assert dist.dtype == m.dtype and dist.shape == (n,)
        assert pooled_grad.dtype == m.dtype and pooled_grad.shape == exp_pg.shape
        assert_rel_close(dist, exp_dist, tol, "dist")
        torch.testing.assert_close(pooled_grad.double(), exp_pg, rtol=tol, atol=tol * exp_pg.abs().max().item())
        grad_dist = torch.ones(n, dtype=m.dtype)
        return ops.sop_backward(grad_dist, s, m, k, dist, pooled_grad, groups, window, stride, padding)


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
