#!/usr/bin/env python
"""GPU self-test of the lskd CUDA kernels (csrc/cuda/*.cu).

Checks every CUDA op (the raw ``torch.ops.lskd`` ops, forward and backward)
against ``lskd.reference`` evaluated in float64 (gradients by autograd of the
reference), at the LSKD feature shapes with N = 2 and at odd shapes, for
float32 / bfloat16 / float16 / float64 inputs, NCHW-contiguous, channels-last
and non-dense (padded rows, misaligned) layouts. Every case runs twice and
must give bitwise identical outputs; freed cache blocks are filled with NaN
before each op call, so that an output element the kernels fail to write
shows up. Also checks NaN propagation and the zero-distance gradient.

Usage (after ``pip install --no-build-isolation -e .`` on the GPU machine):

    python benches/cuda_selftest.py            # all checks, exit 1 on failure
    python benches/cuda_selftest.py --quick    # fewer shapes
    python benches/cuda_selftest.py --bench    # also time fwd+bwd at N = 12

Prints one PASS/FAIL line per case and a summary; without a CUDA device (or
without the CUDA kernels) it prints SKIP and exits 0 / FAIL and exits 1.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = "cuda"  # --device cpu: dry run of this script against the CPU kernels
OPS = ["pod_forward", "pod_backward", "sop_forward", "sop_backward", "md_stats"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DNAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
# Relative tolerances (errors normalised by the largest reference magnitude).
TOL_ACC = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
TOL_GRAD = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


# ----------------------------------------------------------------------------- loading
def load_extension() -> str | None:
    """Loads lskd._C (its CUDA kernels register with torch.ops.lskd). Returns an error or None."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    err = None
    try:
        importlib.import_module("lskd._C")
    except Exception as exc:  # the package __init__ or the library failed: try the .so directly
        err = f"import lskd._C failed: {exc!r}"
        libs = sorted(glob.glob(os.path.join(ROOT, "lskd", "_C*.so")))
        for lib in libs:
            try:
                torch.ops.load_library(lib)
                err = None
                break
            except Exception as exc2:
                err += f"; load_library({lib}) failed: {exc2!r}"
    return err


def load_reference():
    """lskd/reference.py, loaded from its file (it needs only torch; this avoids importing lskd twice)."""
    path = os.path.join(ROOT, "lskd", "reference.py")
    spec = importlib.util.spec_from_file_location("lskd_reference_selftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- helpers
class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def result(self, name: str, ok: bool, detail: str = "") -> None:
        if ok:
            self.passed += 1
            print(f"PASS {name} {detail}".rstrip(), flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name} {detail}".rstrip(), flush=True)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def poison() -> None:
    """Fills freed blocks of the caching allocator with NaN (both pools, many sizes)."""
    if DEV != "cuda":
        return
    dev = torch.device("cuda")
    bufs = []
    nbytes = 512
    while nbytes <= (1 << 28):
        for _ in range(2):
            bufs.append(torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=dev))
        nbytes *= 2
    del bufs


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "contig":
        return x.contiguous()
    if layout == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "padded":  # non-dense rows, storage offset of one element (misaligned)
        n, c, h, w = x.shape
        big = torch.zeros(n, c, h, w + 3, dtype=x.dtype, device=x.device)
        view = big[..., 1 : w + 1]
        view.copy_(x)
        return view
    raise ValueError(layout)


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
    ref = ref.double()
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
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    ib = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    return torch.equal(x.contiguous().view(ib), y.contiguous().view(ib))


def zero_where_dist_zero(g_ref: torch.Tensor, d_ref: torch.Tensor) -> torch.Tensor:
    """The ops define the gradient at d == 0 as 0 (autograd of the reference gives NaN there)."""
    zero = (d_ref.detach() == 0).view(-1, 1, 1, 1)
    return torch.where(zero, torch.zeros_like(g_ref), g_ref)


def make_masks(n, c, h, w, acc, gen, kind: str):
    """(spatial [N,1,H,W] for the reference, channel [N,C] for the reference, op versions)."""
    dev = DEV
    if kind == "none":
        return None, None, None, None
    sm = torch.rand(n, 1, h, w, generator=gen, device=dev) < 0.7
    if kind == "float":
        cm = torch.rand(n, c, generator=gen, device=dev, dtype=torch.float64)
    else:
        cm = torch.rand(n, c, generator=gen, device=dev) < 0.8
    return sm, cm, sm[:, 0].to(acc).contiguous(), cm.to(acc).contiguous()


