"""The fixed per-call cost of the fused ops: forward + backward on tiny maps,
where the kernels take next to no time and what is measured is host overhead
(validation, dispatch, autograd, allocation, launches) plus, on a GPU, the
latency of one synchronised call. On a CPU the C++ kernels also fork their
OpenMP team on every call (csrc/cpu: grain size 1), which costs little on
an idle machine and a lot on a loaded one: compare runs on the same machine
state only.

    pytest benches/test_bench_overhead.py --benchmark-only --benchmark-json=out.json
    python benches/summarize.py out.json

One test per (op, backend): every kernel backend the device has (cuda and
triton on a GPU; cpu on the CPU, where Triton only runs in its interpreter,
which says nothing of speed), against the eager reference in the same run.
A backend the installation lacks is skipped with the reason. Each round
times LSKD_BENCH_OVERHEAD_ITERS calls (default 50) and pytest-benchmark
reports the time of one call; LSKD_BENCH_ROUNDS rounds as in
test_bench_ops.py. Ops: pod_distill,
sop_distill and md_masks on a [2, 4, 8, 8] map (on a GPU also the logits
map [12, 16, 32, 32] of the LSKD loss), and the whole LSKD loss over six
tiny maps (seven loss terms, one backward). The records carry the same
extra_info as test_bench_ops.py, so summarize.py tabulates them; their op
is prefixed "overhead" so that they form their own groups.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import lskd_workload as wl  # noqa: E402

import lskd  # noqa: E402
from lskd import reference  # noqa: E402
from lskd.ops._backends import _unavailable  # noqa: E402

DEV = wl.device()
ROUNDS = int(os.environ.get("LSKD_BENCH_ROUNDS", "20" if wl.on_gpu() else "5"))
ITERS = int(os.environ.get("LSKD_BENCH_OVERHEAD_ITERS", "50"))
TINY = (2, 4, 8, 8)
SHAPES = [TINY, (12, 16, 32, 32)] if wl.on_gpu() else [TINY]
BACKENDS = ["eager", "cpu", "cuda", "triton"]


def _shape_id(shape):
    return "x".join(map(str, shape))


def _skip_unless_available(backend: str) -> None:
    if backend == "eager":
        return
    if DEV.type == "cpu" and backend == "triton":
        pytest.skip("triton on the CPU runs in its interpreter, which says nothing of overhead")
    why = _unavailable(backend, DEV)
    if why:
        pytest.skip(f"backend {backend!r} is unavailable on {DEV}: {why}")


def _measure(benchmark, device_info, op, backend, shapes, dtype, fn, inputs):
    """Time ``fn`` (a forward + backward) per call, synchronised; record what summarize.py reads."""

    def step():
        for t in inputs:
            t.grad = None
        fn()
        wl.sync()

    for _ in range(3 * ITERS):  # warm-up (first-call costs: Triton compilation, caches)
        step()
    # pytest-benchmark times ITERS calls per round and reports the time of one.
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=ITERS)
    median = benchmark.stats.stats.median
    nbytes = wl.floor_bytes(op, shapes, dtype)
    bw = device_info["copy_bandwidth_GBps"] * 1e9
    benchmark.extra_info.update(
        op=f"overhead {op}",
        backend=backend,
        shape=" ".join(_shape_id(s) for s in shapes),
        dtype=str(dtype).replace("torch.", ""),
        calls_per_round=ITERS,
        us_per_call=median * 1e6,
        threads=torch.get_num_threads(),
        floor_bytes=nbytes,
        floor_ms=nbytes / bw * 1e3,
        achieved_GBps=nbytes / median / 1e9,
        fraction_of_copy_bw=nbytes / median / bw,
        peak_extra_MB=None,
        **device_info,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overhead_pod_distill(benchmark, device_info, backend, shape):
    _skip_unless_available(backend)
    s, t, _, _ = wl.make_maps([shape], torch.float32)
    a, b = s[0], t[0]
    if backend == "eager":

        def fn():
            reference.pod_distances(a, b).mean().backward()
    else:

        def fn():
            lskd.pod_distill(a, b, backend=backend).backward()

    benchmark.group = f"overhead pod_distill {_shape_id(shape)}"
    _measure(benchmark, device_info, "pod_distill", backend, [shape], torch.float32, fn, [a])


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overhead_sop_distill(benchmark, device_info, backend, shape):
    _skip_unless_available(backend)
    s, t, _, _ = wl.make_maps([shape], torch.float32)
    a, b = s[0], t[0]
    groups = 2  # C = 4 on the tiny map
    if backend == "eager":

        def fn():
            reference.sop_distances(a, b, groups=groups).mean().backward()
    else:

        def fn():
            lskd.sop_distill(a, b, groups=groups, backend=backend).backward()

    benchmark.group = f"overhead sop_distill {_shape_id(shape)}"
    _measure(benchmark, device_info, "sop_distill", backend, [shape], torch.float32, fn, [a])


@pytest.mark.parametrize("backend", BACKENDS)
def test_overhead_md_masks(benchmark, device_info, backend):
    """md_masks on the tiny map (no backward: the masks are the teacher's)."""
    _skip_unless_available(backend)
    feats = [f[0].detach() for f in (wl.make_maps([TINY], torch.float32, seed=i)[0] for i in range(3))]
    labels = torch.randint(0, 6, (TINY[0], 2 * TINY[2], 2 * TINY[3]), device=DEV)
    impl = "reference" if backend == "eager" else backend

    def fn():
        lskd.md_masks(*feats, labels, 3, backend=impl)

    benchmark.group = f"overhead md_masks {_shape_id(TINY)}"
    _measure(benchmark, device_info, "md_masks", backend, [TINY], torch.float32, fn, [])


@pytest.mark.parametrize("backend", BACKENDS + ["cpu" + wl.PER_TERM, "cuda" + wl.PER_TERM])
def test_overhead_lskd_loss(benchmark, device_info, backend):
    """The whole LSKD loss (seven terms over six maps, masks on four) on tiny maps, one backward:
    "cpu"/"cuda" in one lskd.distill_terms call, "<backend>-per-term" in seven calls."""
    impl, fused = wl.split_variant(backend)
    _skip_unless_available(impl)
    shapes = [TINY] * 6
    s, t, m, n = wl.make_maps(shapes, torch.float32)

    def fn():  # groups = 2 for C = 4
        wl.lskd_loss(s, t, m, n, None if impl == "eager" else impl, fused=fused, groups=2).backward()

    benchmark.group = "overhead lskd_loss six tiny maps"
    _measure(benchmark, device_info, "lskd_loss", backend, shapes, torch.float32, fn, s)
