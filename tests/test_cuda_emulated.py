"""lskd's CUDA kernels (csrc/cuda/*.cu), run on the CPU under the emulation of tests/cuda_emu.

Without a GPU the CUDA sources can only be compiled and linked; these tests also
*run* them. tests/cuda_emu/build.py compiles the .cu files (and the op files
csrc/<op>.cpp: schemas, C++ autograd) as host code, the threads of a block as fibers with
barriers and warp operations (tests/cuda_emu/runtime.h), and loads them as
``torch.ops.lskd_emu``. The kernels' indexing, shared-memory staging, chunking,
vectorised and strided paths, generic fallbacks, reductions and launch
configuration are then checked against the float64 reference like every other
backend. What the emulation cannot show (timing, memory coalescing, races
between barriers, FMA contraction by nvcc) needs the GPU tests (test_gpu.py).

The library takes about a minute to build on 2 cores (once; ninja rebuilds
only what changed, in build/cuda_emu).
"""

from __future__ import annotations

import ctypes
import random
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cuda_emu import build as emu_build
from helpers import (
    DTYPES,
    LAYOUTS,
    OpSpec,
    assert_grad_close,
    assert_rel_close,
    check_against_reference,
    check_masks_match_composite,
    check_md_masks_ties_and_nan,
    check_nan_propagates,
    check_rank_rule_case,
    check_zero_distance,
    dtype_id,
    features,
    md_labels,
    random_case,
    random_pod_params,
    random_sop_params,
    stat_inputs,
)
from test_ce_unkd import check_raw_op as check_ce_unkd_raw
from test_ce_unkd import random_inputs as ce_unkd_inputs
from test_pseudo_labels import IGNORE
from test_pseudo_labels import check_op as check_pseudo_labels_op
from test_pseudo_labels import random_inputs as pseudo_labels_inputs

import lskd
from lskd import reference
from lskd._dtypes import acc_dtype
from lskd._validation import check_pair, reduction_code
from lskd.ops.distill_terms import _prepared
from lskd.ops.pod_distill import op_params as pod_params
from lskd.ops.sop_distill import op_params as sop_params

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def emu():
    """torch.ops.lskd_emu: the CUDA kernels compiled for the CPU (built on first use)."""
    ops = emu_build.load()
    ops.emu_set_device(4, 227 * 1024)  # an H100's opt-in shared memory, 4 "SMs"
    return ops


# --------------------------------------------------------------------------- the emulation itself


def test_emulation_runtime(tmp_path):
    """Barriers, warp shuffles/match/scan, __syncthreads_or and the divergence and
    shared-memory checks of the emulation, on small kernels with known results;
    a missing barrier must give a wrong result."""
    lib_path = tmp_path / "selftest.so"
    subprocess.run(
        ["c++", "-O1", "-std=c++17", "-shared", "-fPIC", "-o", str(lib_path), str(HERE / "cuda_emu" / "selftest.cpp")],
        check=True,
    )
    lib = ctypes.CDLL(str(lib_path))
    msg = ctypes.create_string_buffer(4096)
    code = lib.lskd_emu_selftest(msg, 4096)
    assert code == 0, f"emulation self-test failed at check {code}"
    text = msg.value.decode()
    assert "barriers of lines" in text and "warp-level operation" in text and "dynamic shared memory" in text, text


def test_sources_convert():
    """Every launch and dynamic shared-memory declaration of csrc/cuda is converted."""
    files = emu_build.sources()
    assert {f.name for f in files} >= {
        "pod_distill_cu.cpp",
        "sop_distill_cu.cpp",
        "md_stats_cu.cpp",
        "md_masks_cu.cpp",
        "pod_distill.cpp",
        "sop_distill.cpp",
        "distill_terms.cpp",
    }
    with pytest.raises(RuntimeError, match="not converted"):
        emu_build.transform("void f() { k<<<1, 2>>>\n(x); }", "broken.cu")


# --------------------------------------------------------------------------- Local POD and MCD


def _emu_pod(emu):
    def pod(student, teacher, sm=None, cm=None, reduction="mean", backend=None, **params):
        check_pair("pod_distill", student, teacher)
        term = lskd.PodTerm(student, teacher, sm, cm, **params)
        m, k, _ = _prepared("pod_distill", term, {})
        return emu.pod_distill(
            student, teacher, m, k, *pod_params("pod_distill", term), reduction_code("pod_distill", reduction)
        )

    return OpSpec("pod", pod, reference.pod_distances, random_pod_params)