def inputs(shape, dtype, gen, scale_b=0.3):
    a64 = torch.randn(shape, generator=gen, device=DEV, dtype=torch.float64)
    b64 = a64 + scale_b * torch.randn(shape, generator=gen, device=DEV, dtype=torch.float64)
    return a64.to(dtype), b64.to(dtype)


# ----------------------------------------------------------------------------- pod
def pod_emb_ref(z: torch.Tensor, scales) -> torch.Tensor:
    """The [N, C, L] layout of csrc/ops.cpp, from z in float64."""
    n, c, h, w = z.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        hs, ws = s * kh, s * kw
        zz = z[:, :, :hs, :ws]
        wp = zz.reshape(n, c, hs, s, kw).mean(-1)  # (r, j)
        parts.append(wp.permute(0, 1, 3, 2).reshape(n, c, s * hs))  # j * Hs + r
        hp = zz.reshape(n, c, s, kh, ws).mean(3)  # (i, q)
        parts.append(hp.reshape(n, c, s * ws))  # i * Ws + q
    return torch.cat(parts, -1)


def check_pod(rep, ref, shape, dtype, layout, scales, square, mask_kind, seed):
    name = f"pod {list(shape)} {DNAME[dtype]} {layout} scales={tuple(scales)} sq={int(square)} masks={mask_kind}"
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n, c, h, w = shape
    acc = acc_dtype(dtype)
    a, b = inputs(shape, dtype, gen)
    sm, cm, sm_op, cm_op = make_masks(n, c, h, w, acc, gen, mask_kind)
    a_l, b_l = to_layout(a, layout), to_layout(b, layout)
    gd = torch.randn(n, generator=gen, device=DEV, dtype=acc)
    outs = []
    for _ in range(2):
        poison()
        dist, emb = torch.ops.lskd.pod_forward(a_l, b_l, sm_op, cm_op, list(scales), square)
        poison()
        grad = torch.ops.lskd.pod_backward(gd, a_l, sm_op, cm_op, dist, emb, list(scales), square)
        sync()
        outs.append((dist, emb, grad))
    dist, emb, grad = outs[0]
    det = all(bitwise_equal(x, y) for x, y in zip(outs[0], outs[1]))

    a64 = a.double().requires_grad_(True)
    b64 = b.double()
    cm64 = cm.double() if cm is not None else None
    d_ref = ref.pod_distances(a64, b64, sm, cm64, scales, square)
    (g_ref,) = torch.autograd.grad(d_ref, a64, gd.double())
    g_ref = zero_where_dist_zero(g_ref, d_ref)
    with torch.no_grad():
        xa = ref.apply_masks(a.double(), sm, cm64)
        xb = ref.apply_masks(b64, sm, cm64)
        z = xa * xa - xb * xb if square else xa - xb
        e_ref = pod_emb_ref(z, scales)
    e_d = rel_err(dist, d_ref.detach())
    e_e = rel_err(emb, e_ref)
    e_g = rel_err(grad, g_ref)
    fmt_ok = grad.dtype == a.dtype and grad.shape == a.shape and dist.dtype == acc and emb.dtype == acc
    if layout in ("contig", "cl"):
        fmt_ok = fmt_ok and grad.stride() == a_l.stride()
    ok = e_d <= TOL_ACC[dtype] and e_e <= TOL_ACC[dtype] and e_g <= TOL_GRAD[dtype] and det and fmt_ok
    rep.result(name, ok, f"dist={e_d:.1e} emb={e_e:.1e} grad={e_g:.1e} det={det} fmt={fmt_ok}")


# ----------------------------------------------------------------------------- sop
def sop_ref_generic(a64, b64, sm, cm, groups, window, stride, padding):
    """float64 reference for any (window, stride, padding): (d [N], pooled_grad)."""
    ref_masks = sop_ref_generic.ref
    xa = ref_masks.apply_masks(a64, sm, cm)
    xb = ref_masks.apply_masks(b64, sm, cm)
    n, c, h, w = xa.shape
    k = c // groups
    gk = groups * k
    pa = F.avg_pool2d(xa[:, :gk], tuple(window), tuple(stride), tuple(padding), count_include_pad=True)
    pb = F.avg_pool2d(xb[:, :gk], tuple(window), tuple(stride), tuple(padding), count_include_pad=True)
    pa_d = pa.detach().requires_grad_(True)

    def terms_of(p_a, p_b):
        p = p_a.reshape(n, groups, k, -1).transpose(2, 3)
        q = p_b.reshape(n, groups, k, -1).transpose(2, 3)
        u, v = p - q, p + q
        uu, vv, uv = (u * u).sum(-1), (v * v).sum(-1), (u * v).sum(-1)
        return 0.5 * (uu * vv + uv * uv)  # [N, G, P]

    t = terms_of(pa, pb.detach())
    d = t.sum(dim=(1, 2)).sqrt()
    (pg,) = torch.autograd.grad(terms_of(pa_d, pb.detach()).sum(), pa_d)
    return d, pg


