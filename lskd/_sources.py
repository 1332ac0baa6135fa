"""The fingerprint of the C++/CUDA sources that lskd._C is built from.

setup.py records it in lskd/_build_info.py when it builds the extension; lskd._extension
compares it with the sources present (a source checkout or an editable install) and refuses
a stale lskd._C. This module imports nothing of lskd or torch: setup.py loads it by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_hash(csrc: "str | Path") -> Optional[str]:
    """sha256 of the sources under ``csrc`` (paths and contents), or None when there are none."""
    root = Path(csrc)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
