"""Benchmark workloads: shapes, inputs, the whole LSKD loss, and byte counts.

Shared by benches/test_bench_ops.py (pytest-benchmark) and benches/summarize.py.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

import lskd
from lskd import reference

# The six LSKD maps at N = 12, 512 crop (docs/MATHEMATICS.md §1.2): stages 1-4, ASPP, logits.
GPU_MAPS: List[Tuple[int, int, int, int]] = [
    (12, 256, 128, 128),
    (12, 512, 64, 64),
    (12, 1024, 32, 32),
    (12, 2048, 32, 32),
    (12, 256, 32, 32),
    (12, 16, 32, 32),
]
# The same maps scaled down for 2-core CPUs (N = 2, a quarter of the side).
CPU_MAPS: List[Tuple[int, int, int, int]] = [
    (2, 256, 32, 32),
    (2, 512, 16, 16),
    (2, 1024, 8, 8),
    (2, 2048, 8, 8),
    (2, 256, 8, 8),
    (2, 16, 8, 8),
]
CPU_EXTRA = [(2, 256, 64, 64)]


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("LSKD_BENCH_DEVICE", "cuda") == "cuda"


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def lskd_maps() -> List[Tuple[int, int, int, int]]:
    return GPU_MAPS if on_gpu() else CPU_MAPS


def bench_dtypes() -> List[torch.dtype]:
    """The dtypes benchmarked: float32 and bfloat16 on a GPU, float32 on the CPU."""
    return [torch.float32, torch.bfloat16] if on_gpu() else [torch.float32]


def bench_dtype_names() -> List[str]:
    return [str(d).replace("torch.", "") for d in bench_dtypes()]


def make_maps(shapes: Sequence[Tuple[int, int, int, int]], dtype: torch.dtype, seed: int = 0):
    """Random student/teacher maps (never zeros), MD masks on maps 2-5."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = device()
    students, teachers, spatial, channel = [], [], [], []
    for i, (n, c, h, w) in enumerate(shapes):
        s = torch.randn(n, c, h, w, generator=g).to(dev, dtype)
        t = (s.float() + 0.3 * torch.randn(n, c, h, w, generator=g).to(dev)).to(dtype)
        students.append(s.requires_grad_())
        teachers.append(t)
        spatial.append(torch.rand(n, 1, h, w, generator=g).to(dev) > 0.3 if i >= 2 else None)
        channel.append(torch.rand(n, c, generator=g).to(dev) > 0.3 if 2 <= i <= 4 else None)
    return students, teachers, spatial, channel


def lskd_loss(
    students, teachers, spatial, channel, backend: Optional[str], fused: bool = True, groups: int = 20
) -> torch.Tensor:
    """The released LSKD distillation terms over the six maps, fixed weights (docs/MATHEMATICS.md §3.1).

    Maps 0-1 Local POD, 2-3 MD, 4 MD + MCD, 5 masked Local POD. ``backend=None``
    runs the eager reference in the inputs' dtype (the released code's baseline).
    ``fused``: the seven terms in one :func:`lskd.distill_terms` call (one op and
    one autograd node), else seven pod_distill/sop_distill calls.
    """
    s, t, m, n = students, teachers, spatial, channel
    if backend is not None and fused:
        pod0, pod1, md2, md3, md4, mcd, md5 = lskd.distill_terms(
            [
                lskd.PodTerm(s[0], t[0]),
                lskd.PodTerm(s[1], t[1]),
                lskd.PodTerm(s[2], t[2], m[2], n[2]),
                lskd.PodTerm(s[3], t[3], m[3], n[3]),
                lskd.PodTerm(s[4], t[4], m[4], n[4]),
                lskd.SopTerm(s[4], t[4], m[4], n[4], groups=groups),
                lskd.PodTerm(s[5], t[5], m[5], None),
            ],
            backend=backend,
        )
    else:
        if backend is None:

            def pod(a, b, sm=None, cm=None):
                return reference.pod_distances(a, b, sm, cm).mean()

            def sop(a, b, sm=None, cm=None):
                return reference.sop_distances(a, b, sm, cm, groups=groups).mean()
        else:

            def pod(a, b, sm=None, cm=None):
                return lskd.pod_distill(a, b, sm, cm, backend=backend)

            def sop(a, b, sm=None, cm=None):
                return lskd.sop_distill(a, b, sm, cm, groups=groups, backend=backend)

        pod0, pod1, md2, md3 = (
            pod(s[0], t[0]),
            pod(s[1], t[1]),
            pod(s[2], t[2], m[2], n[2]),
            pod(s[3], t[3], m[3], n[3]),
        )
        md4, mcd, md5 = pod(s[4], t[4], m[4], n[4]), sop(s[4], t[4], m[4], n[4]), pod(s[5], t[5], m[5], None)
    loss = 0.01 * (pod0 + pod1 + md2 + md3)
    return loss + 0.01 * md4 + 0.005 * mcd + 0.0005 * md5


