"""Shared test machinery: input generation, the float64 oracle, tolerances, comparisons.

The oracle is ``lskd.reference`` evaluated in float64 on the *rounded* inputs
(a low-precision input is upcast exactly to float64), so the tolerances only
have to absorb the kernels' accumulation (float32 for every non-float64
dtype) and, for gradients, the rounding of the result to the input dtype.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch

import lskd
from lskd import reference
from lskd._dtypes import acc_dtype
from lskd.ops import md_statistics
from lskd.ops.md_masks import md_masks_from_statistics

F64 = torch.float64
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed")
MASK_KINDS = ("none", "zeros", "ones", "bool", "float")
REDUCTIONS = ("mean", "sum", "none")


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


# --------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tol:
    dist: float  # relative error of each distance (float32 accumulation for non-float64 inputs)
    grad: float  # relative norm error of each image's gradient (result rounded to the input dtype)


TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float64: Tol(dist=1e-10, grad=1e-9),
    torch.float32: Tol(dist=2e-4, grad=2e-4),
    # Distances are accumulated in float32 from exactly-upcast inputs: float32-level error.
    # Gradients are rounded to the input dtype: unit roundoff 2^-9 (bf16), 2^-12 (f16).
    torch.bfloat16: Tol(dist=2e-4, grad=1e-2),
    torch.float16: Tol(dist=2e-4, grad=3e-3),
}
# The "reference" backend computes low-precision inputs with plain PyTorch float32 ops;
# torch.linalg.vector_norm over millions of float32 terms (large SOP embeddings) is
# off by ~1e-4 relative on CPU, so that backend gets 10x looser bounds (not a kernel).
REFERENCE_BACKEND_TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float64: TOLERANCES[torch.float64],
    torch.float32: Tol(dist=2e-3, grad=2e-3),
    torch.bfloat16: Tol(dist=2e-3, grad=1e-2),
    torch.float16: Tol(dist=2e-3, grad=3e-3),
}


def tolerance(backend: str, dtype: torch.dtype) -> Tol:
    return (REFERENCE_BACKEND_TOLERANCES if backend == "reference" else TOLERANCES)[dtype]


# --------------------------------------------------------------------------- layouts and inputs


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``t`` ([N, C, H, W]) in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a larger buffer, padded rows: no dense layout
        n, c, h, w = t.shape
        big = t.new_zeros((n, c, h + 1, 2 * w))
        big[:, :, :h, ::2] = t
        return big[:, :, :h, ::2]
    if layout == "transposed":  # N, C, W, H in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "misaligned":  # padded rows, storage offset of one element: vector loads are misaligned
        n, c, h, w = t.shape
        big = t.new_zeros((n, c, h, w + 3))
        big[..., 1 : w + 1] = t
        return big[..., 1 : w + 1]
    raise ValueError(layout)


def features(shape: Sequence[int], dtype: torch.dtype, device="cpu", layout: str = "contiguous") -> torch.Tensor:
    """Standard normal features rounded to ``dtype`` (drawn from the global torch seed)."""
    x = torch.randn(tuple(shape), dtype=acc_dtype(dtype), device=device)
    return to_layout(x.to(dtype), layout)


def spatial_mask(kind: str, n: int, h: int, w: int, dtype: torch.dtype, device="cpu") -> Optional[torch.Tensor]:
    return _mask(kind, (n, 1, h, w), dtype, device)


def channel_mask(kind: str, n: int, c: int, dtype: torch.dtype, device="cpu") -> Optional[torch.Tensor]:
    return _mask(kind, (n, c), dtype, device)


def _mask(kind: str, shape, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """none / zeros / ones (float) / bool (random) / float (random in [0, 1), in the feature dtype)."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if kind == "bool":
        return torch.rand(shape, device=device) < 0.6
    if kind == "float":
        return torch.rand(shape, dtype=acc_dtype(dtype), device=device).to(dtype)
    raise ValueError(kind)


# --------------------------------------------------------------------------- random shapes and parameters


@dataclass(frozen=True)
class Limits:
    n: Tuple[int, int] = (1, 3)
    c: Tuple[int, int] = (1, 300)
    hw: Tuple[int, int] = (1, 70)
    sop_budget: int = 6_000_000  # elements of the float64 oracle's outer products N * G * P * k * k
    max_elements: int = 600_000  # N * C * H * W


