"""The run directory never lies: eval of a moved or partial run, a resume with other settings,
history across invocations, temporaries left by a kill, the lock, one-line errors (device,
learning rate, divergence, read-only and full disks), term-weight names, file modes, checks
before training, and corrupt checkpoints."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lskd.cli import main
from lskd.data import make_synthetic
from lskd.train import RunError, TrainConfig, evaluate_run, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """4 object classes, 24 training and 8 validation images of 32x32."""
    root = tmp_path_factory.mktemp("rundir") / "data"
    make_synthetic(root, classes=4, images=24, val_images=8, size=32, seed=3)
    return root


def _cfg(data: Path, out: Path, method: str = "mib", **kw) -> TrainConfig:
    base = dict(
        dataset="folder",
        data_root=str(data),
        task="2-1",
        method=method,
        out=str(out),
        backbone="tiny",
        epochs=1,
        batch_size=8,
        crop=32,
        workers=0,
        quiet=True,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _args(data: Path, out: Path, *extra: str) -> list:
    return [
        "train",
        "--dataset",
        "folder",
        "--data-root",
        str(data),
        "--task",
        "2-1",
        "--method",
        "mib",
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
        "--quiet",
        *extra,
    ]


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.startswith(f"lskd {command}: error: "), err
    return err


# -- 1. eval reads the run directory it is given ------------------------------------------------


def test_eval_of_a_moved_run_uses_its_own_checkpoints(synth, tmp_path):
    """Train runs/x, move it to runs/arch_x, train runs/x again with another seed: evaluating
    runs/arch_x reproduces its own numbers, not the new run's; a copy without checkpoints fails."""
    first = train(_cfg(synth, tmp_path / "x", step=0))
    shutil.move(str(tmp_path / "x"), str(tmp_path / "arch_x"))
    second = train(_cfg(synth, tmp_path / "x", step=0, seed=5))
    assert second["steps"] != first["steps"]  # other training losses at least
    again = evaluate_run(str(tmp_path / "arch_x"), quiet=True, device="cpu")
    assert again["steps"] == first["steps"]
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "arch_x", bare, ignore=shutil.ignore_patterns("*.pt"))
    with pytest.raises(RunError, match=r"step0\.pt"):
        evaluate_run(str(bare), quiet=True, device="cpu")


# -- 2. the settings of a run are its identity --------------------------------------------------


def test_resume_with_other_settings_is_refused(synth, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth, out, step=0, epochs=2))
    config = (out / "config.json").read_text()
    for change, flag in [
        (dict(epochs=5), "--epochs"),
        (dict(lr_next=0.1), "--lr-next"),
        (dict(seed=9, lr=5.0), "--seed"),
    ]:
        settings = {"epochs": 2, **change}
        with pytest.raises(RunError, match=flag):
            train(_cfg(synth, out, resume=True, **settings))
        with pytest.raises(RunError, match=flag):
            train(_cfg(synth, out, step=1, **settings))
    assert (out / "config.json").read_text() == config
    # what does not change results may change: workers, quiet, the evaluation batch
    s = train(_cfg(synth, out, epochs=2, resume=True, quiet=False, eval_batch_size=3))
    assert [e["step"] for e in s["steps"]] == [0, 1, 2]
    assert (out / "config.json").read_text() == config


# -- 3. history.json keeps every step -----------------------------------------------------------


def test_history_keeps_earlier_steps(synth, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth, out, step=0))
    train(_cfg(synth, out, step=1))
    history = json.loads((out / "history.json").read_text())
    assert sorted({h["step"] for h in history}) == [0, 1]
    # a kill between step 1's checkpoint and history.json: the resume still records step 1
    (out / "history.json").write_text(json.dumps([h for h in history if h["step"] == 0]))
    train(_cfg(synth, out, resume=True))
    history = json.loads((out / "history.json").read_text())
    assert sorted({h["step"] for h in history}) == [0, 1, 2]


# -- 5. temporaries left by a kill --------------------------------------------------------------


def test_resume_removes_temporaries_of_killed_writes(synth, tmp_path):
    out = tmp_path / "run"
    train(_cfg(synth, out, step=0))
    left = [out / "checkpoints" / ".step1-last.pt.k2j4h1x9.tmp", out / ".summary.json.a8b7c6d5.tmp"]
    for p in left:
        p.write_bytes(b"partial")
    keep = out / "notes.tmp"
    keep.write_text("mine")
    train(_cfg(synth, out, step=1))
    assert not any(p.exists() for p in left)
    assert keep.read_text() == "mine"