def reference_step(students, teachers, spatial, channel, groups: int = 20):
    """Forward + backward of the eager reference loss: what the loss benchmark times as
    "eager" and hands to torch.compile as "compile" (and benches/warm_compile.py compiles
    ahead of it: one definition, so that both processes trace the same graphs)."""

    def ref():
        lskd_loss(students, teachers, spatial, channel, None, groups=groups).backward()

    return ref


def compiled(fn):
    """torch.compile(fn) from a fresh dynamo state: the benchmarks' "compile" backend."""
    torch._dynamo.reset()
    return torch.compile(fn)


_CACHE_COUNTERS = {
    "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"),
    "inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
}


def compile_cache_counters() -> dict:
    """Hits, misses and bypasses of the AOTAutograd and FX graph caches so far in this process."""
    from torch._dynamo.utils import counters

    return {k: counters[group][k] for group, keys in _CACHE_COUNTERS.items() for k in keys}


PER_TERM = "-per-term"


def split_variant(backend: str) -> Tuple[str, bool]:
    """Benchmark label -> (backend, fused): "cuda" runs distill_terms, "cuda-per-term" seven calls."""
    if backend.endswith(PER_TERM):
        return backend[: -len(PER_TERM)], False
    return backend, True


def floor_bytes(op: str, shapes, dtype: torch.dtype) -> int:
    """Bytes the op must move at least (fwd + bwd), per docs/MATHEMATICS.md §2.

    pod_distill: read a and b (forward), read a and write the gradient
    (backward): 4 passes. sop_distill: read a and b, write the gradient: 3
    passes (its backward needs only the pooled gradient). md_masks: read the
    three feature sets once. lskd_loss: 4 passes over every map (the MCD term
    on map 4 shares the passes of its MD term when fused; counted once).
    ce_unkd: :func:`ce_unkd_floor_bytes`. pseudo_labels (``shapes = [teacher (N, O, h, w), labels
    (N, 1, H, W)]``): read the teacher's logits and the int64 labels once, write the int64 targets.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    if op == "ce_unkd":
        return ce_unkd_floor_bytes(shapes, elem)
    if op == "pseudo_labels":
        (n, o, h, w), (_, _, hh, ww) = shapes
        return elem * n * o * h * w + 16 * n * hh * ww
    numel = sum(n * c * h * w for n, c, h, w in shapes)
    passes = {"pod_distill": 4, "sop_distill": 3, "md_masks": 3, "lskd_loss": 4}[op]
    return passes * numel * elem


def ce_unkd_floor_bytes(shapes, elem: int) -> int:
    """ce_unkd, ``shapes = [student (N, K, h, w), teacher (N, O, h, w), labels (N, 1, H, W)]``: read
    the student's and the teacher's logits and the int64 labels once, write the student's gradient
    once; nothing at the labels' resolution beyond reading them."""
    (n, k, h, w), (_, o, _, _), (_, _, hh, ww) = shapes
    return elem * (2 * n * k * h * w + n * o * h * w) + 8 * n * hh * ww


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Measured device copy bandwidth in bytes/s (read + write), median of 20 runs."""
    dev = device()
    nbytes = (1 << 30) if on_gpu() else (1 << 27)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    y = torch.empty_like(x)
    times = []
    import time

    for i in range(25):
        sync()
        t0 = time.perf_counter()
        y.copy_(x)
        sync()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]
