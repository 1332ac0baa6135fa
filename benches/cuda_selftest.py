#!/usr/bin/env python
"""GPU self-test of the lskd CUDA kernels (csrc/cuda/*.cu).

Checks every CUDA op (the raw ``torch.ops.lskd`` ops, forward and backward)
against ``lskd.reference`` evaluated in float64 (gradients by autograd of the
reference), at the LSKD feature shapes with N = 2 and at odd shapes, for
float32 / bfloat16 / float16 / float64 inputs, NCHW-contiguous, channels-last
and misaligned non-dense (padded rows, storage offset of one element) layouts.
Every case runs twice and must give bitwise identical outputs; freed cache
blocks are filled with NaN before each op call, so that an output element the
kernels fail to write shows up. Also checks NaN propagation and the
zero-distance gradient. Inputs, layouts, masks and the raw ops' float64
definitions come from tests/helpers.py (shared with the test suite).

Usage (after ``pip install --no-build-isolation -e .`` on the GPU machine):

    python benches/cuda_selftest.py            # all checks, exit 1 on failure
    python benches/cuda_selftest.py --quick    # fewer shapes
    python benches/cuda_selftest.py --bench    # also time fwd+bwd at N = 12
    python benches/cuda_selftest.py --device cpu --smoke   # the small cases on the CPU kernels

Prints one PASS/FAIL line per case and a summary; without a CUDA device it
prints SKIP and exits 0; without the CUDA kernels it prints FAIL and exits 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Callable, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "tests"), ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import helpers as h  # noqa: E402

from lskd import _extension, reference  # noqa: E402

OPS = ["pod_forward", "pod_backward", "sop_forward", "sop_backward", "md_stats"]
# The order decides the mask kind of each case (the plans rotate the kinds over it).
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MASK_KINDS = ["none", "bool", "float"]
# Relative tolerances (errors normalised by the largest reference magnitude).
TOL_ACC = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
TOL_GRAD = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
# Smoke run (--smoke): the cases on maps of at most this many elements.
SMOKE_ELEMENTS = 2048

Shape = Tuple[int, int, int, int]


# ----------------------------------------------------------------------------- reporting
class Report:
    """PASS/FAIL lines and their counts, for the checks run on ``device``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.passed = 0
        self.failed = 0

    def result(self, name: str, ok: bool, detail: str = "") -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def poison(device: str) -> None:
    """Fills freed blocks of the caching allocator with NaN (both pools, many sizes)."""
    if device != "cuda":
        return
    bufs = []
    nbytes = 512
    while nbytes <= (1 << 28):
        for _ in range(2):
            bufs.append(torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device))
        nbytes *= 2
    del bufs


def twice(device: str, run: Callable[[], Tuple[torch.Tensor, ...]]) -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """``run()`` twice (NaN-poisoned allocator before each): its first outputs and whether both
    runs gave bitwise the same outputs."""
    outs = []
    for _ in range(2):
        poison(device)
        outs.append(run())
        sync(device)
    return outs[0], all(bitwise_equal(x, y) for x, y in zip(outs[0], outs[1]))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (NaN anywhere -> nan, which fails every check).

    For float16/bfloat16 outputs, differences up to two subnormal steps of the
    output dtype are ignored (tiny gradients are subnormal in float16).
    """
    atol = 0.0
    if out.dtype in (torch.float16, torch.bfloat16):
        fi = torch.finfo(out.dtype)
        atol = 2 * fi.tiny * fi.eps
    out = out.double()
    ref = ref.detach().double()
    if out.shape != ref.shape:
        return float("nan")
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    err = ((out - ref).abs() - atol).clamp_min(0).max().item()
    if not math.isfinite(scale):
        return float("nan")
    return err / max(scale, 1e-30)


def bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN equals NaN)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    ib = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    return torch.equal(x.contiguous().view(ib), y.contiguous().view(ib))


def zero_where_dist_zero(g_ref: torch.Tensor, d_ref: torch.Tensor) -> torch.Tensor:
    """The ops define the gradient at d == 0 as 0 (autograd of the reference gives NaN there)."""
    zero = (d_ref.detach() == 0).view(-1, 1, 1, 1)
    return torch.where(zero, torch.zeros_like(g_ref), g_ref)


# ----------------------------------------------------------------------------- inputs
def student_teacher(shape: Sequence[int], dtype: torch.dtype, device: str, spread: float = 0.3):
    """Student ``[N, C, H, W]`` and a teacher ``spread`` (standard deviations) away from it, rounded
    to ``dtype``: the distances are small next to the features, as in distillation."""
    a = h.features(shape, h.F64, device)
    return a.to(dtype), (a + spread * h.features(shape, h.F64, device)).to(dtype)


def masks(kind: str, shape: Shape, dtype: torch.dtype, device: str):
    """``(spatial, channel)`` for the reference (float64 or bool, ``[N, 1, H, W]`` / ``[N, C]``) and
    the raw ops' versions (``[N, H, W]`` / ``[N, C]`` in the acc dtype): four tensors, or Nones."""
    n, c, hh, w = shape
    sm, cm = h.spatial_mask(kind, n, hh, w, dtype, device), h.channel_mask(kind, n, c, dtype, device)
    if sm is None:
        return None, None, None, None
    acc = h.acc_dtype(dtype)
    return h.mask64(sm), h.mask64(cm), sm[:, 0].to(acc).contiguous(), cm.to(acc).contiguous()