# -- 6. one writer per run directory ------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"lskd train, pid %d" % os.getpid())
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_refused_and_stale_lock_recognised(synth, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"in use by another process .*pid {holder.pid}"):
            train(_cfg(synth, out, step=0))
        assert not (out / "checkpoints").exists() and not (out / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    train(_cfg(synth, out, step=0))  # the killed holder's lock is stale
    assert "ended without releasing its lock" in (out / "train.log").read_text()
    assert (out / ".lock").read_text() == ""


# -- 7. one line instead of a traceback ---------------------------------------------------------


@pytest.mark.parametrize("device, needle", [("tpu", "--device must be"), ("cuda:x", "--device must be")])
def test_bad_device_is_one_line(synth, tmp_path, capsys, device, needle):
    assert main(_args(synth, tmp_path / "d", "--step", "0")[:-3] + ["--device", device, "--quiet", "--step", "0"]) == 2
    assert needle in _one_error_line(capsys, "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_one_line(synth, tmp_path, capsys):
    assert main(_args(synth, tmp_path / "d", "--device", "cuda")) == 2
    assert "CUDA is not available" in _one_error_line(capsys, "train")


@pytest.mark.parametrize("flag", ["--lr", "--lr-next", "--weight-decay"])
def test_non_finite_rates_are_refused(synth, tmp_path, capsys, flag):
    assert main(_args(synth, tmp_path / "d", flag, "nan")) == 2
    assert flag in _one_error_line(capsys, "train")


def test_diverging_run_names_step_epoch_and_term(synth, tmp_path, capsys):
    assert main(_args(synth, tmp_path / "d", "--step", "0", "--lr", "1e30")) == 2
    err = _one_error_line(capsys, "train")
    assert "diverged at mib step 0/2 epoch 1/1 iteration" in err and "ce" in err and "lower --lr" in err


def test_full_disk_is_one_line(synth, tmp_path, capsys, monkeypatch):
    import lskd._io

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lskd._io.os, "fsync", full)
    assert main(_args(synth, tmp_path / "d", "--step", "0")) == 2
    err = _one_error_line(capsys, "train")
    assert "No space left on device" in err and str(tmp_path / "d") in err


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); test_full_disk_is_one_line covers the path")


@pytest.fixture
def mounts():
    made = []
    yield made
    for m in made:
        subprocess.run(["umount", str(m)], capture_output=True)


def test_read_only_and_full_filesystems_are_one_line(synth, tmp_path, capsys, mounts):
    """Real file systems: a read-only one (train and eval) and a 256 KiB one (full disk)."""
    ro, small = tmp_path / "ro", tmp_path / "small"
    _mount_tmpfs(ro, "size=1m,ro")
    mounts.append(ro)
    assert main(_args(synth, ro / "run", "--step", "0")) == 2
    assert "Read-only file system" in _one_error_line(capsys, "train")
    _mount_tmpfs(small, "size=256k")
    mounts.append(small)
    assert main(_args(synth, small / "run", "--step", "0")) == 2
    assert "No space left on device" in _one_error_line(capsys, "train")


def test_read_only_run_directory_for_eval_is_one_line(synth, tmp_path, capsys, mounts):
    run = tmp_path / "run"
    assert main(_args(synth, run, "--step", "0")) == 0
    capsys.readouterr()
    r = subprocess.run(["mount", "--bind", str(run), str(run)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({r.stderr.strip()}); test_full_disk_is_one_line covers the path")
    mounts.append(run)
    r = subprocess.run(["mount", "-o", "remount,bind,ro", str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert main(["eval", "--out", str(run), "--device", "cpu", "--quiet"]) == 2
    assert "Read-only file system" in _one_error_line(capsys, "eval")


# -- 8. nothing silently accepted ---------------------------------------------------------------


def test_unknown_term_weight_names_are_refused(synth, tmp_path, capsys):
    assert main(_args(synth, tmp_path / "d", "--term-weights", "unkd=0.5,pod9=2")) == 2
    err = _one_error_line(capsys, "train")
    assert "pod9" in err and "unkd" in err.split("its terms are")[1]
    assert not (tmp_path / "d" / "checkpoints").exists()


@pytest.mark.parametrize("size", ["0", "-3"])
def test_eval_batch_size_must_be_positive(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--out", str(tmp_path), "--batch-size", size])
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


# -- 9. file modes follow the umask -------------------------------------------------------------


def test_reports_and_checkpoints_respect_the_umask(synth, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train(_cfg(synth, out, step=0))
    finally:
        os.umask(old)
    for name in ["summary.json", "metrics.csv", "miou.png", "config.json", "history.json", "checkpoints/step0.pt"]:
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


# -- 10. checks before any training -------------------------------------------------------------


def _copy_data(synth: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    return data


def test_later_step_without_images_fails_before_training(synth, tmp_path):
    """Remove every training image of the last class: the run fails before step 0 trains."""
    from lskd.data import load_dataset

    data = _copy_data(synth, tmp_path)
    ds = load_dataset(data, "train", "folder")
    keep = [Path(ds.samples[i][0]).stem for i in range(len(ds)) if 4 not in ds.label_classes(i)]
    (data / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(keep) + "\n")
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"step 2 .* has 0 training image"):
        train(_cfg(data, out))
    assert not (out / "checkpoints").exists()


def test_bad_val_label_fails_before_training(synth, tmp_path):
    from PIL import Image

    data = _copy_data(synth, tmp_path)
    val_id = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[3]
    label = data / "SegmentationClass" / f"{val_id}.png"
    arr = __import__("numpy").array(Image.open(label))
    arr[0, 0] = 200
    Image.fromarray(arr).save(label)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"{val_id}\.png.*200"):
        train(_cfg(data, out))
    assert not (out / "checkpoints").exists()


# -- 11. corrupt checkpoints ----------------------------------------------------------------------


def test_flipped_bytes_in_a_checkpoint_are_detected(synth, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(synth, out, step=0))
    ckpt = out / "checkpoints" / "step0.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    ckpt.write_bytes(bytes(raw))
    assert main(["eval", "--out", str(out), "--device", "cpu", "--quiet"]) == 2
    err = _one_error_line(capsys, "eval")
    assert "step0.pt" in err and ("corrupt" in err or "cannot read" in err)