def _emu_sop(emu):
    def sop(student, teacher, sm=None, cm=None, reduction="mean", backend=None, **params):
        check_pair("sop_distill", student, teacher)
        term = lskd.SopTerm(student, teacher, sm, cm, **params)
        m, k, _ = _prepared("sop_distill", term, {})
        return emu.sop_distill(
            student, teacher, m, k, *sop_params("sop_distill", term), reduction_code("sop_distill", reduction)
        )

    return OpSpec("sop", sop, reference.sop_distances, random_sop_params)


# Random cases use the Triton limits (small maps): the emulation runs a block's threads one by one.
LIMITS = "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", range(3))
def test_pod_random_cases(emu, rng, dtype, case):
    s, t, sm, cm, reduction, params = random_case(_emu_pod(emu), rng, LIMITS, dtype)
    check_against_reference(_emu_pod(emu), "cuda", s, t, sm, cm, reduction, **params)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", range(3))
def test_sop_random_cases(emu, rng, dtype, case):
    s, t, sm, cm, reduction, params = random_case(_emu_sop(emu), rng, LIMITS, dtype)
    check_against_reference(_emu_sop(emu), "cuda", s, t, sm, cm, reduction, **params)


# Shapes that take each kernel path: vectorised (NCHW-contiguous, W a multiple of
# the vector width) and strided fast paths, several row chunks (tall planes),
# 128- and 256-thread blocks, and the generic kernels (atom tables or rows that
# do not fit shared memory).
POD_PATHS = [
    ("vector", (2, 3, 16, 24), "contiguous", (1, 2, 4)),
    ("strided", (2, 3, 13, 17), "channels_last", (1, 2, 4)),
    ("transposed", (1, 2, 9, 20), "transposed", (1, 3)),
    ("chunks", (1, 2, 300, 24), "contiguous", (1, 2, 4)),
    ("big-plane", (1, 1, 64, 72), "strided", (1, 2, 4)),
    ("many-atoms", (1, 2, 9, 131), "contiguous", (1, 2, 3, 4, 5, 6, 7, 8)),
    ("generic-wide", (1, 2, 4, 12008), "contiguous", (1, 2, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("path,shape,layout,scales", POD_PATHS, ids=[p[0] for p in POD_PATHS])
def test_pod_kernel_paths(emu, path, shape, layout, scales, dtype):
    n, c, h, w = shape
    s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=layout)
    sm = torch.rand(n, 1, h, w) < 0.7
    cm = torch.rand(n, c)
    for square in (True, False):
        check_against_reference(_emu_pod(emu), "cuda", s, t, None, None, "mean", scales=scales, square=square)
    check_against_reference(_emu_pod(emu), "cuda", s, t, sm, cm, "none", scales=scales, square=True)


def test_pod_paths_take_distinct_kernels(emu):
    """The POD_PATHS shapes reach the kernels they are meant to (vectorised, strided, generic)."""

    def kernels(shape, layout, scales):
        s = features(shape, torch.float32, layout=layout)
        emu.emu_kernels()
        params = pod_params("pod", lskd.PodTerm(s, s, scales=scales))
        dist, emb = emu.pod_forward(s, s * 0.5, None, None, *params)
        fwd = emu.emu_kernels()
        emu.pod_backward(torch.ones(shape[0]), s, None, None, dist, emb, *params)
        return fwd[0], emu.emu_kernels()[0]

    paths = {p[0]: kernels(p[1], p[2], p[3]) for p in POD_PATHS}
    assert len({paths[n][0] for n in ("vector", "strided", "generic-wide")}) == 3, "forward kernels"
    assert len({paths[n][1] for n in ("vector", "strided", "generic-wide")}) == 3, "backward kernels"
    assert paths["chunks"] == paths["vector"] and paths["transposed"] == paths["strided"]


SOP_PATHS = [
    ("vector", (2, 8, 12, 16), "contiguous", dict(groups=2, window=5, stride=2)),
    ("strided", (2, 9, 11, 13), "channels_last", dict(groups=3, window=3, stride=1)),
    ("global", (2, 8, 10, 12), "contiguous", dict(groups=4, window=None, stride=1)),
    ("tiles", (1, 40, 40, 48), "contiguous", dict(groups=20, window=5, stride=2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("path,shape,layout,params", SOP_PATHS, ids=[p[0] for p in SOP_PATHS])
def test_sop_kernel_paths(emu, path, shape, layout, params, dtype):
    n, c, h, w = shape
    s, t = features(shape, dtype, layout=layout), features(shape, dtype, layout=layout)
    check_against_reference(_emu_sop(emu), "cuda", s, t, None, None, "mean", **params)
    sm, cm = torch.rand(n, 1, h, w) < 0.7, torch.rand(n, c) < 0.8
    check_against_reference(_emu_sop(emu), "cuda", s, t, sm, cm, "sum", **params)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
def test_zero_distance_and_nan(emu, dtype):
    for op, variants in (
        (_emu_pod(emu), [dict(scales=(1, 2), square=True), dict(scales=(1,), square=False)]),
        (_emu_sop(emu), [dict(groups=2, window=3, stride=1), dict(groups=2, window=None, stride=1)]),
    ):
        check_zero_distance(op, "cuda", dtype, (2, 6, 9, 11), variants)
        check_nan_propagates(op, "cuda", dtype, (2, 6, 9, 11), **variants[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_distill_terms_match_cpu(emu, layout):
    """The seven LSKD terms through lskd_emu::distill_terms (the C++ autograd node
    around the emulated kernels) against lskd.distill_terms on the CPU kernels."""
    shapes = [(2, 8, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8), (2, 40, 8, 8), (2, 20, 8, 8), (2, 5, 8, 8)]
    s = [features(sh, torch.float32, layout=layout).requires_grad_() for sh in shapes]
    t = [features(sh, torch.float32, layout=layout) for sh in shapes]
    m = [torch.rand(sh[0], 1, sh[2], sh[3]) < 0.6 for sh in shapes]
    k = [torch.rand(sh[0], sh[1]) < 0.7 for sh in shapes]
    terms = [
        lskd.PodTerm(s[0], t[0]),
        lskd.PodTerm(s[1], t[1]),
        lskd.PodTerm(s[2], t[2], m[2], k[2]),
        lskd.PodTerm(s[3], t[3], m[3], k[3]),
        lskd.PodTerm(s[4], t[4], m[4], k[4]),
        lskd.SopTerm(s[4], t[4], m[4], k[4], groups=4),
        lskd.PodTerm(s[5], t[5], m[5]),
    ]
    cache, spatial, channel, params = {}, [], [], []
    for i, term in enumerate(terms):
        mi, ki, p = _prepared(f"term {i}", term, cache)
        spatial.append(mi)
        channel.append(ki)
        params += p
    students, teachers = [tm.student for tm in terms], [tm.teacher for tm in terms]
    got = emu.distill_terms(students, teachers, spatial, channel, params, 1)
    want = lskd.distill_terms(terms, backend="cpu")
    weights = torch.rand(len(terms)) + 0.5
    g_got = torch.autograd.grad(sum(w * x for w, x in zip(weights, got)), s, retain_graph=True)
    g_want = torch.autograd.grad(sum(w * x for w, x in zip(weights, want)), s, retain_graph=True)
    for i, (x, y) in enumerate(zip(got, want)):
        assert_rel_close(x, y, 2e-5, f"term {i}")
    for i, (x, y) in enumerate(zip(g_got, g_want)):
        assert_grad_close(x, y, 2e-5, f"gradient of map {i}")
    # One term's gradient: only its map gets one (no backward for the others).
    (g5,) = torch.autograd.grad(got[6], s[5])
    assert_grad_close(g5, torch.autograd.grad(want[6], s[5])[0], 2e-5, "gradient of term 6 alone")


def test_launches_per_call(emu):
    """One or two kernel launches per op call (the issue's launch budget), on the real code."""
    s, t = features((2, 6, 16, 16), torch.float32), features((2, 6, 16, 16), torch.float32)

    def launches(fn):
        before = emu.emu_launches()
        out = fn()
        return emu.emu_launches() - before, out

    pod = pod_params("pod", lskd.PodTerm(s, t))
    n_fwd, (dist, emb) = launches(lambda: emu.pod_forward(s, t, None, None, *pod))
    n_bwd, _ = launches(lambda: emu.pod_backward(torch.ones(2), s, None, None, dist, emb, *pod))
    assert (n_fwd, n_bwd) == (2, 1)
    sop = sop_params("sop", lskd.SopTerm(s, t, groups=3))
    n_fwd, (dist, pooled) = launches(lambda: emu.sop_forward(s, t, None, None, *sop))
    n_bwd, _ = launches(lambda: emu.sop_backward(torch.ones(2), s, None, None, dist, pooled, *sop))
    assert (n_fwd, n_bwd) == (2, 1)
    labels = torch.randint(0, 7, (2, 32, 32))
    n_md, _ = launches(lambda: emu.md_masks(s, s * 0.5, s + 1, labels, 4, 255, 1e-8))
    assert n_md == 4  # md_stats (2) + label counts + selection


# --------------------------------------------------------------------------- md_stats and md_masks


def _check_md_masks(emu, a, cb, dn, labels, old=4, ignore=255):
    """Emulated md_masks == the rule's masks on the emulated statistics (bitwise), under this
    torch's quantile rank rule (probed in C++ by the kernel, in Python by the rule) and both rules."""
    stats = emu.md_stats(a, cb, dn, 1e-8)
    ref = reference.md_statistics(a.double(), cb.double(), dn.double())
    for x, y, name in zip(stats, ref, ("cos_bg", "cos_new", "gap_bg", "gap_new")):
        tol = 1e-12 if a.dtype == torch.float64 else 1e-5
        assert torch.allclose(x.double(), y, rtol=tol, atol=tol, equal_nan=True), name

    def set_rank_rule(rule):
        emu.emu_set_float64_ranks(-1 if rule is None else int(rule))

    return check_masks_match_composite(emu.md_masks, stats, a, cb, dn, labels, old, ignore, set_rank_rule)


MD_CASES = [
    ((2, 16, 16, 16), torch.float32),
    ((3, 19, 13, 11), torch.bfloat16),
    ((2, 7, 9, 5), torch.float64),
    ((1, 40, 48, 48), torch.float32),
    ((1, 6, 64, 160), torch.float16),
]  # 2304 / 10240 pixels: 512 / 1024 threads
MD_LABELS = [(torch.uint8, "mixed"), (torch.int64, "per_image"), (torch.int32, "ignore"), (torch.int64, "extremes")]


@pytest.mark.parametrize("label_dtype,scenario", MD_LABELS, ids=[f"{str(d)[6:]}-{s}" for d, s in MD_LABELS])
@pytest.mark.parametrize("shape,dtype", MD_CASES, ids=[f"{list(s)}-{dtype_id(d)}" for s, d in MD_CASES])
def test_md_masks_match_composite(emu, shape, dtype, label_dtype, scenario, seed):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    a, cb, dn = stat_inputs(shape, dtype)
    hl, wl = (2 * h, 2 * w) if scenario in ("mixed", "extremes") else (3 * h + 1, w + 2)
    _check_md_masks(emu, a, cb, dn, md_labels(n, hl, wl, label_dtype, scenario, g))


def test_md_masks_follows_the_rank_rule(emu):
    check_rank_rule_case(emu.md_masks, lambda rule: emu.emu_set_float64_ranks(-1 if rule is None else int(rule)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=dtype_id)
def test_md_masks_ties_nan_and_global_rows(emu, dtype, seed):
    a, cb, dn, labels = check_md_masks_ties_and_nan(
        lambda *x: _check_md_masks(emu, *x), dtype, torch.Generator().manual_seed(seed)
    )
    # Rows that do not fit the (here tiny) shared memory: keys read from global memory in every pass.
    emu.emu_set_device(4, 1024)
    try:
        _check_md_masks(emu, a, cb, dn, labels)
    finally:
        emu.emu_set_device(4, 227 * 1024)


# --------------------------------------------------------------------------- ce_unkd


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", range(3))
def test_ce_unkd_random_cases(emu, dtype, case, seed):
    """The CUDA kernel of ce_unkd (one thread per output pixel, atomics) against the reference:
    upsampling, identity and downsampling, K up to 40, ignored pixels, optional inputs, layouts."""
    rng = random.Random(seed)
    inputs = ce_unkd_inputs(rng, dtype, ("contiguous", "channels_last", "strided")[case], small=True)
    check_ce_unkd_raw(emu.ce_unkd_forward, *inputs)


def test_ce_unkd_many_classes_and_bad_target(emu):
    rng = random.Random(5)
    student, teacher, targets, weight, size = ce_unkd_inputs(rng, torch.float32, "channels_last", small=True, k=151)
    check_ce_unkd_raw(
        emu.ce_unkd_forward, student, torch.randn(student.shape[0], 120, *student.shape[2:]), targets, weight, size
    )
    y = torch.zeros(2, 4, 4, dtype=torch.int64)
    y[1, 1, 1] = 3
    ce = emu.ce_unkd_forward(torch.randn(2, 3, 2, 2), None, y, None, [4, 4], 255, 1, False)[0]
    assert torch.isfinite(ce[0]) and torch.isnan(ce[1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=dtype_id)
def test_ce_unkd_unbiased_ce(emu, dtype, seed):
    """The unbiased CE (targets y < M merged into one class) of the CUDA kernel, any M in [2, K]."""
    rng = random.Random(seed)
    student, _, targets, weight, size = ce_unkd_inputs(rng, dtype, "channels_last", small=True)
    k = student.shape[1]
    if targets is None:
        targets = torch.randint(0, k, (student.shape[0], *size))
    check_ce_unkd_raw(emu.ce_unkd_forward, student, None, targets, weight, size, rng.randint(min(2, k), k))


@pytest.mark.parametrize("op", ("pod", "sop"))
def test_gradcheck(emu, op):
    """float64 gradcheck of the emulated CUDA forward + backward (masks, odd shape, channels-last)."""
    shape = (2, 6, 7, 9)
    s = features(shape, torch.float64, layout="channels_last").requires_grad_()
    t = features(shape, torch.float64)
    sm, cm = torch.rand(2, 1, 7, 9, dtype=torch.float64), torch.rand(2, 6) < 0.7
    if op == "pod":
        spec, params = _emu_pod(emu), dict(scales=(1, 2, 3), square=True)
    else:
        spec, params = _emu_sop(emu), dict(groups=2, window=3, stride=2)
    assert torch.autograd.gradcheck(lambda x: spec.call("cuda", x, t, sm, cm, "none", **params), (s,))


# --------------------------------------------------------------------------- pseudo_labels


def _emu_pseudo_labels(emu):
    """The raw emulated op with acc-dtype thresholds (as check_op passes the wrapper's)."""
    return lambda t, y, thr: emu.pseudo_labels(t, y, thr.to(acc_dtype(t.dtype)), IGNORE)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pseudo_labels_random_cases(emu, dtype, layout, seed):
    """The CUDA kernel of pseudo_labels (one thread per output pixel, integer block sums and
    atomics) against the reference: upsampling, identity and downsampling, O up to 40, eligible,
    new-class and ignored labels, any teacher strides."""
    rng = random.Random(seed)
    check_pseudo_labels_op(_emu_pseudo_labels(emu), *pseudo_labels_inputs(rng, dtype, layout, small=False))


def test_pseudo_labels_many_classes(emu, seed):
    """O = 151 (ADE20K): each thread's two passes over the classes; images of several blocks."""
    rng = random.Random(seed)
    for layout in ("channels_last", "strided"):
        teacher, labels, thresholds = pseudo_labels_inputs(rng, torch.float32, layout, small=True, o=151)
        check_pseudo_labels_op(_emu_pseudo_labels(emu), teacher, labels, thresholds)
    teacher = torch.randn(2, 151, 5, 7)
    labels = torch.randint(0, 160, (2, 19, 23))  # 437 pixels: two blocks per image
    check_pseudo_labels_op(_emu_pseudo_labels(emu), teacher, labels, torch.rand(151))


def test_pseudo_labels_nan_ties_and_one_class(emu):
    """Exact ties give the first class; a NaN logit is never accepted and rejects only the pixels
    that weigh it; O = 1 has entropy 0; non-eligible pixels keep their label; N = 0."""
    op = _emu_pseudo_labels(emu)
    t = torch.zeros(1, 4, 2, 2)
    t[0, :, 0, 0] = torch.tensor([1.0, 5.0, 5.0, 5.0])  # a three-way tie: class 1
    t[0, :, 0, 1] = torch.tensor([1.0, float("nan"), 9.0, float("nan")])  # rejected, not its neighbours
    t[0, :, 1, 1] = torch.tensor([2.0, 7.0, 7.0, -1.0])
    labels = torch.tensor([[[0, 3], [4, 1]]])  # the pixel (1, 0) has a new class: kept
    got = op(t, labels, torch.ones(4))
    assert got[0].tolist() == [[[1, IGNORE], [4, 1]]] and got[1].tolist() == [2] and got[2].tolist() == [3]
    # thresholds of the tied classes: c* = 1, not 2 (accepted with thresholds[1] only)
    got = op(t[..., 1:, 1:], labels[..., 1:, 1:], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert got[0].tolist() == [[[1]]] and got[1].tolist() == [1]
    got = op(t[..., 1:, 1:], labels[..., 1:, 1:], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert got[0].tolist() == [[[IGNORE]]] and got[1].tolist() == [0]
    # a NaN anywhere (first, after a larger logit, last) is never accepted, whatever the threshold
    for c in range(4):
        nan = torch.tensor([3.0, 8.0, -2.0, 1.0]).view(1, 4, 1, 1)
        nan[0, c] = float("nan")
        got = op(nan, torch.zeros(1, 1, 1, dtype=torch.int64), torch.full((4,), float("inf")))
        assert got[0].tolist() == [[[IGNORE]]] and got[1].tolist() == [0] and got[2].tolist() == [1]
    # a NaN source logit rejects exactly the pixels that weigh it (weight > 0; one of weight 0 is
    # not read): the labels of a finite teacher (all accepted) elsewhere
    for size in ((3, 7), (6, 4), (5, 9), (3, 4), (2, 3), (7, 1)):
        t = torch.randn(1, 3, 3, 4)
        labels = torch.zeros(1, *size, dtype=torch.int64)
        finite = op(t, labels, torch.full((3,), 2.0))[0]
        assert (finite != IGNORE).all()
        for i, j in ((1, 2), (0, 0), (2, 3), (1, 1)):
            nan = t.clone()
            nan[0, 1, i, j] = float("nan")
            one = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
            one[0, 0, i, j] = 1.0
            weighs = F.interpolate(one, size=size, mode="bilinear", align_corners=False)[:, 0] > 0
            got = op(nan, labels, torch.full((3,), 2.0))
            assert torch.equal(got[0], torch.where(weighs, IGNORE, finite)), (size, i, j)
            assert got[1].tolist() == [labels.numel() - int(weighs.sum())]
    one = op(torch.randn(2, 1, 3, 3), torch.zeros(2, 5, 5, dtype=torch.int64), torch.tensor([0.5]))
    assert (one[0] == 0).all() and one[1].tolist() == [25, 25] and one[2].tolist() == [25, 25]
    zero = op(torch.randn(2, 1, 3, 3), torch.tensor([0, 1, 2, 7]).repeat(2, 5, 1), torch.tensor([0.0]))
    assert (zero[0][..., 0] == IGNORE).all() and (zero[0][..., 1:] == torch.tensor([1, 2, 7])).all()
    assert zero[1].tolist() == [0, 0] and zero[2].tolist() == [5, 5]
    empty = op(torch.randn(0, 3, 2, 2), torch.zeros(0, 4, 4, dtype=torch.int64), torch.ones(3))
    assert empty[0].shape == (0, 4, 4) and empty[1].shape == (0,) and empty[2].shape == (0,)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=dtype_id)
def test_pseudo_labels_non_contiguous_teacher(emu, dtype, seed):
    """A sliced view of a larger permuted buffer (no dense layout, batch stride 1, W the outermost):
    the kernel reads it with its four strides and gives the labels of its contiguous copy."""
    rng = random.Random(seed)
    teacher, labels, thresholds = pseudo_labels_inputs(rng, dtype, "contiguous", small=False, o=9)
    n, o, h, w = teacher.shape
    big = torch.randn(w + 3, 2 * o + 1, h + 2, n + 1, dtype=dtype).permute(3, 1, 2, 0)  # [n+1, 2o+1, h+2, w+3]
    view = big[1:, 1::2, 2:, :w]
    view.copy_(teacher)
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    op = _emu_pseudo_labels(emu)
    check_pseudo_labels_op(op, view, labels, thresholds)
    for a, b in zip(op(view, labels, thresholds), op(teacher, labels, thresholds)):
        assert torch.equal(a, b)