def format_ok(grad, a, a_l, layout, *acc_outputs) -> bool:
    """The gradient has the student's dtype and shape (and strides, for dense layouts); the other
    outputs are in the acc dtype."""
    acc = h.acc_dtype(a.dtype)
    ok = grad.dtype == a.dtype and grad.shape == a.shape and all(t.dtype == acc for t in acc_outputs)
    if layout in ("contiguous", "channels_last"):
        ok = ok and grad.stride() == a_l.stride()
    return ok


# ----------------------------------------------------------------------------- checks
def check_pod(rep: Report, shape: Shape, dtype, layout: str, scales, square: bool, mask_kind: str, seed: int) -> None:
    """pod_forward -> (dist [N], emb [N, C, L]) and pod_backward -> grad [N, C, H, W] on a student and
    teacher of ``shape`` in ``layout``, against the float64 reference."""
    name = f"pod {list(shape)} {h.dtype_id(dtype)} {layout} scales={tuple(scales)} sq={int(square)} masks={mask_kind}"
    dev, n = rep.device, shape[0]
    torch.manual_seed(seed)
    a, b = student_teacher(shape, dtype, dev)
    sm, cm, sm_op, cm_op = masks(mask_kind, shape, dtype, dev)
    a_l, b_l = h.to_layout(a, layout), h.to_layout(b, layout)
    gd = torch.randn(n, device=dev, dtype=h.acc_dtype(dtype))

    def run():
        dist, emb = torch.ops.lskd.pod_forward(a_l, b_l, sm_op, cm_op, list(scales), square)
        poison(dev)
        return dist, emb, torch.ops.lskd.pod_backward(gd, a_l, sm_op, cm_op, dist, emb, list(scales), square)

    (dist, emb, grad), det = twice(dev, run)
    a64 = a.double().requires_grad_(True)
    d_ref = reference.pod_distances(a64, b.double(), sm, cm, scales, square)
    (g_ref,) = torch.autograd.grad(d_ref, a64, gd.double())
    g_ref = zero_where_dist_zero(g_ref, d_ref)
    with torch.no_grad():
        _, e_ref = h.pod_schema_reference(a, b, sm, cm, scales, square)
    e_d, e_e, e_g = rel_err(dist, d_ref), rel_err(emb, e_ref), rel_err(grad, g_ref)
    fmt = format_ok(grad, a, a_l, layout, dist, emb)
    ok = e_d <= TOL_ACC[dtype] and e_e <= TOL_ACC[dtype] and e_g <= TOL_GRAD[dtype] and det and fmt
    rep.result(name, ok, f"dist={e_d:.1e} emb={e_e:.1e} grad={e_g:.1e} det={det} fmt={fmt}")


