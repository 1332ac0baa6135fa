"""GPU tests (marked ``gpu``; skipped without CUDA).

Every backend available on CUDA tensors (``gpu_backend``: reference, cuda,
triton) against the float64 reference evaluated on the GPU, at the LSKD shapes
(N = 2) and odd ones, float32 and bfloat16, contiguous and channels-last;
bitwise reproducibility; opcheck and torch.compile on CUDA tensors.
Run on the GPU machine with ``LSKD_EXPECT_GPU_BACKENDS=cuda,triton pytest tests -m gpu``
(test_extension.py::test_expected_gpu_backends fails if one is missing).
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import (
    LSKD_SHAPES,
    POD,
    SOP,
    channel_mask,
    check_against_reference,
    check_deterministic,
    check_masks_match_composite,
    check_md_masks_parity,
    check_md_masks_ties_and_nan,
    check_nan_propagates,
    check_zero_distance,
    features,
    md_labels,
    raw_ops,
    spatial_mask,
    stat_inputs,
)

import lskd
from lskd import reference
from lskd.ops import md_statistics
from lskd.ops.md_masks import md_masks_from_statistics

pytestmark = pytest.mark.gpu
DEV = "cuda"

ODD_SHAPES = [(2, 19, 33, 47), (2, 300, 65, 63), (1, 3, 7, 129), (2, 21, 1, 17)]
F32, BF16 = torch.float32, torch.bfloat16
# Every shape in float32/contiguous and bfloat16/channels-last; the other two combinations on
# half of the LSKD shapes and on the odd ones (keeps the GPU run short: Triton JIT per variant).
CASES = (
    [(s, d, lay) for s in LSKD_SHAPES for d, lay in ((F32, "contiguous"), (BF16, "channels_last"))]
    + [(s, d, lay) for s in LSKD_SHAPES[::2] for d, lay in ((F32, "channels_last"), (BF16, "contiguous"))]
    + [(s, d, lay) for s in ODD_SHAPES for d, lay in ((F32, "channels_last"), (BF16, "contiguous"))]
)
CASE_IDS = [f"{list(s)}-{str(d)[6:]}-{lay}" for s, d, lay in CASES]


def _sop_params(shape, variant: int = 0):
    c = shape[1]
    groups = 20 if c >= 20 else max(1, c // 4)
    return [
        dict(groups=groups, window=5, stride=2),
        dict(groups=groups, window=None, stride=1),
        dict(groups=max(1, groups // 2), window=3, stride=1),
    ][variant]


def _inputs(shape, dtype, layout, masked):
    n, c, h, w = shape
    s, t = features(shape, dtype, DEV, layout), features(shape, dtype, DEV, layout)
    sm = spatial_mask("bool", n, h, w, dtype, DEV) if masked else None
    cm = channel_mask("float", n, c, dtype, DEV) if masked else None
    return s, t, sm, cm


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=CASE_IDS)
def test_pod_matches_reference(gpu_backend, shape, dtype, layout):
    masked = layout == "channels_last" or shape in ODD_SHAPES
    s, t, sm, cm = _inputs(shape, dtype, layout, masked)
    reduction = "none" if dtype == BF16 else "mean"
    check_against_reference(
        POD, gpu_backend, s, t, sm, cm, reduction, scales=(1, 2, 4) if min(shape[2:]) >= 4 else (1,), square=True
    )


@pytest.mark.parametrize("shape,dtype,layout", CASES, ids=CASE_IDS)
def test_sop_matches_reference(gpu_backend, shape, dtype, layout):
    masked = layout == "channels_last" or shape in ODD_SHAPES
    s, t, sm, cm = _inputs(shape, dtype, layout, masked)
    variants = (0, 1, 2) if shape in ODD_SHAPES else (0,)
    for v in variants:
        check_against_reference(SOP, gpu_backend, s, t, sm, cm, "none", **_sop_params(shape, v))


@pytest.mark.parametrize("shape", [(2, 256, 128, 128), (2, 2048, 32, 32), (2, 19, 33, 47)], ids=str)
@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_md_statistics_match_reference(gpu_backend, shape, dtype):
    a, cb, dn = stat_inputs(shape, dtype, "channels_last", DEV)
    got = md_statistics(a, cb, dn, backend=gpu_backend)
    exp = reference.md_statistics(a.double(), cb.double(), dn.double())
    for name, g, e in zip(("cos_bg", "cos_new", "gap_bg", "gap_new"), got, exp):
        assert g.dtype == F32 and g.shape == e.shape and g.device == a.device, name
        torch.testing.assert_close(g.double(), e, rtol=2e-5, atol=2e-6 * max(1.0, e.abs().max().item()), msg=name)


@pytest.mark.parametrize(
    "scenario,kind",
    [
        ("mixed", "prototypes"),
        ("per_image", "constant"),
        ("ignore", "distinct"),
        ("all_new", "prototypes"),
        ("o_covers_all", "distinct"),
    ],
)
def test_md_masks_match_release(gpu_backend, scenario, kind, rng):
    check_md_masks_parity(gpu_backend, rng, scenario, kind, F32, device=DEV)


@pytest.mark.parametrize("dtype", (F32, BF16), ids=str)
def test_zero_distance_and_nan(gpu_backend, dtype):
    shape = (2, 64, 33, 32)
    check_zero_distance(POD, gpu_backend, dtype, shape, [dict(scales=(1, 2, 4), square=True)], device=DEV)
    check_zero_distance(
        SOP,
        gpu_backend,
        dtype,
        shape,
        [dict(groups=20, window=5, stride=2), dict(groups=8, window=None, stride=1)],
        device=DEV,
    )
    check_nan_propagates(POD, gpu_backend, dtype, shape, device=DEV)
    check_nan_propagates(SOP, gpu_backend, dtype, shape, device=DEV, groups=20, window=5, stride=2)


@pytest.mark.parametrize(
    "shape,dtype,layout",
    [
        ((2, 256, 128, 128), F32, "channels_last"),
        ((2, 2048, 32, 32), BF16, "contiguous"),
        ((2, 300, 65, 63), F32, "contiguous"),
    ],
    ids=str,
)
def test_bitwise_reproducible(gpu_backend, shape, dtype, layout):
    check_deterministic(POD, gpu_backend, dtype, shape, device=DEV, layout=layout, scales=(1, 2, 4))
    check_deterministic(SOP, gpu_backend, dtype, shape, device=DEV, layout=layout, **_sop_params(shape))
    a, cb, dn = stat_inputs(shape, dtype, layout, DEV)
    first, second = md_statistics(a, cb, dn, backend=gpu_backend), md_statistics(a, cb, dn, backend=gpu_backend)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("requires_grad", (False, True))
def test_opcheck_cuda(gpu_compiled_backend, requires_grad):
    ops = raw_ops(gpu_compiled_backend)
    shape = (2, 24, 19, 17)
    n, c, h, w = shape
    for dtype, layout in ((F32, "channels_last"), (BF16, "contiguous")):
        s = features(shape, dtype, DEV, layout).requires_grad_(requires_grad)
        t = features(shape, dtype, DEV, layout)
        m, k = torch.rand(n, h, w, device=DEV), (torch.rand(n, c, device=DEV) < 0.7).float()
        torch.library.opcheck(ops.pod_forward.default, (s, t, m, k, [1, 2, 4], True))
        dist, emb = ops.pod_forward(s.detach(), t, m, k, [1, 2, 4], True)
        torch.library.opcheck(
            ops.pod_backward.default, (torch.rand_like(dist), s.detach(), m, k, dist, emb, [1, 2, 4], True)
        )
        geometry = ([5, 5], [2, 2], [2, 2])
        torch.library.opcheck(ops.sop_forward.default, (s, t, m, k, 5, *geometry))
        dist, pooled = ops.sop_forward(s.detach(), t, m, k, 5, *geometry)
        torch.library.opcheck(
            ops.sop_backward.default, (torch.rand_like(dist), s.detach(), m, k, dist, pooled, 5, *geometry)
        )
        if not requires_grad:
            torch.library.opcheck(ops.md_stats.default, (s, t, features(shape, dtype, DEV), 1e-8))


@pytest.mark.compile
def test_compile_cuda(gpu_compiled_backend):
    backend = gpu_compiled_backend
    torch._dynamo.reset()

    def loss_fn(student, teacher, feat_bg, feat_new, labels):
        sm, cm = lskd.md_masks(teacher, feat_bg, feat_new, labels, 4, backend=backend)
        pod = lskd.pod_distill(student, teacher, sm, cm, backend=backend)
        sop = lskd.sop_distill(student, teacher, sm, cm, groups=20, backend=backend)
        return pod + sop

    shape = (2, 256, 32, 32)
    rng = random.Random(0)
    s, t = features(shape, BF16, DEV, "channels_last"), features(shape, BF16, DEV, "channels_last")
    fb, fn = features(shape, BF16, DEV), features(shape, BF16, DEV)
    labels = torch.tensor(
        [[rng.choice([0, 1, 5, 6, 255]) for _ in range(64 * 64)] for _ in range(2)], device=DEV
    ).reshape(2, 64, 64)
    results = []
    for fn_ in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        x = s.detach().requires_grad_(True)
        out = fn_(x, t, fb, fn, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(
        results[1][1].float(), results[0][1].float(), rtol=1e-2, atol=1e-2 * results[0][1].abs().max().item()
    )
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# lskd::md_masks on CUDA (csrc/cuda/md_masks.cu: radix select instead of sorts) against the
# rule (lskd.ops.md_masks.md_masks_from_statistics) evaluated on the CPU from the SAME statistics
# (md_stats is deterministic; CPU and CUDA statistics may differ by an ulp, the quantiles on them
# may not).

_MD_SHAPES = [
    ((2, 256, 128, 128), F32),  # H*W = 16384: 64 KiB of keys in shared memory
    ((2, 256, 128, 128), torch.float64),  # 128 KiB of keys
    ((2, 2048, 32, 32), BF16),
    ((2, 16, 32, 32), F32),
    ((3, 5, 7, 9), F32),
    ((3, 5, 7, 9), torch.float64),
    ((2, 1, 8, 8), BF16),  # C = 1
    ((2, 2, 1, 1), F32),  # L = 1
    ((1, 3, 256, 256), F32),  # 256 KiB of float32 keys: read from global memory
    ((1, 2, 192, 160), torch.float64),  # 240 KiB of float64 keys: read from global memory
]
_MD_LABELS = [(torch.uint8, "mixed"), (torch.int64, "per_image"), (torch.int32, "ignore"), (torch.uint8, "extremes")]


def _check_md_masks_cuda(a, cb, dn, labels, old=4, ignore=255):
    stats = md_statistics(a, cb, dn, backend="cuda")
    check_masks_match_composite(torch.ops.lskd.md_masks, stats, a, cb, dn, labels, old, ignore)
    # The public entry point gives the same masks.
    sm, cm = lskd.md_masks(a, cb, dn, labels, old, ignore_index=ignore, backend="cuda")
    esm, ecm = md_masks_from_statistics([s.cpu() for s in stats], labels.cpu(), old, ignore)
    assert torch.equal(sm.cpu(), esm) and torch.equal(cm.cpu(), ecm)
    return sm, cm


def _need_cuda_backend(gpu_backends):
    if "cuda" not in gpu_backends:
        pytest.skip("lskd._C has no CUDA kernels")


@pytest.mark.parametrize("shape,dtype", _MD_SHAPES, ids=[f"{list(s)}-{str(d)[6:]}" for s, d in _MD_SHAPES])
@pytest.mark.parametrize("label_dtype,scenario", _MD_LABELS, ids=[f"{str(d)[6:]}-{s}" for d, s in _MD_LABELS])
def test_md_masks_cuda_matches_composite(gpu_backends, shape, dtype, label_dtype, scenario, seed):
    _need_cuda_backend(gpu_backends)
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    a, cb, dn = stat_inputs(shape, dtype, "contiguous", DEV)
    # Label resolutions: 4x the map (powers of two for the LSKD maps) and odd ones (q not dyadic).
    hl, wl = (4 * h, 4 * w) if scenario in ("mixed", "extremes") else (3 * h + 1, w + 2)
    labels = md_labels(n, hl, wl, label_dtype, scenario, g).to(DEV)
    _check_md_masks_cuda(a, cb, dn, labels)


@pytest.mark.parametrize("dtype", (F32, BF16, torch.float64), ids=str)
def test_md_masks_cuda_ties_and_nan(gpu_backends, dtype, seed):
    _need_cuda_backend(gpu_backends)
    check_md_masks_ties_and_nan(_check_md_masks_cuda, dtype, torch.Generator().manual_seed(seed), DEV)


@pytest.mark.parametrize(
    "shape,dtype", [((2, 256, 128, 128), F32), ((2, 2048, 32, 32), BF16), ((3, 5, 7, 9), torch.float64)], ids=str
)
def test_md_masks_cuda_deterministic(gpu_backends, shape, dtype, seed):
    _need_cuda_backend(gpu_backends)
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    a, cb, dn = stat_inputs(shape, dtype, "contiguous", DEV)
    labels = md_labels(n, 4 * h, 4 * w, torch.uint8, "mixed", g).to(DEV)
    first = lskd.md_masks(a, cb, dn, labels, 4, backend="cuda")
    second = lskd.md_masks(a, cb, dn, labels, 4, backend="cuda")
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # Empty maps: no launch over the empty rows, empty masks.
    e = torch.empty(2, 3, 0, 5, dtype=dtype, device=DEV)
    sm, cm = torch.ops.lskd.md_masks(e, e, e, labels[:2], 4, 255, 1e-8)
    assert sm.shape == (2, 1, 0, 5) and cm.shape == (2, 3)