def check_sop(rep, ref, shape, dtype, layout, groups, window, stride, padding, mask_kind, seed, use_release_ref):
    name = (
        f"sop {list(shape)} {DNAME[dtype]} {layout} G={groups} win={tuple(window)} str={tuple(stride)} "
        f"pad={tuple(padding)} masks={mask_kind}"
    )
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n, c, h, w = shape
    acc = acc_dtype(dtype)
    a, b = inputs(shape, dtype, gen)
    sm, cm, sm_op, cm_op = make_masks(n, c, h, w, acc, gen, mask_kind)
    a_l, b_l = to_layout(a, layout), to_layout(b, layout)
    gd = torch.randn(n, generator=gen, device=DEV, dtype=acc)
    outs = []
    for _ in range(2):
        poison()
        dist, pgrad = torch.ops.lskd.sop_forward(
            a_l, b_l, sm_op, cm_op, groups, list(window), list(stride), list(padding)
        )
        poison()
        grad = torch.ops.lskd.sop_backward(
            gd, a_l, sm_op, cm_op, dist, pgrad, groups, list(window), list(stride), list(padding)
        )
        sync()
        outs.append((dist, pgrad, grad))
    dist, pgrad, grad = outs[0]
    det = all(bitwise_equal(x, y) for x, y in zip(outs[0], outs[1]))

    a64 = a.double().requires_grad_(True)
    b64 = b.double()
    cm64 = cm.double() if cm is not None else None
    d_gen, pg_ref = sop_ref_generic(a64, b64, sm, cm64, groups, window, stride, padding)
    if use_release_ref:  # lskd.reference.sop_distances (square windows, padding w // 2, or global)
        if tuple(window) == (h, w) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
            d_ref = ref.sop_distances(a64, b64, sm, cm64, groups, None, 1)
        else:
            d_ref = ref.sop_distances(a64, b64, sm, cm64, groups, window[0], stride[0])
        e_refs = rel_err(d_gen.detach(), d_ref.detach())
    else:
        d_ref = d_gen
        e_refs = 0.0
    (g_ref,) = torch.autograd.grad(d_ref, a64, gd.double())
    g_ref = zero_where_dist_zero(g_ref, d_ref)
    e_d = rel_err(dist, d_ref.detach())
    e_p = rel_err(pgrad, pg_ref)
    e_g = rel_err(grad, g_ref)
    fmt_ok = grad.dtype == a.dtype and grad.shape == a.shape and dist.dtype == acc and pgrad.dtype == acc
    if layout in ("contig", "cl"):
        fmt_ok = fmt_ok and grad.stride() == a_l.stride()
    ok = (
        e_d <= 5 * TOL_ACC[dtype]
        and e_p <= 5 * TOL_ACC[dtype]
        and e_g <= 2 * TOL_GRAD[dtype]
        and det
        and fmt_ok
        and e_refs <= 1e-9
    )
    rep.result(
        name, ok, f"dist={e_d:.1e} pooled_grad={e_p:.1e} grad={e_g:.1e} det={det} fmt={fmt_ok} ref_agree={e_refs:.1e}"
    )


