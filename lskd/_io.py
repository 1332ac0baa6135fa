"""Atomic file writing, shared by checkpoints, reports and dataset caches.

:func:`atomic_open` writes ``NAME`` through a temporary file ``.NAME.<random>.tmp`` in the same
folder, which it moves onto ``NAME`` with ``os.replace`` once written and fsynced. An exception
in the writer removes the temporary file; a process that is killed outright (``kill -9``, power
loss) cannot, and leaves it behind -- possibly as large as a checkpoint. In both cases ``NAME``
is the old file or the new one, never half of one. :func:`remove_stale_temporaries` deletes the
leftovers; the owner of a folder calls it while no one else writes there (under the run lock).

Files get the mode a plain ``open()`` would give a new file: ``0o666`` less the umask.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator, List, Union

__all__ = ["atomic_open", "remove_stale_temporaries"]

PathLike = Union[str, os.PathLike]

#: A temporary file of ``NAME`` is ``TEMP_PREFIX + NAME + TEMP_SEPARATOR + <random> + TEMP_SUFFIX``.
TEMP_PREFIX = "."
TEMP_SEPARATOR = "."
TEMP_SUFFIX = ".tmp"
# The random part of tempfile.mkstemp: 8 characters of tempfile._RandomNameSequence.characters.
_TEMP_RANDOM = r"[a-z0-9_]{8}"
_TEMP_NAME = re.compile(
    re.escape(TEMP_PREFIX) + r"(?P<target>.+)" + re.escape(TEMP_SEPARATOR) + _TEMP_RANDOM + re.escape(TEMP_SUFFIX)
)


def current_umask() -> int:
    """The process umask, left unchanged (Linux: read from /proc, so no other thread ever sees
    a changed umask; elsewhere set and immediately restored)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_temporary(name: str) -> bool:
    """Whether ``name`` is the name of a temporary file made by :func:`atomic_open`."""
    return _TEMP_NAME.fullmatch(name) is not None


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    ``path`` is never half-written; an exception removes the temporary file (an ``OSError``
    without a file name, e.g. a full disk, is raised again naming ``path``) (a killed process
    leaves it: see :func:`remove_stale_temporaries`). The new file has the mode ``open()`` would
    give it (``0o666 & ~umask``). ``mode`` is "w" (text, UTF-8 unless given) or "wb".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TEMP_PREFIX}{path.name}{TEMP_SEPARATOR}"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0o600
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # say which file (a full disk)
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


def remove_stale_temporaries(folder: PathLike, recursive: bool = True) -> List[Path]:
    """Delete the temporary files that killed :func:`atomic_open` writers left in ``folder``
    (and in its sub-folders when ``recursive``); return the removed paths, sorted.

    Only regular files named exactly as :func:`atomic_open` names them
    (``.NAME.<8 random characters>.tmp``) are removed; other files (``notes.tmp``, ``.hidden``),
    folders and symbolic links are left alone, and symbolic links to folders are not followed.
    Call it only while holding the folder's lock (the run directory's lock), i.e. when no other
    process can be writing there: the temporary file of a live writer looks just the same.
    """
    removed = []
    for root, dirs, _ in os.walk(folder):
        with os.scandir(root) as entries:
            stale = [Path(e.path) for e in entries if e.is_file(follow_symlinks=False) and _is_temporary(e.name)]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        if not recursive:
            dirs.clear()
    return sorted(removed)
