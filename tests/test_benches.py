"""The benchmark tooling stays runnable: summarize.py on committed results, profile_loss.py,
warm_compile.py, cuda_selftest.py (its small cases on the CPU kernels) and CPU dry runs of
gpu_check.sh (its profile and selftest stages, its time budget, the background compile warm-up
that it must kill), as the GPU machine is lent rarely: a script that rots between two loans costs
a whole device session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lskd

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LSKD_BENCH_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def test_summarize_committed_gpu_results(tmp_path):
    out = tmp_path / "table.md"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "summarize.py"),
            str(ROOT / "benches/results/h200-2026-11-26-loss.json"),
            "--markdown",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "NVIDIA H200" in text
    rows = [line for line in text.splitlines() if line.startswith("| lskd_loss |")]
    assert {row.split("|")[4].strip() for row in rows} >= {"eager", "cuda", "cuda-per-term", "triton"}


def test_profile_loss_runs(tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "profile_loss.py"), "--iters", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert [x["workload"] for x in res] == ["loss fused", "loss per-term", "md_masks six maps"]
    assert all(x["wall_ms"] > 0 and x["host_ops"] for x in res)


def test_step_options_ab_runs_at_a_tiny_size():
    """benches/step_options_ab.py: every setting but compile on two variants, tiny batch, 1 round."""
    env = dict(ENV, AB_ROUNDS="1", LSKD_STEP_BENCH_BATCH="2", LSKD_STEP_BENCH_SIZE="32")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "step_options_ab.py"),
            "base,cl-refout,cl-bf16,cl-inf",
            "c-floor,d-lskd",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count(" median ") == 8 and "cl-inf: over (c) d-lskd" in r.stdout


def test_cuda_selftest_dry_run_on_the_cpu_kernels():
    """benches/cuda_selftest.py's small cases (--smoke) against the CPU kernels: its inputs, layouts,
    masks, references and checks run as on the GPU (only the NaN poisoning of the allocator is CUDA's)."""
    if "cpu" not in lskd.available_backends("cpu"):
        pytest.skip("lskd._C has no CPU kernels")
    r = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "cuda_selftest.py"), "--device", "cpu", "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^# summary: \d+ passed, 0 failed$", r.stdout, re.M), r.stdout[-3000:]
    kinds = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("PASS ")}
    assert kinds == {"pod", "sop", "md"}, kinds


def test_gpu_check_selftest_stage_without_a_gpu(tmp_path):
    """gpu_check.sh's selftest stage calls the self-test as the GPU machine does; without a GPU it skips."""
    if torch.cuda.is_available():
        pytest.skip("with a GPU the stage runs the whole self-test")
    r, _, log = _gpu_check(tmp_path, STAGES="selftest")
    assert r.returncode == 0 and "done, status 0" in r.stdout, log
    assert "SKIP cuda_selftest: no CUDA device visible" in (tmp_path / "out" / "selftest.log").read_text()