# ----------------------------------------------------------------------------- md
def check_md(rep, ref, shape, dtype, layout, seed, eps=1e-8):
    name = f"md {list(shape)} {DNAME[dtype]} {layout}"
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n, c, h, w = shape
    A, Cb = inputs(shape, dtype, gen, 0.5)
    _, Dn = inputs(shape, dtype, gen, 1.0)
    A = A + 0.2  # non-zero channel means
    if h * w > 1:
        Cb[:, :, 0, 0] = 0  # a zero vector: the eps clamp
    A_l, Cb_l, Dn_l = (to_layout(t, layout) for t in (A, Cb, Dn))
    outs = []
    for _ in range(2):
        poison()
        o = torch.ops.lskd.md_stats(A_l, Cb_l, Dn_l, eps)
        sync()
        outs.append(o)
    det = all(bitwise_equal(x, y) for x, y in zip(outs[0], outs[1]))
    cos_bg, cos_new, gap_bg, gap_new = outs[0]
    r = ref.md_statistics(A.double(), Cb.double(), Dn.double(), eps)
    tol = TOL_ACC[dtype]
    e_cb = (cos_bg.double() - r[0]).abs().max().item()  # cosines are O(1): absolute errors
    e_cn = (cos_new.double() - r[1]).abs().max().item()
    mean_scale = A.double().mean(dim=(2, 3)).abs().max().item() + 1e-3
    e_gb = (gap_bg.double() - r[2]).abs().max().item() / max(r[2].abs().max().item(), mean_scale)
    e_gn = (gap_new.double() - r[3]).abs().max().item() / max(r[3].abs().max().item(), mean_scale)
    acc = acc_dtype(dtype)
    fmt_ok = all(t.dtype == acc for t in outs[0]) and cos_bg.shape == (n, h, w) and gap_bg.shape == (n, c)
    ok = all(e <= tol for e in (e_cb, e_cn, e_gb, e_gn)) and det and fmt_ok
    rep.result(name, ok, f"cos_bg={e_cb:.1e} cos_new={e_cn:.1e} gap_bg={e_gb:.1e} gap_new={e_gn:.1e} det={det}")


# ----------------------------------------------------------------------------- special values
def check_special(rep, ref):
    dev = DEV
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = acc_dtype(dtype)
        gen = torch.Generator(device=dev).manual_seed(7)
        for shape in ((2, 8, 16, 16), (2, 3, 70, 33)):
            a, b = inputs(shape, dtype, gen)
            gd = torch.ones(shape[0], device=dev, dtype=acc)
            # dist == 0 -> gradient exactly 0
            d, e = torch.ops.lskd.pod_forward(a, a.clone(), None, None, [1, 2, 4], True)
            g = torch.ops.lskd.pod_backward(gd, a, None, None, d, e, [1, 2, 4], True)
            ok = bool((d == 0).all()) and bool((g == 0).all())
            rep.result(f"pod zero-distance {list(shape)} {DNAME[dtype]}", ok)
            d, pg = torch.ops.lskd.sop_forward(a, a.clone(), None, None, 2, [5, 5], [2, 2], [2, 2])
            g = torch.ops.lskd.sop_backward(gd, a, None, None, d, pg, 2, [5, 5], [2, 2], [2, 2])
            ok = bool((d == 0).all()) and bool((g == 0).all())
            rep.result(f"sop zero-distance {list(shape)} {DNAME[dtype]}", ok)
            # NaN in image 0 -> NaN dist for image 0 only
            an = a.clone()
            an[0, 0, 0, 0] = float("nan")
            for layout in ("contig", "cl"):
                al, bl = to_layout(an, layout), to_layout(b, layout)
                d, e = torch.ops.lskd.pod_forward(al, bl, None, None, [1, 2, 4], True)
                ok = bool(torch.isnan(d[0])) and bool(torch.isfinite(d[1:]).all())
                rep.result(f"pod NaN-propagation {list(shape)} {DNAME[dtype]} {layout}", ok)
                d, pg = torch.ops.lskd.sop_forward(al, bl, None, None, 2, [5, 5], [2, 2], [2, 2])
                ok = bool(torch.isnan(d[0])) and bool(torch.isfinite(d[1:]).all())
                rep.result(f"sop NaN-propagation {list(shape)} {DNAME[dtype]} {layout}", ok)
                cb, cn, gb, gn = torch.ops.lskd.md_stats(al, bl, bl, 1e-8)
                ok = (
                    bool(torch.isnan(cb[0, 0, 0]))
                    and bool(torch.isnan(gb[0, 0]))
                    and bool(torch.isfinite(cb[1:]).all())
                    and bool(torch.isfinite(gb[1:]).all())
                )
                rep.result(f"md NaN-propagation {list(shape)} {DNAME[dtype]} {layout}", ok)
    # expanded (stride-0) grad_dist, as autograd gives for a mean
    a, b = inputs((2, 4, 8, 8), torch.float32, torch.Generator(device=dev).manual_seed(3))
    d, e = torch.ops.lskd.pod_forward(a, b, None, None, [1, 2], True)
    g1 = torch.ops.lskd.pod_backward(torch.full((2,), 0.5, device=dev), a, None, None, d, e, [1, 2], True)
    g2 = torch.ops.lskd.pod_backward(torch.tensor(0.5, device=dev).expand(2), a, None, None, d, e, [1, 2], True)
    rep.result("pod expanded grad_dist", bitwise_equal(g1, g2))
    d, pg = torch.ops.lskd.sop_forward(a, b, None, None, 2, [3, 3], [1, 1], [1, 1])
    g1 = torch.ops.lskd.sop_backward(torch.full((2,), 0.5, device=dev), a, None, None, d, pg, 2, [3, 3], [1, 1], [1, 1])
    g2 = torch.ops.lskd.sop_backward(
        torch.tensor(0.5, device=dev).expand(2), a, None, None, d, pg, 2, [3, 3], [1, 1], [1, 1]
    )
    rep.result("sop expanded grad_dist", bitwise_equal(g1, g2))


