"""The ``lskd`` command line: help, make-synthetic, clear errors on bad input, kill -9 + --resume,
and ``lskd demo --quick`` (marked ``demo``: deselect with ``-m "not demo"``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lskd.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
LSKD = [sys.executable, "-m", "lskd"]


def _run(args, timeout=300, **kw):
    return subprocess.run(LSKD + list(args), env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    assert (
        main(
            [
                "make-synthetic",
                "--out",
                str(root),
                "--classes",
                "4",
                "--images",
                "24",
                "--val-images",
                "8",
                "--size",
                "32",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    return root


def _train_args(data: Path, out: Path, *extra: str, task: str = "2-1", method: str = "mib") -> list:
    return [
        "train",
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--task",
        task,
        "--method",
        method,
        "--out",
        str(out),
        "--backbone",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--crop",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


def test_help_of_every_subcommand(capsys):
    script = Path(sys.executable).parent / "lskd"
    assert script.is_file(), "the lskd console script is missing: pip install -e . (setup.py entry_points)"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "make-synthetic" in r.stdout
    for cmd in ["train", "eval", "demo", "make-synthetic"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: lskd " + cmd in capsys.readouterr().out
    r = _run(["train", "--help"])
    assert r.returncode == 0 and "--resume" in r.stdout and "--init-from" in r.stdout and "--amp" in r.stdout
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_every_train_option_is_a_config_field():
    """`lskd train` hands its options to TrainConfig by name: none may be dropped on the way."""
    from dataclasses import fields

    from lskd.cli import build_parser
    from lskd.train import TrainConfig

    args = build_parser().parse_args(
        ["train", "--dataset", "folder", "--data-root", "d", "--task", "2-1", "--method", "mib", "--out", "o"]
    )
    assert set(vars(args)) - {"command"} <= {f.name for f in fields(TrainConfig)}


def test_make_synthetic(synth):
    assert (synth / "classes.txt").read_text().splitlines()[0] == "background"
    assert len((synth / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == 24


def test_missing_data_root(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_train_args(tmp_path / "nowhere", out))
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and str(tmp_path / "nowhere") in err
    assert not (out / "summary.json").exists()


def test_invalid_task(synth, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_train_args(synth, out, task="2-x"))
    err = capsys.readouterr().err
    assert code == 2 and "invalid task '2-x'" in err and "5 classes" in err
    assert not (out / "summary.json").exists()
    code = main(_train_args(synth, out, task="4-1"))  # B leaves no incremental class
    assert code == 2 and "4-1" in capsys.readouterr().err
    assert not (out / "summary.json").exists()


def test_checkpoint_of_another_task(synth, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(_train_args(synth, first, "--step", "0", "--quiet")) == 0
    capsys.readouterr()
    ckpt = first / "checkpoints" / "step0.pt"
    other = tmp_path / "other"
    code = main(_train_args(synth, other, "--init-from", str(ckpt), task="1-1"))
    err = capsys.readouterr().err
    assert code == 2 and "task '1-1'" in err and str(ckpt) in err
    assert not (other / "summary.json").exists()
    # --resume in a folder that holds a run of another task
    before = (first / "summary.json").read_bytes()
    code = main(_train_args(synth, first, "--resume", task="1-1"))
    err = capsys.readouterr().err
    assert code == 2 and "another run" in err and "task" in err
    assert (first / "summary.json").read_bytes() == before
    # a file that is not a checkpoint
    (tmp_path / "junk.pt").write_text("junk")
    code = main(_train_args(synth, tmp_path / "third", "--init-from", str(tmp_path / "junk.pt")))
    assert code == 2 and "cannot read checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "variant",
    [(), ("--weighting", "rge"), ("--search", "bilevel", "--search-epochs", "3")],
    ids=["fixed", "rge", "search"],
)
def test_kill9_then_resume_equals_uninterrupted(synth, tmp_path, variant):
    """SIGKILL during an incremental step (once an epoch checkpoint of step 1 exists), then
    --resume: the final summary equals an uninterrupted run's, exactly (CPU), with fixed
    weights, RGE (weights, L(0) and their optimiser state) and the search (scheme logits,
    map weights, Adam state; the kill lands during the search epochs)."""
    extra = ("--epochs-next", "6", "--quiet", *variant)
    ref = tmp_path / "ref"
    r = _run(_train_args(synth, ref, *extra, method="lskd"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        LSKD + _train_args(synth, out, *extra, method="lskd"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = out / "checkpoints" / "step1-last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert last.exists(), f"no epoch checkpoint of step 1 appeared (rc={proc.poll()})"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "step1.pt").exists(), "step 1 finished before the kill"
    assert not (out / "summary.json").exists()
    r = _run(_train_args(synth, out, *extra, "--resume", method="lskd"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    assert got == want
    assert (out / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()
    if variant:
        assert json.loads((out / "weights" / "step1.json").read_text()) == json.loads(
            (ref / "weights" / "step1.json").read_text()
        )


@pytest.mark.demo
def test_demo_quick(tmp_path):
    """``lskd demo --quick``: the whole CI demo, every method including LSKD with RGE and with the
    search (its duration is printed, not asserted: speed belongs to benchmarks)."""
    t0 = time.time()
    r = _run(["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet"], timeout=600)
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(s["methods"]) == {"joint", "finetune", "mib", "plop", "lskd", "lskd-fixed", "lskd+search"}
    for name, summ in s["methods"].items():
        assert {"dataset", "task", "method", "steps"} <= set(summ)
        assert summ["steps"][-1]["miou_all"] is not None
    steps = {e["step"] for e in s["methods"]["lskd"]["steps"]}
    assert steps == {0, 1, 2, 3, 4}  # task 2-1
    assert "Does each method learn the new class?" in (tmp_path / "demo" / "summary.md").read_text()
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 1000
    md = (tmp_path / "demo" / "summary.md").read_text()
    assert "| lskd |" in md and "| lskd+search |" in md and "old" in r.stdout
    last = {m: s["methods"][m]["steps"][-1] for m in ("lskd", "lskd-fixed", "lskd+search")}
    assert set(last["lskd+search"]["schemes"]) == set(last["lskd"]["schemes"])
    assert last["lskd"]["weights"] != last["lskd-fixed"]["weights"]  # RGE (as released) moved the weights
    assert set(last["lskd-fixed"]["weights"].values()) == {1.0}
    assert 0.0 <= last["lskd"]["pseudo_labels"]["pseudo_accepted"] <= 1.0  # reported per step
    assert set(last["lskd"]["bn_gap"]) == {"train", "eval"}
    print(f"lskd demo --quick: {elapsed:.0f} s")
