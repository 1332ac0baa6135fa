"""Checkpoints: atomic writes, RNG states and the identity check of a run.

Files written by the trainer under ``OUT/checkpoints/``:

* ``step{t}.pt`` -- the model after step ``t`` (``model`` state dict, ``classes_per_step``,
  ``result`` = the step's metrics, ``identity``); the teacher of step ``t + 1`` and what
  ``lskd eval`` and ``--init-from`` read.
* ``step{t}-last.pt`` -- the state after the last completed epoch of step ``t`` (model,
  optimiser, grad scaler, weighting, epoch, iteration, RNG states); removed once ``step{t}.pt``
  is written. ``--resume`` continues from it.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a killed process leaves either the old or the new file, never half of one
(see :mod:`lskd._io`).

File format: a ``torch.save`` file holding ``{"format": "lskd-checkpoint", "version": 1,
"sha256": DIGEST, "payload": BYTES}``, where ``BYTES`` is the ``torch.save`` of the checkpoint
dict and ``DIGEST`` the SHA-256 (hex) of ``BYTES``. :func:`load_checkpoint` verifies the digest
before it unpickles the payload, so a file changed after it was written (a flipped bit on disk,
a damaged copy) raises :class:`CheckpointCorrupt` instead of silently loading other weights.
A file holding the bare checkpoint dict (no checksum) loads unverified, so that checkpoints
written without the digest stay usable.

``identity`` = what must match for a checkpoint to continue a run: dataset kind and class
names, task (name and class lists), overlap/disjoint, method, backbone, output stride.
``init_from`` only needs the step-0 part (dataset, classes, task steps, backbone), because step 0
is the same for every incremental method.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch

from .._io import atomic_open

__all__ = [
    "atomic_save",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "check_identity",
    "CheckpointMismatch",
    "CheckpointCorrupt",
]

PathLike = Union[str, os.PathLike]

FORMAT = "lskd-checkpoint"
VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another run (task, method, dataset, model)."""


class CheckpointCorrupt(ValueError):
    """A checkpoint whose bytes changed after it was written (its SHA-256 does not match)."""


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` with its SHA-256 (see the module docstring) to ``path`` atomically
    (temporary file in the same folder + fsync + ``os.replace``). Returns the path."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    del buf
    wrapper = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    with atomic_open(path, "wb") as f:
        try:
            torch.save(wrapper, f, pickle_protocol=4)  # protocol 4 stores the bytes as they are
        except RuntimeError as e:  # torch's zip writer hides the OSError (a full disk) behind its own
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
    return path


def _corrupt_message(path: Path, expected: str, found: str) -> str:
    """What :class:`CheckpointCorrupt` says: which file, the digests, and what to do."""
    msg = (
        f"checkpoint {path} is corrupt: SHA-256 expected {expected}, found {found} (the file changed "
        "after it was written: a disk or copy error). Delete it or restore it from a good copy"
    )
    last = re.fullmatch(r"step(\d+)-last\.pt", path.name)
    if last:
        msg += f"; it only holds unfinished step {last.group(1)}: remove it to retrain that step from its start"
    return msg


def _unwrap(wrapper: Dict[str, Any], path: Path, map_location: Union[str, torch.device]) -> Any:
    """The checkpoint inside a file written by :func:`atomic_save`, after checking its SHA-256."""
    if wrapper.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {path} has unknown format version {wrapper.get('version')!r} (expected {VERSION})"
        )
    payload, expected = wrapper.get("payload"), wrapper.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(expected, str):
        raise CheckpointCorrupt(f"checkpoint {path} is corrupt: no payload or SHA-256; delete it or restore it")
    found = hashlib.sha256(payload).hexdigest()
    if found != expected:
        raise CheckpointCorrupt(_corrupt_message(path, expected, found))
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as e:  # intact, yet unreadable (e.g. written by a newer torch)
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by the trainer; clear errors for a missing, unreadable or corrupt
    file (:class:`CheckpointCorrupt` when its SHA-256 does not match). A bare checkpoint dict
    without a checksum loads unverified."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt / not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        ckpt = _unwrap(ckpt, path, map_location)
    if not isinstance(ckpt, dict) or "identity" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not an lskd training checkpoint (no 'identity'/'model' entries)")
    return ckpt


def rng_state() -> Dict[str, Any]:
    """The states of Python's ``random``, numpy's global RNG, torch's CPU RNG and every CUDA RNG."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` returned (missing parts are left alone)."""
    if not state:
        return
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def check_identity(
    saved: Dict[str, Any],
    expected: Dict[str, Any],
    keys: Iterable[str],
    where: PathLike,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointMismatch` naming every differing key of ``keys``.

    Args:
        saved: the checkpoint's ``identity``.
        expected: this run's identity.
        keys: which entries must agree.
        where: the checkpoint path (for the message).
        hint: appended to the message (e.g. "use a new --out").
    """
    diffs = []
    for k in keys:
        if saved.get(k) != expected.get(k):
            diffs.append(f"{k}: checkpoint has {saved.get(k)!r}, this run has {expected.get(k)!r}")
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {where} belongs to another run:\n  " + "\n  ".join(diffs) + (f"\n{hint}" if hint else "")
        )