# ----------------------------------------------------------------------------- plan
LSKD_SHAPES = [
    (2, 256, 128, 128),
    (2, 512, 64, 64),
    (2, 1024, 32, 32),
    (2, 2048, 32, 32),
    (2, 256, 32, 32),
    (2, 16, 32, 32),
]


def pod_cases(quick):
    cases = []
    shapes = LSKD_SHAPES[:1] + LSKD_SHAPES[4:] if quick else LSKD_SHAPES
    for si, shape in enumerate(shapes):
        for di, dtype in enumerate(DTYPES):
            for layout in ("contig", "cl"):
                mk = ["none", "bool", "float"][(si + di + (layout == "cl")) % 3]
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
            layouts = ("contig", "cl", "padded") if dtype in (torch.float32, torch.bfloat16) else ("contig",)
            for layout in layouts:
                mk = ["none", "bool", "float"][(oi + di) % 3]
                cases.append((shape, dtype, layout, scales, (oi + di) % 4 != 3, mk))
    return cases


def sop_cases(quick):
    cases = []
    lskd = [((2, 256, 32, 32), 20, True), ((2, 16, 32, 32), 4, True)]
    if not quick:
        lskd.append(((2, 512, 64, 64), 4, False))
    for si, (shape, groups, rel) in enumerate(lskd):
        h, w = shape[2], shape[3]
        for di, dtype in enumerate(DTYPES):
            for layout in ("contig", "cl"):
                mk = ["none", "bool", "float"][(si + di + (layout == "cl")) % 3]
                cases.append((shape, dtype, layout, groups, (5, 5), (2, 2), (2, 2), mk, rel))
                cases.append((shape, dtype, layout, groups, (h, w), (1, 1), (0, 0), mk, rel))
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
            layouts = ("contig", "cl", "padded") if dtype in (torch.float32, torch.bfloat16) else ("contig",)
            for layout in layouts:
                mk = ["none", "bool", "float"][(oi + di) % 3]
                cases.append((shape, dtype, layout, groups, win, st, pad, mk, False))
    return cases


def md_cases(quick):
    shapes = (LSKD_SHAPES[:1] + LSKD_SHAPES[4:]) if quick else LSKD_SHAPES
    odd = [(1, 1, 1, 1), (2, 3, 70, 33), (1, 5, 7, 129), (3, 2, 1, 9), (2, 33, 5, 5), (1, 300, 3, 3)]
    cases = []
    for shape in shapes:
        for dtype in DTYPES:
            for layout in ("contig", "cl"):
                cases.append((shape, dtype, layout))
    for shape in odd:
        for dtype in DTYPES:
            layouts = ("contig", "cl", "padded") if dtype in (torch.float32, torch.bfloat16) else ("contig",)
            for layout in layouts:
                cases.append((shape, dtype, layout))
    return cases


