"""Test session set-up for lskd.

* ``TRITON_INTERPRET=1`` is set when no CUDA GPU is present, before lskd (and
  with it the Triton kernels) is imported, so that the "triton" backend runs
  on CPU tensors under the interpreter.
* Backends are discovered once per session (``lskd.available_backends``) and
  tests that take a ``backend`` argument run against every one of them. A
  backend that CI expects but that is missing is caught by
  ``test_expected_backends`` (LSKD_EXPECT_BACKENDS / LSKD_EXPECT_GPU_BACKENDS),
  never skipped silently.
* ``@pytest.mark.cases(default=K, triton=T)`` on a test that takes ``backend``
  and ``case`` runs K seeded random cases per backend (T for Triton, which is
  slow under the interpreter); ``@pytest.mark.backend_params("a,b", values,
  triton=fewer_values)`` likewise parametrizes (backend, a, b) jointly.
* Every test gets a fresh seed: crc32 of its node id + the run seed. The run
  seed is random unless LSKD_TEST_SEED is set; it is printed in the header and
  with every failure, so ``LSKD_TEST_SEED=<seed> pytest <node id>`` reproduces.
* ``@pytest.mark.gpu`` tests skip without CUDA; ``@pytest.mark.compile``
  marks the (slow) torch.compile tests, which run by default
  (deselect with ``-m "not compile"``).
"""

from __future__ import annotations

import os
import random
import sys
import time
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before lskd imports its Triton kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

import lskd  # noqa: E402
from lskd import _extension  # noqa: E402

_SEED_ENV = os.environ.get("LSKD_TEST_SEED", "").strip()
RUN_SEED = int(_SEED_ENV) if _SEED_ENV else int(time.time() * 1000) % 1_000_000_007

CPU_BACKENDS = lskd.available_backends("cpu")
GPU_BACKENDS = lskd.available_backends("cuda") if HAS_CUDA else []
if os.environ.get("LSKD_GPU_TEST_BACKENDS"):  # e.g. "cuda,triton" to leave the reference out on the GPU
    GPU_BACKENDS = [b for b in GPU_BACKENDS if b in os.environ["LSKD_GPU_TEST_BACKENDS"].split(",")]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "compile: torch.compile / opcheck tests (slow; run by default)")
    config.addinivalue_line("markers", "demo: runs `lskd demo --quick` (about a minute; runs by default)")
    config.addinivalue_line(
        "markers",
        "cases(default, triton): number of seeded random cases per backend for tests taking (backend, case)",
    )
    config.addinivalue_line(
        "markers",
        "backend_params(argnames, default, triton=...): parametrize (backend, *argnames) jointly, "
        "with a smaller list of values for Triton (slow under the interpreter); a list given as a "
        "string names an attribute of the test's class",
    )


def pytest_report_header(config):
    return [
        f"lskd: LSKD_TEST_SEED={RUN_SEED}  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}",
        f"lskd: backends cpu={CPU_BACKENDS} cuda={GPU_BACKENDS if HAS_CUDA else 'no GPU'}",
        f"lskd: extension: {_extension.load_error() or 'lskd._C loaded'}",
    ]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, dict):  # op parameters
        return ",".join(f"{k}={_id(v)}" for k, v in value.items())
    return str(value)


def _marker_values(metafunc, values) -> list:
    """A marker's values, or the name of the test class's attribute that holds them (a shared
    test base whose subclasses supply the values, tests/op_tester.py)."""
    if isinstance(values, str):
        values = getattr(metafunc.cls, values)
    return list(values)


def _backend_ids(backends):
    return [f"backend={b}" for b in backends]


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "backend" in names:
        backends = CPU_BACKENDS
        marker = metafunc.definition.get_closest_marker("cases")
        per_backend = metafunc.definition.get_closest_marker("backend_params")
        if per_backend is not None:
            argnames = [a.strip() for a in per_backend.args[0].split(",")]
            default = _marker_values(metafunc, per_backend.args[1])
            triton = _marker_values(metafunc, per_backend.kwargs.get("triton", default))
            params, ids = [], []
            for b in backends:
                for v in triton if b == "triton" else default:
                    v = v if len(argnames) > 1 else (v,)
                    params.append((b, *v))
                    ids.append("-".join([b] + [_id(x) for x in v]))
            metafunc.parametrize(["backend", *argnames], params, ids=ids)
        elif marker is not None and "case" in names:
            default = marker.kwargs.get("default", marker.args[0] if marker.args else 4)
            triton = marker.kwargs.get("triton", max(1, default // 4))
            params, ids = [], []
            for b in backends:
                for i in range(triton if b == "triton" else default):
                    params.append((b, i))
                    ids.append(f"{b}-{i}")
            metafunc.parametrize(("backend", "case"), params, ids=ids)
        else:
            metafunc.parametrize("backend", backends, ids=_backend_ids(backends))
    if "compiled_backend" in names:  # the backends with raw ops (torch.ops.lskd / torch.ops.lskd_triton)
        backends = [b for b in CPU_BACKENDS if b != "reference"]
        metafunc.parametrize("compiled_backend", backends, ids=_backend_ids(backends))
    if "gpu_backend" in names:
        # Without a GPU the names are still listed so that the gpu tests show up as skipped.
        backends = GPU_BACKENDS if HAS_CUDA else ["reference", "cuda", "triton"]
        metafunc.parametrize("gpu_backend", backends, ids=_backend_ids(backends))
    if "gpu_compiled_backend" in names:  # GPU backends with raw ops
        backends = [b for b in GPU_BACKENDS if b != "reference"] if HAS_CUDA else ["cuda", "triton"]
        metafunc.parametrize("gpu_compiled_backend", backends, ids=_backend_ids(backends))


def _test_seed(nodeid: str) -> int:
    return (zlib.crc32(nodeid.encode()) + RUN_SEED) % (2**31 - 1)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Fresh, reproducible seed per test (torch, random and numpy are seeded with it)."""
    s = _test_seed(request.node.nodeid)
    torch.manual_seed(s)
    random.seed(s)
    try:
        import numpy as np

        np.random.seed(s)
    except ImportError:  # pragma: no cover
        pass
    return s


@pytest.fixture
def rng(seed) -> random.Random:
    """A ``random.Random`` seeded with the test's seed (for shapes and options)."""
    return random.Random(seed)


@pytest.fixture(scope="session")
def cpu_backends():
    return list(CPU_BACKENDS)


@pytest.fixture(scope="session")
def gpu_backends():
    return list(GPU_BACKENDS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(
            (
                "lskd seed",
                f"LSKD_TEST_SEED={RUN_SEED} (test seed {_test_seed(item.nodeid)}); reproduce with\n"
                f"  LSKD_TEST_SEED={RUN_SEED} python -m pytest '{item.nodeid}'",
            )
        )
