"""benches/test_bench_step.py stays runnable and fair, in a few seconds on the CPU (the GPU machine
is lent rarely: a benchmark that rots between two loans costs a device session).

* Every variant, (a) the student alone .. (f) LSKD as released and PLOP eager, runs through the
  trainer's iteration in float32 and under bf16 autocast, at the GPU stage's output stride (16) with
  a tiny backbone, 64 x 64 crops and batch 2: the code paths of the GPU run.
* The methods the bench writes from lskd.reference compute the package's terms: LSKD as released
  gives (d)'s nine terms and, with RGE, (e)'s weights; PLOP eager gives PLOP's. The benchmark then
  compares the same work done two ways.
* benches/summarize.py prints the step table with the ratios to (c) and (f).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lskd.train.iteration import train_iteration

BENCHES = Path(__file__).resolve().parents[1] / "benches"
sys.path.insert(0, str(BENCHES))

import summarize  # noqa: E402
import test_bench_step as step_bench  # noqa: E402


@pytest.fixture(scope="module")
def runs():
    """``{(dtype, variant): [(terms, weights) after each of 2 iterations]}`` (values as floats)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: two threads on a busy machine stall for seconds, one does not
    try:
        return _run_variants()
    finally:
        torch.set_num_threads(threads)


def _run_variants():
    work = step_bench.build_workload("tiny", 64, 2, 16)
    out = {}
    for dtype in ("float32", "bfloat16"):
        for key in step_bench.VARIANTS:
            step = step_bench.make_step(key, work, dtype)
            out[dtype, key] = []
            for i in range(2):
                where = f"{key} {dtype} iteration {i + 1}"
                terms, total = train_iteration(
                    step, step.student, step.student, work.images, work.labels, 1.0, 1e-3, where
                )
                assert torch.isfinite(total), where
                assert list(terms) == step.run.method.term_names(work.ctx), where
                values = {k: float(v.detach()) for k, v in terms.items()}
                out[dtype, key].append((values, step.phase.weighting.weights()))
    return out


def test_every_variant_runs_in_both_dtypes(runs):
    assert {key for _, key in runs} == set(step_bench.VARIANTS)
    assert set(runs["float32", "f-released"][0][0]) == set(runs["float32", "d-lskd"][0][0])
    assert list(runs["float32", step_bench.FLOOR][0][0]) == ["ce"]
    # the teacher is sharpened: pseudo-labels are accepted, PLOP's and LSKD's CE is not multiplied by 0
    assert runs["float32", "b-plop"][0][0]["ce"] > 0 and runs["float32", "d-lskd"][0][0]["ce"] > 0


@pytest.mark.parametrize(
    "eager, package", [("f-released", "d-lskd"), ("f-released", "e-lskd-rge"), ("plop-eager", "b-plop")]
)
def test_eager_variants_compute_the_package_terms(runs, eager, package):
    """Same student, batch and teacher: the same terms (float32) at the first iteration; RGE's weights
    after two iterations are those of (e) (the eager per-term gradients equal the fused op's)."""
    (terms_e, weights_e), (_, weights_e2) = runs["float32", eager]
    (terms_p, weights_p), (_, weights_p2) = runs["float32", package]
    assert terms_e.keys() == terms_p.keys()
    for k in terms_p:
        assert terms_e[k] == pytest.approx(terms_p[k], rel=1e-4, abs=1e-6), k
    if package == "e-lskd-rge":
        for k in weights_p2:
            assert weights_e2[k] == pytest.approx(weights_p2[k], rel=1e-4, abs=1e-6), k


def test_summary_table_has_the_ratios():
    def bench(variant, ms, peak=None):
        info = dict(kind="step", variant=variant, label=f"({variant})", dtype="bfloat16", backbone="resnet101")
        info.update(size=512, batch=12, output_stride=16, rounds=5, ms_per_iter=ms, peak_MB=peak, gpu="NVIDIA H200")
        return {"extra_info": info}

    data = {"benchmarks": [bench("c-floor", 100.0, 2048.0), bench("d-lskd", 105.0), bench("f-released", 250.0)]}
    text = summarize.step_table(data)
    assert "resnet101 (output stride 16), 512x512, batch 12, bfloat16 (autocast)" in text and "H200" in text
    assert "| (d-lskd) | 105.0 | 1.05 | 0.42 | - |" in text
    assert "| (c-floor) | 100.0 | 1.00 | 0.40 | 2048 |" in text


@pytest.mark.parametrize("full_s, backbone, size", [("50", "resnet101", "512"), ("150", "resnet50", "256")])
def test_gpu_check_stepbench_stage(tmp_path, full_s, backbone, size):
    """gpu_check.sh's stepbench stage: one pytest run of benches/test_bench_step.py per dtype, bf16
    first, ResNet-101 at 512 while the part's time-out (here 100 s) is at least STEP_BENCH_FULL_S, else
    ResNet-50 at 256 with a note. A stand-in python records what the stage asks for."""
    seen = tmp_path / "seen"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'case "$*" in *test_bench_step.py*)\n'
        f'  echo "$LSKD_STEP_BENCH_DTYPE $LSKD_STEP_BENCH_BACKBONE $LSKD_STEP_BENCH_SIZE $*" >> {seen}; exit 0;;\n'
        "  -c*) exit 0;;  # the machine / backend lines: not this test's business, and 3 s each\n"
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSKD_STEP_BENCH_")}
    env.update(OUT=str(tmp_path / "out"), PYTHON=str(fake), STAGES="stepbench", LSKD_BENCH_DEVICE="cpu")
    env.update(GPU_CHECK_BUDGET_S="200", GPU_CHECK_RESERVE_S="5", STEP_BENCH_FULL_S=full_s, STEP_BENCH_TIMEOUT="100")
    root = BENCHES.parent
    r = subprocess.run(
        ["bash", str(BENCHES / "gpu_check.sh")], capture_output=True, text=True, timeout=120, env=env, cwd=root
    )
    log = r.stdout + r.stderr[-2000:]
    assert r.returncode == 0 and r.stdout.rstrip().endswith("done, status 0"), log
    calls = seen.read_text().splitlines()
    assert [c.split()[:3] for c in calls] == [["bfloat16", backbone, size], ["float32", backbone, size]], log
    assert all("--benchmark-only" in c and "step-" in c for c in calls), calls
    assert ("note: step-bf16: the fallback ResNet-50 at 256" in r.stdout) == (backbone == "resnet50"), log


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["b-mib", "b-plop", "d-lskd", "e-lskd-rge"])
def test_iteration_has_no_host_sync(variant):
    """A whole training iteration (package ops, the trainer's own code) never waits for the GPU:
    torch.cuda.set_sync_debug_mode("error") raises at any synchronising call. The first iteration
    is left out (one-time probes and autotuning may synchronise)."""
    work = step_bench.build_workload("tiny", 64, 4, 16)
    step = step_bench.make_step(variant, work, "bfloat16")

    def iteration():
        train_iteration(step, step.student, step.student, work.images, work.labels, 1.0, 1e-3, variant)

    iteration()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        iteration()
        iteration()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    step.finite_watch.poll(wait=True)