# ----------------------------------------------------------------------------- bench (optional)
def bench(ref) -> None:
    """fwd+bwd times of the CUDA ops at the LSKD shapes, N = 12 (CUDA events, median of 20)."""

    def timeit(fn, reps=20):
        for _ in range(3):
            fn()
        sync()
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

    print(f"# bench on {torch.cuda.get_device_name()} (ms, median; floor = bytes / 4.18 TB/s)")
    shapes = [
        (12, 256, 128, 128),
        (12, 512, 64, 64),
        (12, 1024, 32, 32),
        (12, 2048, 32, 32),
        (12, 256, 32, 32),
        (12, 16, 32, 32),
    ]
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.tensor([], dtype=dtype).element_size()
        tot_pod = tot_md = 0.0
        for shape in shapes:
            gen = torch.Generator(device=DEV).manual_seed(0)
            a, b = inputs(shape, dtype, gen)
            numel = a.numel()
            gd = torch.ones(shape[0], device=DEV, dtype=acc_dtype(dtype))
            d, e = torch.ops.lskd.pod_forward(a, b, None, None, [1, 2, 4], True)
            t_f = timeit(lambda: torch.ops.lskd.pod_forward(a, b, None, None, [1, 2, 4], True))
            t_b = timeit(lambda: torch.ops.lskd.pod_backward(gd, a, None, None, d, e, [1, 2, 4], True))
            floor = 4 * numel * es / 4.18e12 * 1e3
            c = b + 0.1 * torch.randn_like(b)  # three distinct tensors (no cache reuse)
            t_m = timeit(lambda: torch.ops.lskd.md_stats(a, b, c, 1e-8))
            floor_m = 3 * numel * es / 4.18e12 * 1e3
            tot_pod += t_f + t_b
            tot_md += t_m
            print(
                f"{DNAME[dtype]} {list(shape)} pod fwd {t_f:.3f} bwd {t_b:.3f} (floor {floor:.3f}); "
                f"md_stats {t_m:.3f} (floor {floor_m:.3f})"
            )
        a, b = inputs((12, 256, 32, 32), dtype, torch.Generator(device=DEV).manual_seed(0))
        gd = torch.ones(12, device=DEV, dtype=acc_dtype(dtype))
        d, pg = torch.ops.lskd.sop_forward(a, b, None, None, 20, [5, 5], [2, 2], [2, 2])
        t_f = timeit(lambda: torch.ops.lskd.sop_forward(a, b, None, None, 20, [5, 5], [2, 2], [2, 2]))
        t_b = timeit(lambda: torch.ops.lskd.sop_backward(gd, a, None, None, d, pg, 20, [5, 5], [2, 2], [2, 2]))
        print(
            f"{DNAME[dtype]} sop [12,256,32,32] fwd {t_f:.3f} bwd {t_b:.3f} "
            f"(floor {4 * a.numel() * es / 4.18e12 * 1e3:.3f})"
        )
        print(f"{DNAME[dtype]} total pod fwd+bwd over six maps {tot_pod:.3f} ms; md_stats six maps {tot_md:.3f} ms")


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--bench", action="store_true", help="also time the ops at N = 12")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: dry run of this script against the CPU kernels (no GPU needed)",
    )
    ap.add_argument("--lib", default=None, help="load this kernel library instead of lskd._C")
    args = ap.parse_args()
    global DEV
    DEV = args.device

    if DEV == "cuda" and not torch.cuda.is_available():
        print("SKIP cuda_selftest: no CUDA device visible (this test needs a GPU)")
        return 0
    if args.lib:
        torch.ops.load_library(args.lib)
        err = None
    else:
        err = load_extension()
    if err is not None:
        print(f"FAIL cannot load the lskd extension: {err}")
        return 1
    key = "CUDA" if DEV == "cuda" else "CPU"
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lskd::{op}", key)]
    if missing:
        print(f"FAIL lskd._C has no {key} kernels for {missing} (was it built with CUDA? FORCE_CUDA=1)")
        return 1
    ref = load_reference()
    sop_ref_generic.ref = ref
    where = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (dry run)"
    print(f"# lskd {key} self-test on {where}, torch {torch.__version__}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    rep = Report()
    seed = 0

    def guarded(name, fn, *a):
        try:
            fn(rep, ref, *a)
        except Exception as exc:  # a crash is a failure of this case, not of the run
            rep.result(name, False, f"exception {exc!r}")
            traceback.print_exc()
            sync()

    for case in pod_cases(args.quick):
        seed += 1
        guarded(f"pod {case}", check_pod, *case, seed)
    for case in sop_cases(args.quick):
        seed += 1
        shape, dtype, layout, groups, win, st, pad, mk, rel = case
        guarded(f"sop {case}", check_sop, shape, dtype, layout, groups, win, st, pad, mk, seed, rel)
    for case in md_cases(args.quick):
        seed += 1
        guarded(f"md {case}", check_md, *case, seed)
    guarded("special values", lambda r, f: check_special(r, f))

    print(f"# summary: {rep.passed} passed, {rep.failed} failed", flush=True)
    if args.bench and rep.failed == 0 and DEV == "cuda":
        bench(ref)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
