"""Loading of the compiled extension ``lskd._C``.

Importing lskd never fails because of the extension: when it is missing, was
built against another torch, was built from other sources than those of this
checkout (a stale build), or fails to load, a single warning says why and the
"auto" backend falls back to Triton (on CUDA) or the reference.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Optional

import torch

from ._sources import source_hash

__all__ = ["load_error", "has_cpu_kernels", "has_cuda_kernels"]

_ERROR: Optional[str] = None
_LOADED = False
_REBUILD = "rebuild with `make build` or `pip install --no-build-isolation -e .`"


def _checkout_sources() -> Optional[Path]:
    """csrc/ of the source checkout lskd is imported from (an editable install), if any."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return root / "csrc"
    return None


def _stale_reason(info) -> Optional[str]:
    """Why the lskd._C next to this checkout's sources does not match them, or None."""
    csrc = _checkout_sources()
    if csrc is None:  # an installed package: its _C was built from the sources it shipped with
        return None
    built = getattr(info, "SOURCE_HASH", None)
    if built is not None and built == source_hash(csrc):
        return None
    return f"lskd._C is stale: it was built from other sources than those in {csrc}; {_REBUILD}"


def _load() -> None:
    global _ERROR, _LOADED
    try:
        info = importlib.import_module("lskd._build_info")
    except ImportError:
        info = None
    if info is not None and info.TORCH_VERSION != torch.__version__:
        _ERROR = (
            f"lskd._C was built against torch {info.TORCH_VERSION}, but torch {torch.__version__} "
            f"is installed; {_REBUILD}"
        )
        return
    stale = _stale_reason(info)
    if stale is not None:
        _ERROR = stale
        return
    try:
        importlib.import_module("lskd._C")
    except (ImportError, OSError) as exc:  # missing file, undefined symbols, ...
        _ERROR = f"lskd._C could not be loaded ({exc}); build it with `pip install --no-build-isolation -e .`"
        return
    _LOADED = True


_load()
if _ERROR is not None:
    warnings.warn(
        f"{_ERROR}. The fused CPU/CUDA kernels are unavailable; backend='auto' uses Triton or the reference.",
        RuntimeWarning,
        stacklevel=2,
    )


def load_error() -> Optional[str]:
    """Why the compiled extension is unavailable, or None when it is loaded."""
    return _ERROR


def _has_kernel(op: str, key: str) -> bool:
    return _LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


# Plain booleans, computed once: torch.compile can read them while tracing.
_HAS_CPU = _has_kernel("lskd::pod_forward", "CPU")
_HAS_CUDA = _has_kernel("lskd::pod_forward", "CUDA")


def has_cpu_kernels() -> bool:
    """True when lskd._C is loaded (its CPU kernels are always built)."""
    return _HAS_CPU


def has_cuda_kernels() -> bool:
    """True when lskd._C was built with its CUDA kernels."""
    return _HAS_CUDA
