"""pod_distill (Local POD / MD): every available backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    F64,
    POD,
    assert_rel_close,
    channel_mask,
    features,
    pod_schema_reference,
    spatial_mask,
)
from op_tester import DistillOpTester

import lskd

EDGE_CASES = [
    ((1, 1, 1, 1), (1,)),
    ((1, 3, 1, 9), (1,)),
    ((2, 5, 7, 7), (7,)),  # regions of one pixel
    ((1, 2, 23, 3), (1, 3)),  # tall, remainder rows
    ((3, 4, 5, 6), (2, 4, 5)),  # remainders at every scale
    ((1, 300, 6, 5), (1, 2)),
    ((1, 1, 70, 69), (1, 2, 4, 8)),
]


class TestPodDistill(DistillOpTester):
    op = POD
    module_cls = lskd.nn.PODDistillLoss
    module_variants = [dict(), dict(scales=(1, 3), square=False, reduction="none"), dict(reduction="sum")]
    module_variants_triton = module_variants[1:2]
    mask_params = dict(scales=(1, 2, 4), square=True)
    layout_params = [dict(scales=(1, 3), square=True), dict(scales=(1, 2, 4), square=False)]
    zero_distance_variants = [dict(scales=(1, 2, 4), square=True), dict(scales=(3,), square=False)]
    all_masked_params = dict(scales=(1, 2))
    nan_params = [dict()]
    deterministic_params = [dict(scales=(1, 2, 4))]
    no_grad_params = dict()
    edge_params = [
        (shape, dict(scales=scales), dtype) for shape, scales in EDGE_CASES for dtype in (torch.float32, F64)
    ]
    edge_params_triton = [
        (shape, dict(scales=scales), torch.float32) for shape, scales in EDGE_CASES if shape[0] * shape[1] <= 12
    ]
    variants = {
        "test_reductions": {"square": dict(scales=(1, 2), square=True), "linear": dict(scales=(1, 2), square=False)},
        "test_raw_op_contract": {"square": True, "linear": False},
    }

    def edge_calls(self, params):
        return dict(params, square=True), dict(params, square=False)

    def raw_op_grad(self, ops, s, t, m, k, square, tol):
        """pod_forward -> (dist [N], emb [N, C, L]), emb laid out as the schema says."""
        n = s.shape[0]
        scales = [1, 2, 3]
        dist, emb = ops.pod_forward(s, t, m, k, scales, square)
        exp_dist, exp_emb = pod_schema_reference(s, t, m[:, None], k, scales, square)
        assert dist.dtype == m.dtype and dist.shape == (n,)
        assert emb.dtype == m.dtype and emb.shape == exp_emb.shape
        torch.testing.assert_close(emb.double(), exp_emb, rtol=tol, atol=tol * exp_emb.abs().max().item())
        assert_rel_close(dist, exp_dist, tol, "dist")
        return ops.pod_backward(torch.ones(n, dtype=m.dtype), s, m, k, dist, emb, scales, square)


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