# The feature maps LSKD distils (DeepLabV3-ResNet101, 512x512 crops, output stride 16) at N = 2:
# stages 1-4, ASPP, logits (docs/MATHEMATICS.md §1.2).
LSKD_SHAPES = [
    (2, 256, 128, 128),
    (2, 512, 64, 64),
    (2, 1024, 32, 32),
    (2, 2048, 32, 32),
    (2, 256, 32, 32),
    (2, 16, 32, 32),
]

# Triton runs under the interpreter on CPU: few, small cases.
LIMITS = {"default": Limits(), "triton": Limits(n=(1, 2), c=(1, 24), hw=(1, 14), sop_budget=200_000)}


def limits(backend: str) -> Limits:
    return LIMITS["triton" if backend == "triton" else "default"]


def _log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, max(lo, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))))


def random_shape(rng: random.Random, backend: str) -> Tuple[int, int, int, int]:
    """N, C, H, W: square or not, odd, 1, prime, ... (within the backend's limits)."""
    lim = limits(backend)
    while True:
        n = rng.randint(*lim.n)
        c = _log_uniform_int(rng, *lim.c)
        h = rng.randint(*lim.hw)
        w = h if rng.random() < 0.25 else rng.randint(*lim.hw)
        if n * c * h * w <= lim.max_elements:  # keeps the float64 oracle (and its autograd) fast
            return n, c, h, w


def random_scales(rng: random.Random, h: int, w: int) -> Tuple[int, ...]:
    """1 to 3 distinct scales <= min(H, W) (often not dividing H or W), sometimes the default."""
    m = min(h, w)
    if m >= 4 and rng.random() < 0.3:
        return (1, 2, 4)
    pool = [s for s in (1, 2, 3, 4, 5, 7, 8) if s <= m]
    k = rng.randint(1, min(3, len(pool)))
    return tuple(sorted(rng.sample(pool, k)))


