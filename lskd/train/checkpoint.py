"""Checkpoints: atomic writes, RNG states and the identity check of a run.

Files written by the trainer under ``OUT/checkpoints/``:

* ``step{t}.pt`` -- the model after step ``t`` (``model`` state dict, ``classes_per_step``,
  ``result`` = the step's metrics, ``identity``); the teacher of step ``t + 1`` and what
  ``lskd eval`` and ``--init-from`` read.
* ``step{t}-last.pt`` -- the state after the last completed epoch of step ``t`` (model,
  optimiser, grad scaler, weighting, epoch, iteration, RNG states); removed once ``step{t}.pt``
  is written. ``--resume`` continues from it.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a killed process leaves either the old or the new file, never half of one.

``identity`` = what must match for a checkpoint to continue a run: dataset kind and class
names, task (name and class lists), overlap/disjoint, method, backbone, output stride.
``init_from`` only needs the step-0 part (dataset, classes, task steps, backbone), because step 0
is the same for every incremental method.
"""
from __future__ import annotations

import os
import random

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
]

PathLike = Union[str, os.PathLike]


class CheckpointMismatch(ValueError):
    """A checkpoint that belongs to another run (task, method, dataset, model)."""


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file in the same folder + fsync +
    ``os.replace``). Returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by the trainer; clear errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # corrupt / not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
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
