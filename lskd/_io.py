"""Atomic file writing, shared by checkpoints, reports and dataset caches."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["atomic_open"]


@contextlib.contextmanager
def atomic_open(path: Union[str, os.PathLike], mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    A crash or an exception leaves ``path`` as it was (never half-written) and no
    temporary file behind. ``mode`` is "w" (text, UTF-8 unless given) or "wb".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
