#!/usr/bin/env python
"""Where the time of the whole LSKD loss and of md_masks goes: wall time against kernel time.

Runs, at the LSKD shapes (N = 12 on a GPU, the scaled maps on the CPU), the whole
distillation loss (forward + backward; fused = one lskd.distill_terms call,
per-term = seven calls) and md_masks of the six maps under torch.profiler, and
prints per workload: synchronised wall time per iteration, the sum of the device
kernel times per iteration, their ratio (wall > kernels: the host is the
bottleneck), the kernels by total time and the host ops by self CPU time.

    python benches/profile_loss.py [--iters 20] [--json out.json] [--backend cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import lskd_workload as wl  # noqa: E402

import lskd  # noqa: E402


def _workloads(backend: str, dtype: torch.dtype):
    shapes = wl.lskd_maps()
    s, t, m, n = wl.make_maps(shapes, dtype)

    def loss(fused):
        def run():
            for x in s:
                x.grad = None
            wl.lskd_loss(s, t, m, n, backend, fused=fused).backward()

        return run

    feats = [f.detach() for f in s]
    erased = [(f * 0.5, f + 0.1) for f in feats]
    labels = torch.randint(0, 21, (shapes[0][0], 64, 64), device=wl.device())

    def masks():
        for f, (cb, dn) in zip(feats, erased):
            lskd.md_masks(f, cb, dn, labels, 16, backend=backend)

    return {"loss fused": loss(True), "loss per-term": loss(False), "md_masks six maps": masks}


def _profile(fn, iters: int):
    for _ in range(3):
        fn()
    wl.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    wl.sync()
    wall = (time.perf_counter() - t0) / iters
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if wl.on_gpu() else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        wl.sync()
    kernels = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        dt = getattr(ev, "device_type", None)
        if wl.on_gpu() and dt is not None and dt == torch.autograd.DeviceType.CUDA:
            k = kernels[ev.name[:70]]
            k[0] += 1
            k[1] += ev.time_range.elapsed_us()  # a kernel event: its duration on the device
    kernel_us = sum(v[1] for v in kernels.values()) / iters
    launches = sum(v[0] for v in kernels.values()) / iters
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    return {
        "host_ops": [
            {"name": e.key[:70], "per_iter": e.count / iters, "self_cpu_us_per_iter": e.self_cpu_time_total / iters}
            for e in host
        ],
        "wall_ms": wall * 1e3,
        "kernel_ms": kernel_us / 1e3,
        "launches_per_iter": launches,
        "top_kernels": [{"name": k, "per_iter": v[0] / iters, "us_per_iter": v[1] / iters} for k, v in top],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--backend", default="cuda" if wl.on_gpu() else "cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    results = []
    for dtype in wl.bench_dtypes():
        for name, fn in _workloads(args.backend, dtype).items():
            r = _profile(fn, args.iters)
            r.update(workload=name, dtype=str(dtype).replace("torch.", ""), backend=args.backend)
            results.append(r)
            print(
                f"\n## {name}, {r['dtype']}, {args.backend}: wall {r['wall_ms']:.3f} ms/iter, kernels "
                f"{r['kernel_ms']:.3f} ms/iter ({r['launches_per_iter']:.0f} launches)"
            )
            for k in r["top_kernels"]:
                print(f"  {k['us_per_iter']:9.1f} us  x{k['per_iter']:4.0f}  {k['name']}")
            print("  host (self CPU time, under the profiler):")
            for k in r["host_ops"]:
                print(f"  {k['self_cpu_us_per_iter']:9.1f} us  x{k['per_iter']:4.0f}  {k['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name() if wl.on_gpu() else "cpu", "results": results}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
