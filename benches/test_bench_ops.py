"""Forward + backward benchmarks of every backend against the eager reference
and torch.compile of it, in the same run (pytest-benchmark).

    pytest benches --benchmark-only --benchmark-json=out.json
    python benches/summarize.py out.json        # the table: speed-ups, floor, GB/s

On a CUDA machine the LSKD shapes at N = 12 are used (LSKD_BENCH_DEVICE=cpu
forces the CPU); on the CPU the same maps scaled down. Every result carries in
extra_info the bytes the op must move (its memory floor), the achieved GB/s,
the fraction of the measured copy bandwidth and, on GPUs, the peak extra memory.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import lskd_workload as wl  # noqa: E402

import lskd  # noqa: E402
from lskd import reference  # noqa: E402

DEV = wl.device()
DTYPES = wl.bench_dtypes()
KERNEL_BACKENDS = [b for b in lskd.available_backends(DEV) if b != "reference"]
if DEV.type == "cpu":
    KERNEL_BACKENDS = [b for b in KERNEL_BACKENDS if b != "triton"]  # the interpreter says nothing of speed
_expected = [b for b in os.environ.get("LSKD_BENCH_EXPECT", "").split(",") if b]
_missing = [b for b in _expected if b not in KERNEL_BACKENDS]
if _missing:  # never drop a backend from the record silently
    raise RuntimeError(
        f"benchmarks: expected backends {_missing} are unavailable on {DEV}: {lskd.available_backends(DEV)}"
    )
ROUNDS = int(os.environ.get("LSKD_BENCH_ROUNDS", "20" if wl.on_gpu() else "5"))
_compiled = {}
# Which benchmarks get a torch.compile column: "all" (default), "loss" (the whole loss only:
# compiling the eager code takes minutes on a fresh machine) or "none".
COMPILE = os.environ.get("LSKD_BENCH_COMPILE", "all")
if COMPILE not in ("all", "loss", "none"):
    raise RuntimeError(f"LSKD_BENCH_COMPILE must be all, loss or none, got {COMPILE!r}")


def _shape_id(shape):
    return "x".join(map(str, shape))


def _dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def _run(benchmark, device_info, op, backend, shapes, dtype, fn, inputs):
    """Time fn (forward + backward, synchronised) and record the extra_info."""

    def step():
        for t in inputs:
            t.grad = None
        fn()
        wl.sync()

    cache0 = wl.compile_cache_counters()
    t0 = time.perf_counter()
    step()  # warm-up outside the timer (compilation, autotuning)
    first_call_s = time.perf_counter() - t0
    step()
    cache = {k: v - cache0[k] for k, v in wl.compile_cache_counters().items() if v != cache0[k]}
    peak_mb = None
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    nbytes = wl.floor_bytes(op, shapes, dtype)
    bw = device_info["copy_bandwidth_GBps"] * 1e9
    benchmark.extra_info.update(
        op=op,
        backend=backend,
        shape=" ".join(_shape_id(s) for s in shapes),
        dtype=_dtype_id(dtype),
        floor_bytes=nbytes,
        floor_ms=nbytes / bw * 1e3,
        achieved_GBps=nbytes / median / 1e9,
        fraction_of_copy_bw=nbytes / median / bw,
        peak_extra_MB=peak_mb,
        first_call_s=first_call_s,  # with "compile": compilation (or cache loading) + one step
        compile_cache=cache,  # inductor / AOTAutograd cache hits and misses of the warm-up
        **device_info,
    )


def _backends(op: str):
    with_compile = COMPILE == "all" or (COMPILE == "loss" and op == "lskd_loss")
    return ["eager"] + (["compile"] if with_compile else []) + KERNEL_BACKENDS


def _loss_fn(kind, backend, key):
    """A callable computing the loss of `kind` with `backend` ("eager"/"compile" = reference)."""
    if backend == "eager":
        return kind
    if backend == "compile":
        if key not in _compiled:
            _compiled[key] = wl.compiled(kind)
        return _compiled[key]
    return None


# ---------------------------------------------------------------- pod_distill
POD_SHAPES = wl.lskd_maps() + ([] if wl.on_gpu() else wl.CPU_EXTRA)
POD_COMPILE = {wl.lskd_maps()[0]} | ({wl.CPU_EXTRA[0]} if not wl.on_gpu() else set())


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", POD_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", _backends("pod_distill"))
def test_pod_distill(benchmark, device_info, backend, shape, dtype):
    if backend == "compile" and shape not in POD_COMPILE:
        pytest.skip("torch.compile is benchmarked on the largest map only (compile time)")
    s, t, _, _ = wl.make_maps([shape], dtype)
    a, b = s[0], t[0]

    def ref():
        reference.pod_distances(a, b).mean().backward()

    fn = _loss_fn(ref, backend, ("pod", shape, dtype))
    if fn is None:

        def fn():
            lskd.pod_distill(a, b, backend=backend).backward()

    benchmark.group = f"pod_distill {_shape_id(shape)} {_dtype_id(dtype)}"
    _run(benchmark, device_info, "pod_distill", backend, [shape], dtype, fn, [a])


# ---------------------------------------------------------------- sop_distill
SOP_SHAPES = [wl.lskd_maps()[4]] + ([] if wl.on_gpu() else wl.CPU_EXTRA)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SOP_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", _backends("sop_distill"))
def test_sop_distill(benchmark, device_info, backend, shape, dtype):
    s, t, m, n = wl.make_maps([shape], dtype)
    a, b = s[0], t[0]

    def ref():
        reference.sop_distances(a, b).mean().backward()

    fn = _loss_fn(ref, backend, ("sop", shape, dtype))
    if fn is None:

        def fn():
            lskd.sop_distill(a, b, backend=backend).backward()

    benchmark.group = f"sop_distill {_shape_id(shape)} {_dtype_id(dtype)}"
    _run(benchmark, device_info, "sop_distill", backend, [shape], dtype, fn, [a])


# ---------------------------------------------------------------- md_masks
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", ["released", "eager"] + KERNEL_BACKENDS)
def test_md_masks(benchmark, device_info, backend, dtype):
    """Masks of the six maps; "released" = per image with torch.quantile, "eager" = batched reference."""
    shapes = wl.lskd_maps()
    feats = [wl.make_maps([sh], dtype, seed=i)[0][0].detach() for i, sh in enumerate(shapes)]
    erased = [(f * 0.5, f + 0.1) for f in feats]
    labels = torch.randint(0, 21, (shapes[0][0], 64, 64), device=DEV)

    def fn():
        for f, (cb, dn) in zip(feats, erased):
            if backend == "released":
                reference.md_masks(f, cb, dn, labels, 16)
            else:
                lskd.md_masks(f, cb, dn, labels, 16, backend="reference" if backend == "eager" else backend)

    benchmark.group = f"md_masks six maps {_dtype_id(dtype)}"
    _run(benchmark, device_info, "md_masks", backend, shapes, dtype, fn, [])


# ---------------------------------------------------------------- whole loss
# "cpu"/"cuda": the seven terms in one lskd.distill_terms call; "<backend>-per-term":
# seven pod_distill/sop_distill calls (Triton always runs its terms one by one).
LOSS_BACKENDS = _backends("lskd_loss") + [b + wl.PER_TERM for b in KERNEL_BACKENDS if b in ("cpu", "cuda")]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_lskd_loss(benchmark, device_info, backend, dtype):
    """The LSKD distillation loss over the six maps (released assignment), fwd + bwd."""
    shapes = wl.lskd_maps()
    s, t, m, n = wl.make_maps(shapes, dtype)
    fn = _loss_fn(wl.reference_step(s, t, m, n), backend, ("loss", dtype))
    if fn is None:
        impl, fused = wl.split_variant(backend)

        def fn():
            wl.lskd_loss(s, t, m, n, impl, fused=fused).backward()

    benchmark.group = f"lskd_loss six maps {_dtype_id(dtype)}"
    _run(benchmark, device_info, "lskd_loss", backend, shapes, dtype, fn, s)


# ---------------------------------------------------------------- ce_unkd
# The output-level losses of an LSKD step: the logits of the step bench's shapes (GPU: VOC,
# 21 classes of which 16 old, output stride 16 at 512; CPU: the demo's 5 classes, stride 8 at 64).
CE_UNKD_SHAPE = (12, 21, 16, 32, 512) if wl.on_gpu() else (16, 5, 4, 8, 64)  # N, K, O, h, H


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", _backends("ce_unkd"))
def test_ce_unkd(benchmark, device_info, backend, dtype):
    """CE (per-image factor, ignored pixels) + 10 * UNKD on logits upsampled to the labels, fwd + bwd;
    eager = lskd.reference.ce_unkd_sums (F.interpolate, then the losses) in the input dtype."""
    n, k, o, h, size = CE_UNKD_SHAPE
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, k, h, h, generator=g).to(DEV, dtype).requires_grad_()
    teacher = torch.randn(n, o, h, h, generator=g).to(DEV, dtype)
    labels = torch.randint(0, k, (n, size, size), generator=g)
    labels[:, : size // 8] = 255
    labels, weight = labels.to(DEV), torch.rand(n, generator=g).to(DEV)
    pixels = labels.numel()

    def ref():
        ce, unkd = reference.ce_unkd_sums(student, teacher, labels, weight, (size, size))
        ((ce.sum() + 10 * unkd.sum()) / pixels).backward()

    fn = _loss_fn(ref, backend, ("ce_unkd", dtype))
    if fn is None:

        def fn():
            out = lskd.ce_unkd(student, teacher, labels, weight, backend=backend)
            ((out.ce.sum() + 10 * out.unkd.sum()) / pixels).backward()

    shapes = [(n, k, h, h), (n, o, h, h), (n, 1, size, size)]
    benchmark.group = f"ce_unkd {_shape_id(shapes[0])} to {size} {_dtype_id(dtype)}"
    _run(benchmark, device_info, "ce_unkd", backend, shapes, dtype, fn, [student])


# ---------------------------------------------------------------- pseudo_labels
# PLOP's / LSKD's per-batch pseudo-labels at the step bench's shapes (GPU: VOC 15-5's 16 old
# classes, stride 16 at 512; CPU: the demo's 4 old classes, stride 8 at 64), no gradient.
PSEUDO_SHAPE = (12, 16, 32, 512) if wl.on_gpu() else (16, 4, 8, 64)  # N, O, h, H


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", _backends("pseudo_labels"))
def test_pseudo_labels(benchmark, device_info, backend, dtype):
    """Targets and counts from the teacher's logits upsampled to the labels; eager =
    lskd.reference.pseudo_labels (F.interpolate, entropy, argmax, threshold) in the input dtype."""
    n, o, h, size = PSEUDO_SHAPE
    g = torch.Generator().manual_seed(0)
    teacher = (3 * torch.randn(n, o, h, h, generator=g)).to(DEV, dtype)
    labels = torch.randint(0, o + 3, (n, size, size), generator=g)
    labels[:, : size // 8] = 255
    labels, thresholds = labels.to(DEV), torch.rand(o, generator=g).to(DEV)

    def ref():  # returns the outputs: unused ones would be dead code to torch.compile
        return reference.pseudo_labels(teacher, labels, thresholds.to(dtype))

    fn = _loss_fn(ref, backend, ("pseudo_labels", dtype))
    if fn is None:

        def fn():
            lskd.pseudo_labels(teacher, labels, thresholds, backend=backend)

    shapes = [(n, o, h, h), (n, 1, size, size)]
    benchmark.group = f"pseudo_labels {_shape_id(shapes[0])} to {size} {_dtype_id(dtype)}"
    _run(benchmark, device_info, "pseudo_labels", backend, shapes, dtype, fn, [])