def check_sop(rep: Report, shape: Shape, dtype, layout, groups, window, stride, padding, mask_kind, release_ref, seed):
    """sop_forward -> (dist [N], pooled_grad [N, G * k, Ho, Wo]) and sop_backward -> grad [N, C, H, W]
    against the float64 definitions (helpers.sop_schema_reference). ``release_ref``: the geometry is
    also lskd.reference.sop_distances' (square windows with padding w // 2, or one global window),
    which then gives the distance, checked against the generic definition too."""
    name = (
        f"sop {list(shape)} {h.dtype_id(dtype)} {layout} G={groups} win={tuple(window)} str={tuple(stride)} "
        f"pad={tuple(padding)} masks={mask_kind}"
    )
    dev, (n, _, hh, w) = rep.device, shape
    geometry = (list(window), list(stride), list(padding))
    torch.manual_seed(seed)
    a, b = student_teacher(shape, dtype, dev)
    sm, cm, sm_op, cm_op = masks(mask_kind, shape, dtype, dev)
    a_l, b_l = h.to_layout(a, layout), h.to_layout(b, layout)
    gd = torch.randn(n, device=dev, dtype=h.acc_dtype(dtype))

    def run():
        dist, pgrad = torch.ops.lskd.sop_forward(a_l, b_l, sm_op, cm_op, groups, *geometry)
        poison(dev)
        return dist, pgrad, torch.ops.lskd.sop_backward(gd, a_l, sm_op, cm_op, dist, pgrad, groups, *geometry)

    (dist, pgrad, grad), det = twice(dev, run)
    a64, b64 = a.double().requires_grad_(True), b.double()
    d_gen, pg_ref = h.sop_schema_reference(a64, b64, sm, cm, groups, window, stride, padding)
    d_ref, e_refs = d_gen, 0.0
    if release_ref:
        if tuple(window) == (hh, w) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
            d_ref = reference.sop_distances(a64, b64, sm, cm, groups, None, 1)
        else:
            d_ref = reference.sop_distances(a64, b64, sm, cm, groups, window[0], stride[0])
        e_refs = rel_err(d_gen, d_ref)
    (g_ref,) = torch.autograd.grad(d_ref, a64, gd.double())
    g_ref = zero_where_dist_zero(g_ref, d_ref)
    e_d, e_p, e_g = rel_err(dist, d_ref), rel_err(pgrad, pg_ref), rel_err(grad, g_ref)
    fmt = format_ok(grad, a, a_l, layout, dist, pgrad)
    ok = e_d <= 5 * TOL_ACC[dtype] and e_p <= 5 * TOL_ACC[dtype] and e_g <= 2 * TOL_GRAD[dtype]
    ok = ok and det and fmt and e_refs <= 1e-9
    errors = f"dist={e_d:.1e} pooled_grad={e_p:.1e} grad={e_g:.1e} ref_agree={e_refs:.1e}"
    rep.result(name, ok, f"{errors} det={det} fmt={fmt}")


def check_md(rep: Report, shape: Shape, dtype, layout: str, seed: int, eps: float = 1e-8) -> None:
    """md_stats -> (cos_bg, cos_new [N, H, W], gap_bg, gap_new [N, C]) against lskd.reference.md_statistics."""
    name = f"md {list(shape)} {h.dtype_id(dtype)} {layout}"
    dev, (n, c, hh, w) = rep.device, shape
    torch.manual_seed(seed)
    A, Cb, Dn = h.stat_inputs(shape, dtype, "contiguous", dev)  # zero vectors in Cb and Dn: the eps clamp
    A = A + 0.2  # non-zero channel means
    A_l, Cb_l, Dn_l = (h.to_layout(t, layout) for t in (A, Cb, Dn))
    (cos_bg, cos_new, gap_bg, gap_new), det = twice(dev, lambda: torch.ops.lskd.md_stats(A_l, Cb_l, Dn_l, eps))
    r = reference.md_statistics(A.double(), Cb.double(), Dn.double(), eps)
    e_cb = (cos_bg.double() - r[0]).abs().max().item()  # cosines are O(1): absolute errors
    e_cn = (cos_new.double() - r[1]).abs().max().item()
    mean_scale = A.double().mean(dim=(2, 3)).abs().max().item() + 1e-3
    e_gb = (gap_bg.double() - r[2]).abs().max().item() / max(r[2].abs().max().item(), mean_scale)
    e_gn = (gap_new.double() - r[3]).abs().max().item() / max(r[3].abs().max().item(), mean_scale)
    acc = h.acc_dtype(dtype)
    fmt = all(t.dtype == acc for t in (cos_bg, cos_new, gap_bg, gap_new))
    fmt = fmt and cos_bg.shape == (n, hh, w) and gap_bg.shape == (n, c)
    ok = all(e <= TOL_ACC[dtype] for e in (e_cb, e_cn, e_gb, e_gn)) and det and fmt
    rep.result(name, ok, f"cos_bg={e_cb:.1e} cos_new={e_cn:.1e} gap_bg={e_gb:.1e} gap_new={e_gn:.1e} det={det}")


