"""The run directory: its files, its lock, its saved settings and its history.

::

    OUT/config.json           the run's settings and identity (written once, by the first command)
    OUT/.lock                 held by the process that trains or evaluates into OUT
    OUT/checkpoints/step{t}.pt, step{t}-last.pt   (see :mod:`lskd.train.checkpoint`)
    OUT/cache/                per-image class lists of the dataset (lskd.data caches)
    OUT/history.json          per epoch: mean loss per term, total, lr, time (every step trained)
    OUT/train.log             the epoch lines
    OUT/weights/step{t}.json  weight / scheme traces (dynamic weighting, search)
    OUT/summary.json, metrics.csv, miou.png   written when the run has finished

Every path is relative to the directory itself: a run directory may be moved or copied, and
``lskd eval --out DIR`` reads DIR's own checkpoints, whatever ``out`` config.json recorded.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import List, Optional, Union

from .._io import remove_stale_temporaries
from . import report
from .config import RunError, TrainConfig, settings_differences

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["RunDir", "RunLock"]

CONFIG_VERSION = 1


class RunLock:
    """An exclusive lock on a run directory (``OUT/.lock``, ``flock``).

    The kernel releases a ``flock`` when its process dies, so a lock left by a killed run is
    recognised as stale by the next process: it acquires the lock, and :attr:`stale` holds
    what the dead holder had written (its pid, host and start time).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stale: Optional[str] = None
        self._fd: Optional[int] = None

    def acquire(self, what: str) -> "RunLock":
        """Take the lock or raise :class:`RunError` naming the holder. ``what``: the holder's
        description written into the lock file (e.g. ``lskd train``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                raise RunError(
                    f"{self.path.parent} is in use by another process ({holder}); wait for it to finish "
                    f"or choose another --out"
                ) from None
        self.stale = os.read(fd, 4096).decode("utf-8", "replace").strip() or None
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.write(fd, f"{what}, pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file (an empty file means a clean exit) and release the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


class RunDir:
    """The files of one run (see the module docstring)."""

    def __init__(self, out: Union[str, os.PathLike]) -> None:
        self.root = Path(out)
        self.config_path = self.root / "config.json"
        self.ckpt_dir = self.root / "checkpoints"
        self.cache_dir = self.root / "cache"
        self.history_path = self.root / "history.json"
        self.log_path = self.root / "train.log"
        self.weights_dir = self.root / "weights"

    def step_path(self, t: int) -> Path:
        return self.ckpt_dir / f"step{t}.pt"

    def last_path(self, t: int) -> Path:
        return self.ckpt_dir / f"step{t}-last.pt"

    def checkpoints(self) -> List[Path]:
        return sorted(self.ckpt_dir.glob("step*.pt")) if self.ckpt_dir.is_dir() else []

    # -- lock and clean-up --------------------------------------------------------------------
    def lock(self, what: str) -> RunLock:
        """Acquire ``OUT/.lock`` (creating OUT); see :class:`RunLock`."""
        return RunLock(self.root / ".lock").acquire(what)

    def remove_temporaries(self) -> List[Path]:
        """Remove the temporary files that killed writes left (only while holding the lock)."""
        return remove_stale_temporaries(self.root) if self.root.is_dir() else []

    # -- config.json --------------------------------------------------------------------------
    def read_config(self) -> Optional[dict]:
        """The saved ``{"config", "identity", "version"}``, or None when the run has none yet."""
        if not self.config_path.is_file():
            return None
        try:
            saved = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunError(f"{self.config_path} is not valid JSON: {e}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise RunError(f"{self.config_path} is not an lskd run config (no 'config' entry)")
        return saved

    def write_config(self, cfg: TrainConfig, identity: dict) -> None:
        report.write_json(self.config_path, {"config": cfg.to_dict(), "identity": identity, "version": CONFIG_VERSION})

    def check_settings(self, saved: dict, cfg: TrainConfig) -> None:
        """Refuse to continue the run with other result-changing settings (every difference listed)."""
        diffs = settings_differences(saved["config"], cfg)
        if diffs:
            raise RunError(
                f"{self.root} holds a run with other settings; a run keeps the settings it started with:\n  "
                + "\n  ".join(diffs)
                + "\nrepeat the run's settings (see its config.json) or choose another --out"
            )

    # -- history.json -------------------------------------------------------------------------
    def read_history(self) -> List[dict]:
        try:
            entries = json.loads(self.history_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return entries if isinstance(entries, list) else []

    def write_history(self, entries: List[dict]) -> None:
        report.write_json(self.history_path, entries)

    def log_line(self, msg: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")
