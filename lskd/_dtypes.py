"""The accumulation dtype, one rule for every backend, the reference and the tests."""

from __future__ import annotations

import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and output) dtype: float64 for float64 inputs, float32 for everything else.

    As ``acc_t`` / ``acc_scalar_type`` of the C++ and CUDA kernels (csrc/common.h).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
