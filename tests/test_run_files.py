"""Files of the run directory: their permissions, stale temporaries of killed writers, and
checkpoint checksums (a flipped byte is reported, never loaded)."""

from __future__ import annotations

import io
import os
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lskd._io as lskd_io
from lskd._io import atomic_open, remove_stale_temporaries
from lskd.train import CheckpointCorrupt, atomic_save, load_checkpoint

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes and signals")

MARK = 1.2345678  # a value whose float32 bytes are easy to find in a file
MARK_BYTES = struct.pack("<f", MARK) * 8


@pytest.fixture
def restore_umask():
    """Let a test change the umask; the old one is restored afterwards."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_open_gives_the_mode_of_a_plain_open(tmp_path, restore_umask, mask, expected):
    os.umask(mask)
    with atomic_open(tmp_path / "summary.json") as f:
        f.write("{}")
    atomic_save({"identity": {}, "model": {}}, tmp_path / "checkpoints" / "step0.pt")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    assert _mode(tmp_path / "summary.json") == expected
    assert _mode(tmp_path / "checkpoints" / "step0.pt") == expected
    assert _mode(tmp_path / "plain.txt") == expected
    assert os.umask(mask) == mask  # atomic_open left the umask as it was


_KILLED_WRITER = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("lskd_io", sys.argv[1])
io_ = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io_)
with io_.atomic_open(sys.argv[2], "wb") as f:
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_write(target: Path) -> None:
    """Write ``target`` with atomic_open in a process that is killed with SIGKILL mid-write."""
    target.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, lskd_io.__file__, str(target)])
    assert r.returncode == -signal.SIGKILL


@posix_only
def test_remove_stale_temporaries_of_killed_writers(tmp_path):
    run = tmp_path / "run"
    _killed_write(run / "summary.json")
    _killed_write(run / "checkpoints" / "step1-last.pt")
    (top,) = [p for p in run.iterdir() if p.is_file()]
    (low,) = [p for p in (run / "checkpoints").iterdir() if p.is_file()]
    assert top.name.startswith(".summary.json.") and low.name.startswith(".step1-last.pt.")
    assert not (run / "summary.json").exists()  # the kill left the target untouched
    keep = ["notes.tmp", ".hidden", ".tmp", "..tmp", ".x.tmp", ".summary.json.tmp", "step1.pt", ".a.b.tmp.bak"]
    for name in keep:
        (run / name).write_text("user file")
        (run / "checkpoints" / name).write_text("user file")
    (run / ".dir.abcdefgh.tmp").mkdir()  # a folder, even with a matching name, stays

    assert remove_stale_temporaries(run, recursive=False) == [top]
    assert low.exists()
    assert remove_stale_temporaries(run) == [low]
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == sorted(["checkpoints", ".dir.abcdefgh.tmp"] + keep + [f"checkpoints/{n}" for n in keep])
    assert remove_stale_temporaries(run) == []


def test_remove_stale_temporaries_matches_the_names_atomic_open_makes(tmp_path, monkeypatch):
    """Whatever temporary name atomic_open makes is recognised; a finished write leaves none."""
    seen = []
    mkstemp = lskd_io.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        seen.append(Path(name))
        return fd, name

    monkeypatch.setattr(lskd_io.tempfile, "mkstemp", spy)
    targets = ["metrics.csv", "step3-last.pt", ".hidden", "a name.tmp", "x"]
    for name in targets:
        with atomic_open(tmp_path / name) as f:
            f.write(name)
    assert len(seen) == len(targets) and not any(p.exists() for p in seen)
    assert remove_stale_temporaries(tmp_path) == []  # nothing left by finished writes
    for p in seen:  # as a killed writer would have left them
        p.write_text("stale")
    assert remove_stale_temporaries(tmp_path) == sorted(seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(targets)


# ---------------------------------------------------------------------------------------------
# checkpoint checksums


def _checkpoint() -> dict:
    """A checkpoint shaped like the trainer's: identity, a model state dict and some floats."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.fill_(MARK)
        conv.bias.copy_(torch.arange(4.0))
    return {
        "identity": {"task": "2-1", "method": "lskd", "backbone": "tiny"},
        "model": conv.state_dict(),
        "classes_per_step": [3, 1],
        "result": {"miou": 0.5, "loss": 1.25},
        "epoch": 3,
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}


def test_checkpoint_round_trips_exactly(tmp_path):
    ckpt = _checkpoint()
    path = atomic_save(ckpt, tmp_path / "step1.pt")
    _assert_same(load_checkpoint(path), ckpt)
    assert torch.load(path, weights_only=False)["format"] == "lskd-checkpoint"  # still a torch file
    assert [p.name for p in tmp_path.iterdir()] == ["step1.pt"]


@pytest.mark.parametrize("name", ["step1.pt", "step2-last.pt"])
def test_flipped_tensor_byte_is_reported(tmp_path, name):
    path = atomic_save(_checkpoint(), tmp_path / name)
    raw = bytearray(path.read_bytes())
    at = raw.find(MARK_BYTES)
    assert at >= 0, "the weight data is stored as raw bytes"
    raw[at + 13] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupt) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert str(path) in msg and "corrupt" in msg and "SHA-256" in msg
    assert "delete" in msg.lower() and "restore" in msg.lower()
    if name == "step2-last.pt":
        assert "retrain" in msg and "step 2" in msg


def test_no_flipped_byte_loads_different_values(tmp_path):
    """Flip every byte of a checkpoint in turn: each either fails with a ValueError or loads the
    very same checkpoint (a byte that torch.load does not read); never different values."""
    ckpt = _checkpoint()
    path = atomic_save(ckpt, tmp_path / "step1.pt")
    good = path.read_bytes()
    bad = tmp_path / "bad.pt"
    corrupt = 0
    for i in range(len(good)):
        raw = bytearray(good)
        raw[i] ^= 0xFF
        bad.write_bytes(bytes(raw))
        try:
            loaded = load_checkpoint(bad)
        except CheckpointCorrupt:
            corrupt += 1
            continue
        except ValueError:
            continue
        _assert_same(loaded, ckpt)
    assert corrupt > 0


def test_old_checkpoints_without_checksum_still_load(tmp_path):
    ckpt = _checkpoint()
    path = tmp_path / "step0.pt"
    torch.save(ckpt, path)  # what atomic_save wrote before checksums
    _assert_same(load_checkpoint(path), ckpt)


def test_unreadable_or_foreign_checkpoints(tmp_path):
    path = atomic_save(_checkpoint(), tmp_path / "step1.pt")
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cannot read checkpoint .*cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    atomic_save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an lskd training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    outer = torch.load(path, weights_only=False)
    buf = io.BytesIO()
    torch.save({**outer, "version": 99}, buf)
    (tmp_path / "future.pt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
