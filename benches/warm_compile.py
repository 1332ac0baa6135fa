#!/usr/bin/env python
"""Compile the loss benchmark's torch.compile column ahead of time, into the on-disk inductor cache.

benches/test_bench_ops.py::test_lskd_loss[compile-<dtype>] compiles the eager reference
loss (forward + backward, one graph per dtype); cold, that takes minutes per dtype on the
GPU machine, almost all of it in inductor (lowering, scheduling, code generation, kernel
compilation), a few seconds in dynamo's tracing. This script compiles exactly that
function (lskd_workload.reference_step through lskd_workload.compiled, the shapes of
lskd_workload.lskd_maps(), inputs from make_maps) and runs it twice, like the benchmark's
warm-up. Run with the same TORCHINDUCTOR_CACHE_DIR (and the same environment otherwise: on
the CPU the thread count is part of the cache key) as the benchmark process, that process then
loads the AOTAutograd / FX graph / kernel caches and only traces again (seconds). Measured on a
2-core CPU at the CPU maps, float32: 155-177 s cold, 4-6 s from the cache (3.7-4.6 s of it dynamo
tracing). benches/gpu_check.sh runs it in the background during the GPU tests.

    TORCHINDUCTOR_CACHE_DIR=/tmp/lskd-inductor-cache python benches/warm_compile.py \\
        [--dtypes float32,bfloat16] [--jobs 2] [--json warm.json] [--maps bench|tiny] [--backend inductor]

--dtypes: default the benchmark's (float32 and bfloat16 on a GPU, float32 on the CPU).
--jobs: 1 compiles the dtypes one after the other in this process, more one process per
dtype, in parallel (default: parallel where there are 8 or more CPUs). --maps tiny: six
small maps, for tests (warms nothing the benchmark uses). --backend: torch.compile backend
(tests use "eager", dynamo alone, to stay fast).
Prints one line per dtype (first-call time, cache hits and misses, where the time went)
and exits non-zero if a compilation failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The same maps at a few pixels a side (C >= 20 on map 4 for the 20 SOP groups).
TINY_MAPS = [(1, 8, 8, 8), (1, 8, 8, 8), (1, 8, 4, 4), (1, 8, 4, 4), (1, 40, 4, 4), (1, 4, 4, 4)]

# dynamo's compilation_time_metrics keys (checked with torch 2.14; a key another release lacks
# reads 0) -> the split printed and recorded. inductor_bw: the backward, compiled at its first call.
PHASES = {
    "dynamo_total": "_compile.compile_inner",
    "tracing": "bytecode_tracing",
    "aot_autograd": "create_aot_dispatcher_function",
    "inductor_fw": "compile_fx.<locals>.fw_compiler_base",
    "inductor_bw": "compile_fx.<locals>.bw_compiler",
    "cache_load": "AOTAutogradCache.inductor_load",
}


def phase_times() -> dict:
    """Seconds spent so far in this process per compile phase (dynamo's compilation metrics)."""
    from torch._dynamo import utils

    metrics = getattr(utils, "compilation_time_metrics", {})
    return {name: round(sum(metrics.get(key, [])), 3) for name, key in PHASES.items()}


def warm(dtype_name: str, maps: str, backend: str) -> dict:
    import lskd_workload as wl
    import torch

    dtype = getattr(torch, dtype_name)
    shapes = wl.lskd_maps() if maps == "bench" else TINY_MAPS
    s, t, m, n = wl.make_maps(shapes, dtype)
    step = wl.reference_step(s, t, m, n)
    if backend == "inductor":
        fn = wl.compiled(step)
    else:
        torch._dynamo.reset()
        fn = torch.compile(step, backend=backend)
    before, phases0 = wl.compile_cache_counters(), phase_times()
    times = []
    for _ in range(2):  # the benchmark's two warm-up steps
        for x in s:
            x.grad = None
        t0 = time.perf_counter()
        fn()
        wl.sync()
        times.append(time.perf_counter() - t0)
    after, phases1 = wl.compile_cache_counters(), phase_times()
    return {
        "dtype": dtype_name,
        "device": str(wl.device()),
        "shapes": [list(x) for x in shapes],
        "backend": backend,
        "first_call_s": round(times[0], 3),
        "second_call_s": round(times[1], 4),
        "cache": {k: after[k] - before[k] for k in after},
        "phases_s": {k: round(phases1[k] - phases0[k], 3) for k in phases1},
    }


def describe(r: dict) -> str:
    c, p = r["cache"], r["phases_s"]
    return (
        f"warm_compile: {r['dtype']} on {r['device']}: first call (compile + fwd + bwd) {r['first_call_s']:.1f} s, "
        f"second {r['second_call_s']:.3f} s; caches: aotautograd hit {c['autograd_cache_hit']} miss "
        f"{c['autograd_cache_miss']}, fxgraph hit {c['fxgraph_cache_hit']} miss {c['fxgraph_cache_miss']} "
        f"bypass {c['fxgraph_cache_bypass']}; dynamo tracing {p['tracing']:.1f} s, inductor fw "
        f"{p['inductor_fw']:.1f} s + bw {p['inductor_bw']:.1f} s, cache loading {p['cache_load']:.1f} s"
    )


def run_parallel(args, dtypes) -> tuple[list, int]:
    """One child process per dtype (dynamo and inductor's scheduling are single-threaded Python)."""
    children = []
    tmp = tempfile.mkdtemp(prefix="warm_compile-")

    def stop(signum, _frame):
        for _, proc, _ in children:
            if proc.poll() is None:
                proc.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    # Split the cores between the children's kernel-compile workers (not part of the cache key).
    env = {"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // len(dtypes))), **os.environ}
    for d in dtypes:
        out = os.path.join(tmp, f"{d}.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--dtypes",
            d,
            "--child",
            "--json",
            out,
            "--maps",
            args.maps,
            "--backend",
            args.backend,
        ]
        children.append((d, subprocess.Popen(cmd, env=env), out))
    results, rc = [], 0
    for d, proc, out in children:
        code = proc.wait()
        if code != 0 or not os.path.exists(out):
            print(f"warm_compile: {d} failed (exit {code})", flush=True)
            rc = 1
            continue
        with open(out) as fh:
            results.extend(json.load(fh)["results"])
    shutil.rmtree(tmp, ignore_errors=True)
    return results, rc


def main() -> int:
    import lskd_workload as wl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default=",".join(wl.bench_dtype_names()))
    p.add_argument("--jobs", type=int, default=0, help="parallel processes (0: auto)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--maps", choices=("bench", "tiny"), default="bench")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one dtype of a parallel run
    args = p.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    jobs = 1 if args.child else args.jobs or (len(dtypes) if (os.cpu_count() or 1) >= 8 else 1)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not args.child:
        print(
            f"warm_compile: dtypes {dtypes}, {min(jobs, len(dtypes))} process(es), inductor cache "
            f"{cache or '(TORCHINDUCTOR_CACHE_DIR unset: inductor default under the temp dir)'}",
            flush=True,
        )
    rc = 0
    if jobs > 1 and len(dtypes) > 1:
        results, rc = run_parallel(args, dtypes)
    else:
        results = []
        for d in dtypes:
            try:
                r = warm(d, args.maps, args.backend)
            except Exception as e:  # report and go on with the next dtype
                print(f"warm_compile: {d} failed: {type(e).__name__}: {e}", flush=True)
                rc = 1
                continue
            print(describe(r), flush=True)
            results.append(r)
    elapsed = time.perf_counter() - T_START
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"elapsed_s": round(elapsed, 1), "cache_dir": cache, "results": results}, fh, indent=1)
    if not args.child:
        print(f"warm_compile: done in {elapsed:.1f} s, status {rc}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
