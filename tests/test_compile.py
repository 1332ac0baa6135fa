"""torch.library.opcheck of the raw ops and torch.compile(fullgraph=True) of the functional API.

The raw ops are torch.ops.lskd.* (lskd._C loaded: backend "cpu") and
torch.ops.lskd_triton.* (Triton importable: backend "triton"); the
``compiled_backend`` fixture lists those available (test_expected_backends
fails when CI expects one that is missing). All tests here are marked
``compile`` (slow; they run by default, deselect with ``-m "not compile"``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import F64, channel_mask, features, raw_ops, small_shape, spatial_mask

import lskd
from lskd._dtypes import acc_dtype

pytestmark = pytest.mark.compile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _masks(n, c, h, w, dtype, masked):
    acc = acc_dtype(dtype)
    if not masked:
        return None, None
    return torch.rand(n, h, w, dtype=acc), (torch.rand(n, c) < 0.7).to(acc)


OPCHECK_CASES = [  # (masked, requires_grad, dtype)
    (False, False, torch.float32),
    (True, True, torch.float32),
    (True, False, F64),
    (False, True, torch.bfloat16),
]
CASE_IDS = [f"masked={m}-grad={g}-{str(d)[6:]}" for m, g, d in OPCHECK_CASES]


@pytest.mark.parametrize("masked,requires_grad,dtype", OPCHECK_CASES, ids=CASE_IDS)
def test_opcheck_pod(compiled_backend, masked, requires_grad, dtype):
    ops = raw_ops(compiled_backend)
    shape = small_shape(compiled_backend)
    n, c, h, w = shape
    s, t = features(shape, dtype).requires_grad_(requires_grad), features(shape, dtype)
    m, k = _masks(n, c, h, w, dtype, masked)
    scales = [1, 2, 4]
    torch.library.opcheck(ops.pod_forward.default, (s, t, m, k, scales, True))
    torch.library.opcheck(ops.pod_forward.default, (s, t, m, k, [3], False))
    dist, emb = ops.pod_forward(s.detach(), t, m, k, scales, True)
    grad = torch.rand(n, dtype=dist.dtype)
    torch.library.opcheck(ops.pod_backward.default, (grad, s.detach(), m, k, dist, emb, scales, True))


@pytest.mark.parametrize("masked,requires_grad,dtype", OPCHECK_CASES, ids=CASE_IDS)
def test_opcheck_sop(compiled_backend, masked, requires_grad, dtype):
    ops = raw_ops(compiled_backend)
    shape = small_shape(compiled_backend)
    n, c, h, w = shape
    s, t = features(shape, dtype).requires_grad_(requires_grad), features(shape, dtype)
    m, k = _masks(n, c, h, w, dtype, masked)
    for geometry in (([5, 5], [2, 2], [2, 2]), ([h, w], [1, 1], [0, 0])):
        torch.library.opcheck(ops.sop_forward.default, (s, t, m, k, 3, *geometry))
        dist, pooled = ops.sop_forward(s.detach(), t, m, k, 3, *geometry)
        grad = torch.rand(n, dtype=dist.dtype)
        torch.library.opcheck(ops.sop_backward.default, (grad, s.detach(), m, k, dist, pooled, 3, *geometry))


@pytest.mark.parametrize("dtype", (torch.float32, F64, torch.float16), ids=str)
def test_opcheck_md_stats(compiled_backend, dtype):
    ops = raw_ops(compiled_backend)
    shape = small_shape(compiled_backend)
    a, cb, dn = (features(shape, dtype, layout=lay) for lay in ("contiguous", "channels_last", "contiguous"))
    torch.library.opcheck(ops.md_stats.default, (a, cb, dn, 1e-8))


def _loss(backend):
    def loss_fn(student, teacher, sm, cm):
        pod = lskd.pod_distill(student, teacher, sm, cm, scales=(1, 2), backend=backend)
        sop = lskd.sop_distill(student, teacher, sm, cm, groups=2, window=3, stride=2, backend=backend)
        glob = lskd.sop_distill(student, teacher, None, cm, groups=3, window=None, reduction="sum", backend=backend)
        return pod + 0.5 * sop + 0.25 * glob

    return loss_fn


def _run(fn, s, t, sm, cm):
    x = s.detach().requires_grad_(True)
    out = fn(x, t, sm, cm)
    out.backward()
    return out.detach(), x.grad


def test_compile_fullgraph_matches_eager(compiled_backend):
    """torch.compile(fullgraph=True) of a loss with masks: same value and gradient as eager, two shapes."""
    backend = compiled_backend
    loss_fn = _loss(backend)
    compiled = torch.compile(loss_fn, fullgraph=True)
    shapes = [(2, 6, 9, 7), (1, 6, 8, 8)] if backend == "triton" else [(2, 10, 13, 11), (3, 10, 16, 16)]
    for shape in shapes:
        n, c, h, w = shape
        s, t = features(shape, torch.float32, layout="channels_last"), features(shape, torch.float32)
        sm = spatial_mask("bool", n, h, w, torch.float32)
        cm = channel_mask("float", n, c, torch.float32)
        eager = _run(loss_fn, s, t, sm, cm)
        comp = _run(compiled, s, t, sm, cm)
        torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(comp[1], eager[1], rtol=1e-5, atol=1e-7 * eager[1].abs().max().item())


def test_compile_md_masks_then_distill(compiled_backend):
    """The LSKD pattern: masks from md_masks feed pod_distill, all in one fullgraph compile."""
    backend = compiled_backend

    def step(student, feat, cb, dn, labels):
        spatial, channel = lskd.md_masks(feat, cb, dn, labels, 3, backend=backend)
        return lskd.pod_distill(student, feat, spatial, channel, backend=backend)

    n, c, h, w = (2, 6, 8, 8) if backend == "triton" else (2, 12, 16, 16)
    feat, cb, dn = (features((n, c, h, w), torch.float32) for _ in range(3))
    labels = torch.randint(0, 6, (n, 2 * h, 2 * w))
    labels[0, :4] = 255
    s = features((n, c, h, w), torch.float32)
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    eager = step(x1, feat, cb, dn, labels)
    comp = torch.compile(step, fullgraph=True)(x2, feat, cb, dn, labels)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=0)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-7 * x1.grad.abs().max().item())


def test_compile_modules():
    """lskd.nn modules compile too (auto backend)."""
    mod = lskd.nn.PODDistillLoss(scales=(1, 2))
    shape = (2, 4, 8, 8)
    s, t = features(shape, torch.float32), features(shape, torch.float32)
    torch.testing.assert_close(torch.compile(mod, fullgraph=True)(s, t), mod(s, t), rtol=1e-5, atol=0)