def check_special(rep: Report, shapes: Sequence[Shape]) -> None:
    """Zero distance -> gradient exactly 0; a NaN in image 0 -> NaN for image 0 only."""
    dev = rep.device
    torch.manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        gd_dtype = h.acc_dtype(dtype)
        for shape in shapes:
            where = f"{list(shape)} {h.dtype_id(dtype)}"
            a, b = student_teacher(shape, dtype, dev)
            gd = torch.ones(shape[0], device=dev, dtype=gd_dtype)
            d, e = torch.ops.lskd.pod_forward(a, a.clone(), None, None, [1, 2, 4], True)
            g = torch.ops.lskd.pod_backward(gd, a, None, None, d, e, [1, 2, 4], True)
            rep.result(f"pod zero-distance {where}", bool((d == 0).all()) and bool((g == 0).all()))
            d, pg = torch.ops.lskd.sop_forward(a, a.clone(), None, None, 2, [5, 5], [2, 2], [2, 2])
            g = torch.ops.lskd.sop_backward(gd, a, None, None, d, pg, 2, [5, 5], [2, 2], [2, 2])
            rep.result(f"sop zero-distance {where}", bool((d == 0).all()) and bool((g == 0).all()))
            an = a.clone()
            an[0, 0, 0, 0] = float("nan")
            for layout in ("contiguous", "channels_last"):
                check_nan_propagation(rep, h.to_layout(an, layout), h.to_layout(b, layout), f"{where} {layout}")


