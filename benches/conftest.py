"""Benchmark session set-up: device facts recorded once in every result."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import lskd_workload as wl  # noqa: E402


@pytest.fixture(scope="session")
def device_info():
    import torch

    info = {"device": str(wl.device()), "torch": torch.__version__}
    if wl.on_gpu():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["gpu"] = None
        info["cpu_threads"] = torch.get_num_threads()
    info["copy_bandwidth_GBps"] = wl.copy_bandwidth() / 1e9
    return info
