"""Loading of the compiled extension ``lskd._C``.

Importing lskd never fails because of the extension: when it is missing, was
built against another torch, or fails to load, a single warning says why and
the "auto" backend falls back to Triton (on CUDA) or the reference.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

__all__ = [
    "load_error",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "has_cpp_autograd",
    "has_cpp_distill_terms",
    "has_cpp_md_masks",
]

_ERROR: Optional[str] = None
_LOADED = False


def _load() -> None:
    global _ERROR, _LOADED
    try:
        info = importlib.import_module("lskd._build_info")
    except ImportError:
        info = None
    if info is not None and info.TORCH_VERSION != torch.__version__:
        _ERROR = (
            f"lskd._C was built against torch {info.TORCH_VERSION}, but torch {torch.__version__} "
            "is installed; rebuild with `pip install --no-build-isolation -e .`"
        )
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
    if not _LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:  # the operator does not exist (an lskd._C older than the sources)
        return False


# Plain booleans, computed once: torch.compile can read them while tracing.
_HAS_CPU = _has_kernel("lskd::pod_forward", "CPU")
_HAS_CUDA = _has_kernel("lskd::pod_forward", "CUDA")
_HAS_CPP_AUTOGRAD = all(
    _has_kernel(f"lskd::{op}", "Autograd") for op in ("pod_forward", "sop_forward", "pod_distill", "sop_distill")
)
_HAS_CPP_MD_MASKS = _has_kernel("lskd::md_masks", "CPU")
_HAS_CPP_DISTILL_TERMS = _has_kernel("lskd::distill_terms", "Autograd")


def has_cpu_kernels() -> bool:
    """True when lskd._C is loaded (its CPU kernels are always built)."""
    return _HAS_CPU


def has_cuda_kernels() -> bool:
    """True when lskd._C was built with its CUDA kernels."""
    return _HAS_CUDA


def has_cpp_autograd() -> bool:
    """True when lskd._C has the C++ autograd kernels and the fused loss ops
    (lskd::pod_distill, lskd::sop_distill; csrc/autograd.cpp)."""
    return _HAS_CPP_AUTOGRAD


def has_cpp_distill_terms() -> bool:
    """True when lskd._C has the several-terms op lskd::distill_terms (csrc/autograd.cpp)."""
    return _HAS_CPP_DISTILL_TERMS


def has_cpp_md_masks() -> bool:
    """True when lskd._C has the one-op MD masks lskd::md_masks (csrc/md_masks.cpp)."""
    return _HAS_CPP_MD_MASKS