def check_nan_propagation(rep: Report, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    """``a`` holds a NaN in image 0: every op gives NaN for image 0 and finite values elsewhere."""
    d, _ = torch.ops.lskd.pod_forward(a, b, None, None, [1, 2, 4], True)
    rep.result(f"pod NaN-propagation {where}", bool(torch.isnan(d[0])) and bool(torch.isfinite(d[1:]).all()))
    d, _ = torch.ops.lskd.sop_forward(a, b, None, None, 2, [5, 5], [2, 2], [2, 2])
    rep.result(f"sop NaN-propagation {where}", bool(torch.isnan(d[0])) and bool(torch.isfinite(d[1:]).all()))
    cb, _, gb, _ = torch.ops.lskd.md_stats(a, b, b, 1e-8)
    ok = bool(torch.isnan(cb[0, 0, 0])) and bool(torch.isnan(gb[0, 0]))
    ok = ok and bool(torch.isfinite(cb[1:]).all()) and bool(torch.isfinite(gb[1:]).all())
    rep.result(f"md NaN-propagation {where}", ok)


def check_expanded_grad_dist(rep: Report) -> None:
    """An expanded (stride-0) grad_dist, as autograd gives for a mean, gives the same gradient."""
    dev = rep.device
    torch.manual_seed(3)
    a, b = student_teacher((2, 4, 8, 8), torch.float32, dev)
    full, expanded = torch.full((2,), 0.5, device=dev), torch.tensor(0.5, device=dev).expand(2)
    d, e = torch.ops.lskd.pod_forward(a, b, None, None, [1, 2], True)
    g1, g2 = (torch.ops.lskd.pod_backward(gd, a, None, None, d, e, [1, 2], True) for gd in (full, expanded))
    rep.result("pod expanded grad_dist", bitwise_equal(g1, g2))
    geometry = ([3, 3], [1, 1], [1, 1])
    d, pg = torch.ops.lskd.sop_forward(a, b, None, None, 2, *geometry)
    g1, g2 = (torch.ops.lskd.sop_backward(gd, a, None, None, d, pg, 2, *geometry) for gd in (full, expanded))
    rep.result("sop expanded grad_dist", bitwise_equal(g1, g2))


# ----------------------------------------------------------------------------- plan
def odd_layouts(dtype) -> Tuple[str, ...]:
    """The layouts of the odd shapes: all three for float32 and bfloat16, contiguous otherwise."""
    if dtype in (torch.float32, torch.bfloat16):
        return ("contiguous", "channels_last", "misaligned")
    return ("contiguous",)


def lskd_shapes(quick: bool) -> List[Shape]:
    return h.LSKD_SHAPES[:1] + h.LSKD_SHAPES[4:] if quick else list(h.LSKD_SHAPES)


def pod_cases(quick: bool) -> list:
    """``(shape, dtype, layout, scales, square, mask kind)`` of every pod check."""
    cases = []
    shapes = lskd_shapes(quick)
    for si, shape in enumerate(shapes):
        for di, dtype in enumerate(DTYPES):
            for layout in ("contiguous", "channels_last"):
                mk = MASK_KINDS[(si + di + (layout == "channels_last")) % 3]
                square = not (si == len(shapes) - 1 and di == 0)
                cases.append((shape, dtype, layout, (1, 2, 4), square, mk))
    odd = [
        ((1, 1, 1, 1), (1,)),
        ((2, 3, 70, 33), (1, 2, 4)),
        ((1, 5, 7, 129), (1, 2, 4)),
        ((3, 2, 1, 9), (1,)),
        ((2, 3, 17, 19), (1, 3, 5)),
        ((2, 4, 9, 300), (2, 3)),
        ((1, 2, 40, 40), (9, 10, 11, 12, 13, 14, 15, 16)),  # > 64 atoms: generic kernels
        ((1, 2, 3, 13000), (1, 2, 3)),  # rows too wide for shared memory: generic forward
        ((1, 2, 13000, 3), (1, 2, 3)),  # tables too tall: generic backward
    ]
    for oi, (shape, scales) in enumerate(odd):
        for di, dtype in enumerate(DTYPES):
            for layout in odd_layouts(dtype):
                cases.append((shape, dtype, layout, scales, (oi + di) % 4 != 3, MASK_KINDS[(oi + di) % 3]))
    return cases


def sop_cases(quick: bool) -> list:
    """``(shape, dtype, layout, groups, window, stride, padding, mask kind, release_ref)`` of every sop check."""
    cases = []
    released = [((2, 256, 32, 32), 20, True), ((2, 16, 32, 32), 4, True)]
    if not quick:
        released.append(((2, 512, 64, 64), 4, False))
    for si, (shape, groups, rel) in enumerate(released):
        hh, w = shape[2], shape[3]
        for di, dtype in enumerate(DTYPES):
            for layout in ("contiguous", "channels_last"):
                mk = MASK_KINDS[(si + di + (layout == "channels_last")) % 3]
                cases.append((shape, dtype, layout, groups, (5, 5), (2, 2), (2, 2), mk, rel))
                cases.append((shape, dtype, layout, groups, (hh, w), (1, 1), (0, 0), mk, rel))
    odd = [
        ((1, 1, 1, 1), 1, (1, 1), (1, 1), (0, 0)),
        ((1, 1, 1, 1), 1, (3, 3), (2, 2), (1, 1)),
        ((2, 3, 70, 33), 2, (5, 3), (2, 1), (2, 1)),
        ((1, 5, 7, 129), 5, (7, 129), (1, 1), (0, 0)),
        ((2, 40, 9, 9), 3, (9, 9), (1, 1), (4, 4)),
        ((3, 7, 6, 5), 2, (2, 4), (3, 1), (1, 2)),
        ((1, 9000, 4, 4), 1, (3, 3), (1, 1), (1, 1)),  # k = 9000: channel chunks, pooled twice
    ]
    for oi, (shape, groups, win, st, pad) in enumerate(odd):
        for di, dtype in enumerate(DTYPES):
            for layout in odd_layouts(dtype):
                cases.append((shape, dtype, layout, groups, win, st, pad, MASK_KINDS[(oi + di) % 3], False))
    return cases


def md_cases(quick: bool) -> list:
    """``(shape, dtype, layout)`` of every md_stats check."""
    odd = [(1, 1, 1, 1), (2, 3, 70, 33), (1, 5, 7, 129), (3, 2, 1, 9), (2, 33, 5, 5), (1, 300, 3, 3)]
    cases = [(s, d, lay) for s in lskd_shapes(quick) for d in DTYPES for lay in ("contiguous", "channels_last")]
    return cases + [(s, d, lay) for s in odd for d in DTYPES for lay in odd_layouts(d)]


def small(cases: list) -> list:
    """The cases on maps of at most SMOKE_ELEMENTS elements (their first item is the shape)."""
    return [case for case in cases if math.prod(case[0]) <= SMOKE_ELEMENTS]


def run_checks(rep: Report, quick: bool, smoke: bool) -> None:
    """Every check of the plan (``smoke``: only the small cases), a crash counting as a failed case."""
    pick = small if smoke else (lambda cases: cases)
    checks = [(f"pod {case}", check_pod, case) for case in pick(pod_cases(quick))]
    checks += [(f"sop {case}", check_sop, case) for case in pick(sop_cases(quick))]
    checks += [(f"md {case}", check_md, case) for case in pick(md_cases(quick))]
    for seed, (name, check, case) in enumerate(checks, start=1):
        guarded(rep, name, lambda: check(rep, *case, seed))
    special_shapes = [(2, 8, 16, 16)] if smoke else [(2, 8, 16, 16), (2, 3, 70, 33)]
    guarded(rep, "special values", lambda: check_special(rep, special_shapes))
    guarded(rep, "expanded grad_dist", lambda: check_expanded_grad_dist(rep))


def guarded(rep: Report, name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # a crash is a failure of this case, not of the run
        rep.result(name, False, f"exception {exc!r}")
        traceback.print_exc()
        sync(rep.device)


# ----------------------------------------------------------------------------- bench (optional)
def timeit(fn: Callable[[], object], reps: int = 20) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events, 3 warm-up calls)."""
    for _ in range(3):
        fn()
    sync("cuda")
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def bench() -> None:
    """fwd+bwd times of the CUDA ops at the LSKD shapes, N = 12 (CUDA events, median of 20)."""
    import lskd_workload  # benches/, the benchmarks' shapes

    print(f"# bench on {torch.cuda.get_device_name()} (ms, median; floor = bytes / 4.18 TB/s)")
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.tensor([], dtype=dtype).element_size()
        gd = torch.ones(12, device="cuda", dtype=h.acc_dtype(dtype))
        tot_pod = tot_md = 0.0
        for shape in lskd_workload.GPU_MAPS:
            torch.manual_seed(0)
            a, b = student_teacher(shape, dtype, "cuda")
            d, e = torch.ops.lskd.pod_forward(a, b, None, None, [1, 2, 4], True)
            t_f = timeit(lambda: torch.ops.lskd.pod_forward(a, b, None, None, [1, 2, 4], True))
            t_b = timeit(lambda: torch.ops.lskd.pod_backward(gd, a, None, None, d, e, [1, 2, 4], True))
            floor = 4 * a.numel() * es / 4.18e12 * 1e3
            c = b + 0.1 * torch.randn_like(b)  # three distinct tensors (no cache reuse)
            t_m = timeit(lambda: torch.ops.lskd.md_stats(a, b, c, 1e-8))
            floor_m = 3 * a.numel() * es / 4.18e12 * 1e3
            tot_pod += t_f + t_b
            tot_md += t_m
            print(
                f"{h.dtype_id(dtype)} {list(shape)} pod fwd {t_f:.3f} bwd {t_b:.3f} (floor {floor:.3f}); "
                f"md_stats {t_m:.3f} (floor {floor_m:.3f})"
            )
        torch.manual_seed(0)
        a, b = student_teacher((12, 256, 32, 32), dtype, "cuda")
        geometry = ([5, 5], [2, 2], [2, 2])
        d, pg = torch.ops.lskd.sop_forward(a, b, None, None, 20, *geometry)
        t_f = timeit(lambda: torch.ops.lskd.sop_forward(a, b, None, None, 20, *geometry))
        t_b = timeit(lambda: torch.ops.lskd.sop_backward(gd, a, None, None, d, pg, 20, *geometry))
        floor = 4 * a.numel() * es / 4.18e12 * 1e3
        print(f"{h.dtype_id(dtype)} sop [12,256,32,32] fwd {t_f:.3f} bwd {t_b:.3f} (floor {floor:.3f})")
        name = h.dtype_id(dtype)
        print(f"{name} total pod fwd+bwd over six maps {tot_pod:.3f} ms; md_stats six maps {tot_md:.3f} ms")


# ----------------------------------------------------------------------------- main
def missing_kernels(key: str) -> List[str]:
    """The raw ops without a kernel for dispatch key ``key`` ("CUDA" / "CPU")."""

    def has(op: str) -> bool:
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"lskd::{op}", key)
        except RuntimeError:  # no such operator: lskd._C is not loaded
            return False

    return [op for op in OPS if not has(op)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--smoke", action="store_true", help=f"only the cases on maps of <= {SMOKE_ELEMENTS} elements")
    ap.add_argument("--bench", action="store_true", help="also time the ops at N = 12")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: dry run of this script against the CPU kernels (no GPU needed)",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP cuda_selftest: no CUDA device visible (this test needs a GPU)")
        return 0
    key = args.device.upper()
    missing = missing_kernels(key)
    if missing:
        why = _extension.load_error() or "lskd._C is loaded"
        print(f"FAIL lskd._C has no {key} kernels for {missing} ({why}; a CUDA build needs FORCE_CUDA=1)")
        return 1
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
    print(f"# lskd {key} self-test on {where}, torch {torch.__version__}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    rep = Report(args.device)
    run_checks(rep, args.quick, args.smoke)
    print(f"# summary: {rep.passed} passed, {rep.failed} failed", flush=True)
    if args.bench and rep.failed == 0 and args.device == "cuda":
        bench()
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
