"""Backend selection, shared by every operator.

Backends:
  "reference"  plain PyTorch (lskd.reference), any device, autograd by PyTorch
  "cpu"        fused C++ kernels of lskd._C (CPU tensors)
  "cuda"       fused CUDA kernels of lskd._C (CUDA tensors)
  "triton"     Triton kernels (lskd.kernels); CUDA tensors, or CPU tensors
               when TRITON_INTERPRET=1 was set before lskd was imported
  "auto"       the fastest available one for the op and the tensors' device
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Callable, Dict, List, Tuple

import torch

from .. import _extension

__all__ = ["BACKENDS", "resolve_backend", "available_backends", "on_triton_load"]

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Preference order of "auto" per op and device type, fastest first, from the
# benchmarks in benches/ (see benches/results/). Unavailable entries are skipped.
AUTO_ORDER: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "pod_distill": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    "sop_distill": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    "md_masks": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    "distill_terms": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    "ce_unkd": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    "pseudo_labels": {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
}

_TRITON_HOOKS: List[Callable[[], None]] = []


def on_triton_load(hook: Callable[[], None]) -> None:
    """Run ``hook`` once the Triton kernels are imported (to register autograd/fakes)."""
    _TRITON_HOOKS.append(hook)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_error() -> str:
    """Import the Triton kernels; return why they are unavailable, or ""."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    try:
        importlib.import_module("lskd.kernels")  # registers every lskd_triton op
    except Exception as exc:  # a broken triton install must not break lskd
        return f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    for hook in _TRITON_HOOKS:
        hook()
    return ""


def _unavailable(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on ``device`` ("" when it can)."""
    if backend == "reference":
        return ""
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        if not _extension.has_cpu_kernels():
            return _extension.load_error() or "lskd._C has no CPU kernels"
        return ""
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        if not _extension.has_cuda_kernels():
            return _extension.load_error() or (
                "lskd._C was built without CUDA kernels (rebuild with a CUDA toolkit or FORCE_CUDA=1)"
            )
        return ""
    if backend == "triton":
        if device.type == "cpu" and not triton_interpret():
            return "backend 'triton' runs on CPU tensors only with TRITON_INTERPRET=1 set before import"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' does not support {device.type} tensors"
        return _triton_error()
    return f"unknown backend {backend!r}"


def _resolve(op: str, backend: str, device: torch.device) -> str:
    if backend == "auto":
        for cand in AUTO_ORDER[op].get(device.type, ("reference",)):
            if not _unavailable(cand, device):
                return cand
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = _unavailable(backend, device)
    if why:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
    return backend


# (op, backend, device) -> the concrete backend. What is available does not
# change once lskd is imported (lskd._C is loaded at import; TRITON_INTERPRET
# must be set before), so a resolution is computed once; failures are not
# cached and raise again on every call.
_RESOLVED: Dict[Tuple[str, str, torch.device], str] = {}


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend to run ``op`` with on ``device``; raise when unavailable."""
    if isinstance(backend, str):
        key = (op, backend, device)
        impl = _RESOLVED.get(key)
        if impl is None:
            impl = _RESOLVED[key] = _resolve(op, backend, device)
        return impl
    return _resolve(op, backend, device)


def available_backends(device: "torch.device | str" = "cpu") -> List[str]:
    """The backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    return [b for b in BACKENDS if not _unavailable(b, device)]
