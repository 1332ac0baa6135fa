"""The benchmark tooling stays runnable: summarize.py on committed results, profile_loss.py and a
CPU dry run of gpu_check.sh's profile stage (the GPU machine is lent rarely: a script that rots
between two loans costs a whole device session)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "LSKD_BENCH_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}


def test_summarize_committed_gpu_results(tmp_path):
    out = tmp_path / "table.md"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "summarize.py"), str(ROOT / "benches/results/h200-2026-11-26-loss.json"),
         "--markdown", str(out)],
        capture_output=True, text=True, timeout=120, env=ENV,
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
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert [x["workload"] for x in res] == ["loss fused", "loss per-term", "md_masks six maps"]
    assert all(x["wall_ms"] > 0 and x["host_ops"] for x in res)


def test_gpu_check_dry_run_profile_stage(tmp_path):
    env = {**ENV, "OUT": str(tmp_path), "STAGES": "profile", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "benches" / "gpu_check.sh")], capture_output=True, text=True, timeout=300,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "## loss fused" in r.stdout and "done, status 0" in r.stdout
    assert (tmp_path / "profile.json").is_file()