def _gpu_check(tmp_path, **env):
    """Run benches/gpu_check.sh on the CPU with OUT = tmp_path/out; (result, stdout lines, log)."""
    env = {**ENV, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    r = subprocess.run(
        ["bash", str(ROOT / "benches" / "gpu_check.sh")], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    lines = r.stdout.strip().splitlines()
    return r, lines, r.stdout + r.stderr[-3000:]


def test_gpu_check_dry_run_profile_stage(tmp_path):
    r, _, log = _gpu_check(tmp_path, STAGES="profile")
    assert r.returncode == 0, log
    assert "## loss fused" in r.stdout and "done, status 0" in r.stdout
    assert (tmp_path / "out" / "profile.json").is_file()
    assert "SKIP" not in r.stdout and "warm_compile" not in r.stdout  # no bench stage: no warm-up


def test_gpu_check_skips_stages_past_the_budget(tmp_path):
    """A spent budget: every stage and the warm-up skipped with a line saying so, the end still printed, status 2."""
    r, lines, log = _gpu_check(tmp_path, STAGES="profile bench", GPU_CHECK_BUDGET_S="1")
    assert r.returncode == 2, log
    for name in ("warm-up", "profile", "bench1", "bench2"):
        assert any(line.startswith("== ") and f"SKIP {name}: time budget spent" in line for line in lines), log
    assert "note: skipped for the budget: warm-up profile bench1 bench2" in lines, log
    assert lines[-1].startswith("== ") and lines[-1].endswith("done, status 2"), log
    assert not (tmp_path / "out" / "profile.json").exists()


def _hanging_python(tmp_path, *scripts):
    """A python that hangs (sleep 300, its pid in <script>.pid) when running one of `scripts`."""
    fake = tmp_path / "python"
    cases = "".join(f"  *{name}) echo $$ > {tmp_path / name}.pid; exec sleep 300;;\n" for name in scripts)
    fake.write_text(f'#!/bin/bash\ncase "$1" in\n{cases}esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return str(fake)


def _gone(pid_file):
    try:
        os.kill(int(pid_file.read_text()), 0)
    except ProcessLookupError:
        return True
    return False


def test_gpu_check_cuts_a_stage_at_the_budget(tmp_path):
    """A hanging stage is timed out where the budget ends (not at its own cap), the later stages are skipped,
    the background warm-up ends with the budget, and the summary still comes last."""
    fake = _hanging_python(tmp_path, "profile_loss.py", "warm_compile.py")
    t0 = time.monotonic()
    r, lines, log = _gpu_check(
        tmp_path,
        STAGES="profile bench",
        PYTHON=fake,
        GPU_CHECK_BUDGET_S="30",
        GPU_CHECK_RESERVE_S="5",
        GPU_CHECK_MIN_STAGE_S="5",
    )
    assert time.monotonic() - t0 < 60, log
    assert r.returncode == 1, log
    assert any(
        re.match(r"profile +\d+ s  TIMED OUT after \d+ s \(cut by the budget\)", line.strip()) for line in lines
    ), log
    assert any("SKIP bench1: time budget spent" in line for line in lines), log
    # Its own time-out is the budget's end too: killed by the script or timed out, whichever comes first.
    assert any(re.search(r"warm-up: (killed|timed out) after", line) for line in lines), log
    assert _gone(tmp_path / "profile_loss.py.pid") and _gone(tmp_path / "warm_compile.py.pid")
    assert lines[-1].endswith("done, status 1"), log


def test_gpu_check_kills_an_unfinished_warmup(tmp_path):
    """A compile warm-up still running lets benchmark part 2 go first; outlasting its share of the budget it
    is killed and the loss (part 1) is benchmarked without the compile column; the table comes last."""
    # A python that hangs on warm_compile.py (a compilation that would not end in time) and runs the rest.
    fake = _hanging_python(tmp_path, "warm_compile.py")
    r, lines, log = _gpu_check(
        tmp_path,
        STAGES="bench",
        PYTHON=fake,
        GPU_CHECK_BUDGET_S="200",
        GPU_CHECK_RESERVE_S="5",
        BENCH_RESERVE_S="180",
        BENCH_TIMEOUT="170",
        BENCH_K1="test_lskd_loss and eager",
        BENCH_K2="test_md_masks and eager",
        LSKD_BENCH_EXPECT="",
        LSKD_BENCH_ROUNDS="1",
    )
    assert r.returncode == 0, log
    assert any("benchmark part 2 (no torch.compile) first, beside it" in line for line in lines), log
    assert any("compile warm-up: killed after" in line for line in lines), log
    assert any("part 1 runs with LSKD_BENCH_COMPILE=none" in line for line in lines), log
    assert any("part 1: test_lskd_loss and eager (LSKD_BENCH_COMPILE=none, time-out" in line for line in lines), log
    out = tmp_path / "out"
    bench = json.loads((out / "bench1.json").read_text())["benchmarks"]
    assert [b["extra_info"]["backend"] for b in bench] == ["eager"]
    assert bench[0]["extra_info"]["first_call_s"] > 0
    assert (out / "bench2.json").is_file()
    assert (out / "warm_compile.status").read_text().startswith("killed after")
    i = lines.index(next(line for line in lines if line.startswith("stages (GPU_CHECK_BUDGET_S=200 s")))
    assert [line.split()[0] for line in lines[i + 1 : i + 4]] == ["bench2", "warm-up", "bench1"], log
    assert lines[-1].endswith("done, status 0"), log
    assert _gone(tmp_path / "warm_compile.py.pid")


def test_warm_compile_runs_at_a_tiny_size(tmp_path):
    """warm_compile.py end to end on the CPU: both dtypes in parallel processes, the JSON and one line each.
    (backend "eager": dynamo only, without inductor's minute of code generation at any size.)"""
    out = tmp_path / "warm.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "warm_compile.py"),
            "--maps",
            "tiny",
            "--backend",
            "eager",
            "--dtypes",
            "float32,bfloat16",
            "--jobs",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [x["dtype"] for x in res] == ["float32", "bfloat16"]
    assert all(x["first_call_s"] > 0 and x["phases_s"]["tracing"] > 0 for x in res)
    assert r.stdout.count("warm_compile: float32 on cpu: first call") == 1
    assert "warm_compile: done in" in r.stdout