def sop_positions(h: int, w: int, window: Optional[int], stride: int) -> int:
    if window is None:
        return 1
    pad = window // 2
    return ((h + 2 * pad - window) // stride + 1) * ((w + 2 * pad - window) // stride + 1)


def random_sop_params(rng: random.Random, shape, backend: str) -> dict:
    """groups in 1..C (often not dividing C), window None/3/5, stride 1/2, bounded oracle size."""
    n, c, h, w = shape
    window = rng.choice((None, 3, 5))
    stride = rng.choice((1, 2))
    p = sop_positions(h, w, window, stride)
    kmax = max(1, limits(backend).sop_budget // max(1, n * p * c))
    gmin = min(c, max(1, -(-c // kmax)))
    r = rng.random()
    if r < 0.15:
        groups = gmin
    elif r < 0.25:
        groups = c
    else:
        groups = rng.randint(gmin, c)
    return dict(groups=groups, window=window, stride=stride)


def random_pod_params(rng: random.Random, shape, backend: str) -> dict:
    _, _, h, w = shape
    return dict(scales=random_scales(rng, h, w), square=rng.random() < 0.7)


# --------------------------------------------------------------------------- the ops and their oracle


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable  # lskd.pod_distill / lskd.sop_distill
    oracle: Callable  # reference.*_distances, returns [N]
    random_params: Callable

    def call(self, backend, student, teacher, sm=None, cm=None, reduction="mean", **params):
        return self.fn(student, teacher, sm, cm, reduction=reduction, backend=backend, **params)

    def ref(self, a, b, sm=None, cm=None, **params):
        if self.name == "pod":
            return self.oracle(a, b, sm, cm, params["scales"], params["square"])
        return self.oracle(a, b, sm, cm, params["groups"], params["window"], params["stride"])


POD = OpSpec("pod", lskd.pod_distill, reference.pod_distances, random_pod_params)
SOP = OpSpec("sop", lskd.sop_distill, reference.sop_distances, random_sop_params)


def reduce(d: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"mean": d.mean, "sum": d.sum, "none": lambda: d}[reduction]()


def upstream(reduction: str, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Upstream gradient: 1 for mean/sum, random in +-[0.5, 2] per image for "none"."""
    acc = acc_dtype(dtype)
    if reduction != "none":
        return torch.ones((), dtype=acc, device=device)
    mag = torch.rand(n, dtype=acc, device=device) * 1.5 + 0.5
    sign = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0).to(acc)
    return mag * sign


def mask64(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return mask if mask is None or mask.dtype == torch.bool else mask.to(F64)


def oracle(op: OpSpec, student, teacher, sm, cm, reduction, grad_out, params):
    """Float64 reference (value, student gradient) on the rounded inputs."""
    a = student.detach().to(F64).requires_grad_(True)
    b = teacher.detach().to(F64)
    out = reduce(op.ref(a, b, mask64(sm), mask64(cm), **params), reduction)
    (g,) = torch.autograd.grad(out, a, grad_out.to(F64))
    return out.detach(), g


# --------------------------------------------------------------------------- comparisons


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "value") -> None:
    """Elementwise ``|a - e| <= rtol * |e|`` (exact where e == 0); NaN never passes."""
    a, e = actual.detach().to(F64).cpu(), expected.detach().to(F64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    bad = ~(err <= rtol * e.abs())
    if bad.any():
        rel = (err / e.abs()).nan_to_num(nan=float("inf"))
        raise AssertionError(
            f"{what}: relative error {rel.max().item():.3e} > {rtol:.1e} at {bad.nonzero()[:5].tolist()}; "
            f"actual {a.flatten()[:6].tolist()} expected {e.flatten()[:6].tolist()}"
        )


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "grad") -> None:
    """Per image (dim 0): ``||a - e|| <= rtol * ||e|| + floor``; no NaN.

    ``floor`` is the rounding of ``actual``'s dtype below its smallest normal number (half the
    subnormal spacing per element, times sqrt(elements)): an image whose gradient is tiny next to
    the batch's (a nearly empty mask) has float16 gradients in the subnormal range, whose
    relative precision no kernel can beat. It is 0 for float64 and negligible for float32/bf16."""
    fi = torch.finfo(actual.dtype)
    a, e = actual.detach().to(F64).cpu(), expected.detach().to(F64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not a.isnan().any(), f"{what}: NaN in the gradient"
    n = a.shape[0]
    err = (a - e).reshape(n, -1).norm(dim=1)
    ref = e.reshape(n, -1).norm(dim=1)
    floor = 0.0 if actual.dtype == F64 else fi.smallest_normal * fi.eps / 2 * math.sqrt(a[0].numel())
    bad = ~(err <= rtol * ref + floor)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: image {i}: relative norm error {(err[i] / ref[i]).item():.3e} > {rtol:.1e} "
            f"(|ref| = {ref[i].item():.3e}, |err| = {err[i].item():.3e})"
        )


def check_against_reference(
    op: OpSpec,
    backend: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    sm: Optional[torch.Tensor] = None,
    cm: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    **params,
):
    """Run ``op`` on ``backend`` (forward + backward) and compare with the float64 oracle.

    Returns (output, student gradient) of the backend.
    """
    dtype, n = student.dtype, student.shape[0]
    tol = tolerance(backend, dtype)
    go = upstream(reduction, n, dtype, student.device)
    ref_out, ref_grad = oracle(op, student, teacher, sm, cm, reduction, go, params)
    # Scale the upstream gradient by a power of two (exact) so that the largest
    # gradient element is about 1: no underflow of float16/bfloat16 gradients.
    amax = ref_grad.abs().max().item()
    if 0 < amax < float("inf"):
        scale = 2.0 ** (-round(math.log2(amax)))
        go, ref_grad = go * scale, ref_grad * scale

    x = student.detach().requires_grad_(True)
    out = op.call(backend, x, teacher, sm, cm, reduction, **params)
    assert out.dtype == acc_dtype(dtype), f"output dtype {out.dtype} for {dtype} inputs"
    assert out.shape == ((n,) if reduction == "none" else ()), f"output shape {tuple(out.shape)}"
    assert_rel_close(out, ref_out, tol.dist, f"{op.name} distance ({backend}, {dtype})")
    (grad,) = torch.autograd.grad(out, x, go)
    assert grad.dtype == dtype and grad.shape == student.shape
    assert_grad_close(grad, ref_grad, tol.grad, f"{op.name} gradient ({backend}, {dtype})")
    return out.detach(), grad


def describe(shape, **kw) -> str:
    """One line saying what a random case is (printed, shown by pytest on failure)."""
    items = ", ".join(f"{k}={v}" for k, v in kw.items())
    return f"shape={list(shape)}, {items}"


def random_case(op: OpSpec, rng: random.Random, backend: str, dtype: torch.dtype, device="cpu"):
    """A random (student, teacher, masks, reduction, params) case; prints its description."""
    shape = random_shape(rng, backend)
    n, c, h, w = shape
    params = op.random_params(rng, shape, backend)
    lay_s, lay_t = rng.choice(LAYOUTS), rng.choice(LAYOUTS)
    sk, ck = rng.choice(MASK_KINDS), rng.choice(MASK_KINDS)
    reduction = rng.choice(REDUCTIONS)
    print(describe(shape, dtype=dtype, layouts=(lay_s, lay_t), masks=(sk, ck), reduction=reduction, **params))
    student = features(shape, dtype, device, lay_s)
    teacher = features(shape, dtype, device, lay_t)
    sm = spatial_mask(sk, n, h, w, dtype, device)
    cm = channel_mask(ck, n, c, dtype, device)
    return student, teacher, sm, cm, reduction, params


def small_shape(backend: str) -> Tuple[int, int, int, int]:
    """A small odd, non-square shape for the targeted tests."""
    return (2, 4, 9, 7) if backend == "triton" else (2, 10, 13, 11)


# Subsets for Triton under the interpreter (one program per plane: cost grows with N * C).
MASK_COMBOS = [(a, b) for a in MASK_KINDS for b in MASK_KINDS]
MASK_COMBOS_TRITON = [
    ("none", "none"),
    ("zeros", "ones"),
    ("ones", "zeros"),
    ("bool", "float"),
    ("float", "bool"),
    ("float", "none"),
    ("none", "bool"),
]
DTYPES_TRITON = (torch.float32, torch.float16)


# --------------------------------------------------------------------------- the raw ops' outputs


def pod_schema_reference(student, teacher, sm, cm, scales, square):
    """Float64 ``(dist [N], emb [N, C, L])`` as the raw ``pod_forward`` defines them (csrc/pod_distill.cpp):
    ``emb`` holds, per scale s, the width pools (region column j, row r: index ``j * Hs + r``) then
    the height pools (region row i, column q: ``i * Ws + q``) of ``z = x_a^2 - x_b^2`` (``x_a - x_b``
    unless ``square``), x the masked maps (``sm [N, 1, H, W]``, ``cm [N, C]`` or None)."""
    xa = reference.apply_masks(student.to(F64), sm, cm)
    xb = reference.apply_masks(teacher.detach().to(F64), sm, cm)
    z = xa * xa - xb * xb if square else xa - xb
    n, c, h, w = z.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        zs = z[:, :, : s * kh, : s * kw]
        parts.append(zs.reshape(n, c, s * kh, s, kw).mean(-1).transpose(2, 3).reshape(n, c, -1))
        parts.append(zs.reshape(n, c, s, kh, s * kw).mean(3).reshape(n, c, -1))
    emb = torch.cat(parts, dim=2)
    return emb.flatten(1).norm(dim=1), emb


def sop_schema_reference(student, teacher, sm, cm, groups, window, stride, padding):
    """Float64 ``(dist [N], pooled_grad [N, G * k, Ho, Wo])`` as the raw ``sop_forward`` defines them
    (csrc/sop_distill.cpp), for any (height, width) pairs ``window``, ``stride``, ``padding`` (the
    op's generality; lskd.reference.sop_distances has the released geometry only).

    With p, q the average pools (``count_include_pad``) of the masked student and teacher channels
    ``[:G * k]``, ``u = p - q`` and ``v = p + q`` per group and position:
    ``dist^2 = sum 0.5 (|u|^2 |v|^2 + (u.v)^2)`` (= ``||p p^T - q q^T||_F^2``) and
    ``pooled_grad = d(dist^2)/dp = (|v|^2 + u.v) u + (|u|^2 + u.v) v``. Differentiable in ``student``."""
    xa = reference.apply_masks(student.to(F64), sm, cm)
    xb = reference.apply_masks(teacher.detach().to(F64), sm, cm)
    n, c = xa.shape[:2]
    k = c // groups

    def pool(x):  # contiguous(): see the avg_pool2d note in lskd.reference.sop_embedding
        x = x[:, : groups * k].contiguous()
        return torch.nn.functional.avg_pool2d(x, tuple(window), tuple(stride), tuple(padding), count_include_pad=True)

    p, q = pool(xa), pool(xb)
    ho, wo = p.shape[-2:]
    u = (p - q).reshape(n, groups, k, ho, wo)
    v = (p + q).reshape(n, groups, k, ho, wo)
    uu, vv, uv = (u * u).sum(2, keepdim=True), (v * v).sum(2, keepdim=True), (u * v).sum(2, keepdim=True)
    dist = (0.5 * (uu * vv + uv * uv)).flatten(1).sum(1).sqrt()
    pooled_grad = ((vv + uv) * u + (uu + uv) * v).reshape(n, groups * k, ho, wo)
    return dist, pooled_grad


# --------------------------------------------------------------------------- checks shared by pod and sop


def check_zero_distance(op: OpSpec, backend: str, dtype: torch.dtype, shape, variants, device="cpu") -> None:
    """student == teacher: distance exactly 0 and gradient exactly 0 (never NaN), masks or not.

    ``variants``: list of parameter dicts of ``op``.
    """
    n, c, h, w = shape
    s = features(shape, dtype, device, layout="channels_last")
    t = s.detach().clone()
    masks = (spatial_mask("float", n, h, w, dtype, device), channel_mask("bool", n, c, dtype, device))
    for sm, cm in ((None, None), masks):
        for params in variants:
            x = s.detach().requires_grad_(True)
            out = op.call(backend, x, t, sm, cm, "none", **params)
            assert torch.equal(out, torch.zeros_like(out)), (params, out)
            (g,) = torch.autograd.grad(out, x, torch.randn_like(out))
            assert not g.isnan().any(), f"NaN gradient at d == 0 ({params})"
            assert torch.equal(g, torch.zeros_like(g)), params


def check_all_masked_image(op: OpSpec, backend: str, shape, **params) -> None:
    """An image whose spatial mask is all False has d = 0 and gradient 0; the others do not."""
    n, c, h, w = shape
    s, t = features(shape, torch.float32), features(shape, torch.float32)
    sm = torch.ones(n, 1, h, w, dtype=torch.bool)
    sm[0] = False
    x = s.requires_grad_(True)
    out = op.call(backend, x, t, sm, None, "none", **params)
    assert out[0].item() == 0.0 and (out[1:] > 0).all(), out
    out.sum().backward()
    assert torch.equal(x.grad[0], torch.zeros_like(x.grad[0])) and x.grad[1].abs().sum() > 0


def check_nan_propagates(op: OpSpec, backend: str, dtype: torch.dtype, shape, device="cpu", **params) -> None:
    """A NaN in image 0 of the student gives a NaN distance for image 0 only, and a NaN mean."""
    s, t = features(shape, dtype, device), features(shape, dtype, device)
    s[0, 0, 0, 0] = float("nan")
    out = op.call(backend, s, t, None, None, "none", **params)
    assert out[0].isnan(), out
    assert torch.isfinite(out[1:]).all(), out
    assert op.call(backend, s, t, None, None, "mean", **params).isnan()


def check_deterministic(
    op: OpSpec, backend: str, dtype: torch.dtype, shape, device="cpu", layout="channels_last", **params
) -> None:
    """Two runs on the same input give bitwise the same distances and gradients."""
    n, c, h, w = shape
    s, t = features(shape, dtype, device, layout), features(shape, dtype, device)
    sm, cm = spatial_mask("float", n, h, w, dtype, device), channel_mask("float", n, c, dtype, device)
    results = []
    for _ in range(2):
        x = s.detach().requires_grad_(True)
        out = op.call(backend, x, t, sm, cm, "none", **params)
        out.backward(torch.linspace(0.5, 1.5, n, dtype=out.dtype, device=out.device))
        results.append((out.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def check_no_grad_to_teacher_and_masks(op: OpSpec, backend: str, shape, **params) -> None:
    n, c, h, w = shape
    s = features(shape, torch.float32).requires_grad_(True)
    t = features(shape, torch.float32).requires_grad_(True)
    sm = torch.rand(n, 1, h, w, requires_grad=True)
    cm = torch.rand(n, c, requires_grad=True)
    op.call(backend, s, t, sm, cm, "mean", **params).backward()
    assert s.grad is not None
    assert t.grad is None and sm.grad is None and cm.grad is None


def check_module(op: OpSpec, module_cls, backend: str, shape, variants) -> None:
    """The lskd.nn module gives exactly what the function gives (``variants``: kwargs lists)."""
    n, c, h, w = shape
    s, t = features(shape, torch.float32), features(shape, torch.float32)
    sm, cm = spatial_mask("bool", n, h, w, torch.float32), channel_mask("float", n, c, torch.float32)
    for kw in variants:
        mod = module_cls(backend=backend, **kw)
        kw = dict(kw)
        reduction = kw.pop("reduction", "mean")
        assert torch.equal(mod(s, t, sm, cm), op.call(backend, s, t, sm, cm, reduction, **kw))
        assert torch.equal(mod(s, t), op.call(backend, s, t, None, None, reduction, **kw))
    assert "backend=" in repr(module_cls())


def raw_ops(backend: str):
    """The torch.ops namespace of a compiled backend."""
    return torch.ops.lskd_triton if backend == "triton" else torch.ops.lskd


# --------------------------------------------------------------------------- md_masks inputs

OLD = 4  # O: background + old classes in most label scenarios


def stat_inputs(shape, dtype, layout="contiguous", device="cpu"):
    """A, Cb (A with erased pixels, plus noise), Dn (independent): realistic statistics inputs."""
    n, c, h, w = shape
    a = features(shape, dtype, device)
    keep = (torch.rand(n, 1, h, w, device=device) < 0.6).float()
    cb = ((a.float() + 0.3 * torch.randn(shape, device=device)) * keep).to(dtype)
    dn = features(shape, dtype, device)
    dn[:, :, 0, 0] = 0  # zero vectors: the cosine uses eps, gives 0, never NaN
    return tuple(to_layout(x, layout) for x in (a, cb, dn))


def integer_features(rng: random.Random, shape, kind: str, dtype, device="cpu"):
    """Integer-valued A, Cb, Dn with tied and well-separated statistics.

    kind "prototypes": each pixel takes one of a few integer vectors (many exact ties);
    "constant": every pixel of an image is the same vector (constant cosine maps);
    "distinct": independent small integers (distinct values, checked for separation).
    Use H * W a power of two so that the channel means are exact.
    """
    n, c, h, w = shape
    g = torch.Generator().manual_seed(rng.randrange(2**31))

    def ints(*size, lo=-3, hi=4):
        return torch.randint(lo, hi, size, generator=g).to(torch.float64)

    if kind == "distinct":
        a, cb, dn = ints(n, c, h, w), ints(n, c, h, w), ints(n, c, h, w)
        cb = cb * (torch.rand(n, 1, h, w, generator=g) < 0.7)  # erased pixels -> zero vectors
    elif kind == "prototypes":
        out = []
        for _ in range(3):
            protos = ints(n, 3, c)
            if out:
                protos[:, 0] = 0  # erased (zero) pixels in Cb and Dn
            idx = torch.randint(0, 3, (n, h * w), generator=g)
            x = torch.stack([protos[i, idx[i]] for i in range(n)])  # [n, h*w, c]
            out.append(x.transpose(1, 2).reshape(n, c, h, w))
        a, cb, dn = out
    elif kind == "constant":
        va, vb = ints(n, c, 1, 1), ints(n, c, 1, 1)
        a = va.expand(n, c, h, w)
        cb = torch.cat([a[:1], vb[1:].expand(n - 1, c, h, w)]) if n > 1 else a  # cos == 1 or a constant
        dn = torch.zeros(n, c, h, w)
    else:
        raise ValueError(kind)
    return tuple(x.contiguous().to(device=device, dtype=dtype) for x in (a, cb, dn))


def well_separated(*stats, gap=1e-5) -> bool:
    """Per image, sorted values are either exactly equal or at least ``gap`` apart."""
    for s in stats:
        for row in s.reshape(s.shape[0], -1).double():
            d = row.sort().values.diff()
            if ((d > 0) & (d < gap)).any():
                return False
    return True


def labels_for(rng: random.Random, scenario: str, n: int, hl: int, wl: int, device="cpu"):
    """Labels [n, hl, wl] (int64) and O for a scenario."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))

    def rand(lo, hi):
        return torch.randint(lo, hi, (hl, wl), generator=g)

    def one(kind):
        if kind == "all_background":
            return torch.zeros(hl, wl, dtype=torch.long)
        if kind == "all_old":
            return rand(0, OLD)
        if kind == "all_new":
            return rand(OLD, OLD + 3)
        if kind == "all_ignore":
            return torch.full((hl, wl), 255, dtype=torch.long)
        y = rand(0, OLD + 3)
        if kind == "ignore":
            y[torch.rand(hl, wl, generator=g) < 0.3] = 255
        return y

    old = OLD
    if scenario == "o_covers_all":
        old = 10
        kinds = ["mixed"] * n
    elif scenario == "per_image":
        kinds = ["all_background", "all_new", "ignore", "mixed", "all_ignore"][:n]
    else:
        kinds = [scenario] * n
    return torch.stack([one(k) for k in kinds]).to(device), old


def check_md_masks_parity(backend, rng, scenario, kind, dtype, n=3, device="cpu"):
    """md_masks(backend) == lskd.reference.md_masks (bitwise) on integer features with
    well-separated or exactly tied statistics; returns the masks."""
    # H and W are powers of two: channel means of integers are then exact (no ulp-level
    # differences between mathematically equal gaps computed in different orders).
    sides = (2, 4) if kind == "distinct" else (2, 4, 8, 16)
    for _ in range(50):
        c, h, w = rng.randint(3, 24), rng.choice(sides), rng.choice(sides)
        a, cb, dn = integer_features(rng, (n, c, h, w), kind, dtype, device)
        ok = well_separated(*md_statistics(a, cb, dn, backend=backend)) and well_separated(
            *reference.md_statistics(a, cb, dn)
        )
        if ok:
            break
    else:
        pytest.fail("could not draw well-separated integer features")
    hl, wl = rng.choice([(h, w), (2 * h, 2 * w), (3 * h + 1, w + 2)])
    labels, old = labels_for(rng, scenario, n, hl, wl, device)
    sm, cm = lskd.md_masks(a, cb, dn, labels, old, backend=backend)
    esm, ecm = reference.md_masks(a, cb, dn, labels, old)
    assert sm.dtype == torch.bool and cm.dtype == torch.bool
    assert sm.shape == (n, 1, h, w) and cm.shape == (n, c)
    assert torch.equal(sm, esm), f"spatial masks differ at {(sm != esm).nonzero()[:5].tolist()}"
    assert torch.equal(cm, ecm), f"channel masks differ at {(cm != ecm).nonzero()[:5].tolist()}"
    return sm, cm


# --------------------------------------------------------------------------- md_masks kernels (CUDA, emulated CUDA)


def md_labels(n, hl, wl, dtype, scenario, g):
    """Labels [n, hl, wl] in dtype; old classes O = 4; per-image kinds include no old / no new pixels."""
    kinds = {
        "mixed": ["mixed"],
        "ignore": ["ignore"],
        "per_image": ["no_old", "no_new", "ignore", "all_ignore"],
        "extremes": ["all_old", "all_new"],
    }[scenario]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        y = torch.randint(0, 7, (hl, wl), generator=g)
        if kind in ("ignore", "no_old", "no_new"):
            y[torch.rand(hl, wl, generator=g) < 0.3] = 255
        if kind == "no_old":
            y[y < 4] = 5
        elif kind == "no_new":
            y[(y >= 4) & (y != 255)] = 1
        elif kind == "all_ignore":
            y.fill_(255)
        elif kind == "all_old":
            y = torch.randint(0, 4, (hl, wl), generator=g)
        elif kind == "all_new":
            y = torch.randint(4, 7, (hl, wl), generator=g)
        out.append(y)
    return torch.stack(out).to(dtype)


def check_masks_match_composite(md_masks_op, stats, a, cb, dn, labels, old=4, ignore=255, set_rank_rule=None):
    """``md_masks_op`` (an op with the schema of lskd::md_masks) gives the masks of the rule
    (lskd.ops.md_masks.md_masks_from_statistics) on the same statistics, evaluated on the CPU,
    bit for bit; returns the last masks. ``set_rank_rule(float64_ranks)`` (None: as this torch)
    makes the op follow a quantile rank rule: then every rule is checked, else this torch's."""
    n, c, h, w = a.shape
    cpu_stats = [s.cpu() for s in stats]
    for rule in (None, False, True) if set_rank_rule is not None else (None,):
        if set_rank_rule is not None:
            set_rank_rule(rule)
        try:
            sm, cm = md_masks_op(a, cb, dn, labels, old, ignore, 1e-8)
        finally:
            if set_rank_rule is not None:
                set_rank_rule(None)
        esm, ecm = md_masks_from_statistics(cpu_stats, labels.cpu(), old, ignore, float64_ranks=rule)
        assert sm.dtype == torch.bool and cm.dtype == torch.bool and sm.device == a.device
        assert sm.shape == (n, 1, h, w) and cm.shape == (n, c)
        assert torch.equal(sm.cpu(), esm), f"spatial masks differ at {(sm.cpu() != esm).nonzero()[:5].tolist()}"
        assert torch.equal(cm.cpu(), ecm), f"channel masks differ at {(cm.cpu() != ecm).nonzero()[:5].tolist()}"
    return sm, cm


def rank_rule_case():
    """``(a, cb, dn, labels)`` whose masks depend on the quantile rank rule: one old label pixel of
    three gives q = 1/3 and the rank q * 3 of a 2x2 map is exactly 1 in float32, 1 + 3e-8 in
    float64; cos_bg = [1, 0, 0.5, -0.5], so the pixel of cos 0 (the lo-th value) passes
    cos_bg >= Q with float32 ranks only (dn keeps the new side false there)."""
    a = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 3**0.5], [-1.0, 3**0.5]])
    dn = a.clone()
    dn[0] = torch.tensor([0.0, 1.0])
    a, cb, dn = (v.T.reshape(1, 2, 2, 2).contiguous() for v in (a, cb, dn))
    return a, cb, dn, torch.tensor([[[0, 255, 255]]])


def check_rank_rule_case(md_masks_op, set_rank_rule):
    """``md_masks_op`` under ``set_rank_rule(False / True)`` gives the rule's masks of
    :func:`rank_rule_case`, which differ between the two rules."""
    a, cb, dn, labels = rank_rule_case()
    stats = [s.cpu() for s in md_statistics(a.cpu(), cb.cpu(), dn.cpu(), backend="reference")]
    spatial = {}
    for rule in (False, True):
        set_rank_rule(rule)
        try:
            sm, cm = md_masks_op(a, cb, dn, labels.to(a.device), 4, 255, 1e-8)
        finally:
            set_rank_rule(None)
        esm, ecm = md_masks_from_statistics(stats, labels, 4, 255, float64_ranks=rule)
        assert torch.equal(sm.cpu(), esm) and torch.equal(cm.cpu(), ecm), rule
        spatial[rule] = esm
    assert not torch.equal(spatial[False], spatial[True]), "the case no longer separates the rank rules"


def check_md_masks_ties_and_nan(check, dtype, g, device="cpu"):
    """Tied statistics, constant maps and NaN through ``check(a, cb, dn, labels) -> masks``;
    returns the tied inputs ``(a, cb, dn, labels)``."""
    n, c, h, w = 3, 8, 24, 20
    # Every pixel takes one of 3 prototype vectors: the cosine maps hold a few values, exactly tied
    # (md_stats sums every position in the same order), and so do the gaps of equal channels.
    protos = torch.randint(-3, 4, (3, c), generator=g).double()
    protos[:, 4:] = protos[:, :1]  # channels 4.. equal channel 0: tied gaps
    idx = torch.randint(0, 3, (n, h, w), generator=g)
    a = protos[idx].permute(0, 3, 1, 2).contiguous()
    cb = protos[(idx + 1) % 3].permute(0, 3, 1, 2).contiguous()
    dn = protos[torch.randint(0, 3, (n, h, w), generator=g)].permute(0, 3, 1, 2).contiguous()
    a, cb, dn = (x.to(dtype).to(device) for x in (a, cb, dn))
    labels = md_labels(n, 2 * h, 2 * w, torch.int64, "mixed", g).to(device)
    check(a, cb, dn, labels)
    # Exactly tied statistics throughout: the quantiles fall on tied values.
    const = protos[0].view(1, c, 1, 1).expand(n, c, h, w).contiguous().to(dtype).to(device)
    check(const, const.clone(), const * 2, labels)
    # NaN: in feat_bg_erased of image 0 (cos_bg[0] and gap_bg[0] hold a NaN: only the "new" side counts),
    # in feat of image 1 (every row of image 1 holds a NaN: masks all false).
    cb2, a2 = cb.clone(), a.clone()
    cb2[0, 2, 5, 7] = float("nan")
    a2[1, 3, 1, 1] = float("nan")
    sm, cm = check(a2, cb2, dn, labels)
    assert not sm[1].any() and not cm[1].any()
    return a, cb, dn, labels
