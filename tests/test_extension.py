"""The compiled extension and the backends the installation offers.

* test_expected_backends: CI names the backends that must be there
  (LSKD_EXPECT_BACKENDS on CPU, LSKD_EXPECT_GPU_BACKENDS on CUDA); a missing
  one fails here with the reason, instead of its tests silently not running.
* Fallback: importing a copy of lskd whose lskd._C is missing, broken, built
  against another torch or built from other sources than those next to it
  (stale) warns once with the reason, and "auto" uses the reference. Each case
  runs in a subprocess on a copy of the package in tmp_path (the repository is
  never modified).
* The Triton ops have the schemas of the C++ ops of the same name.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lskd
from lskd import _extension
from lskd.ops._backends import BACKENDS, _triton_error, _unavailable

PKG = Path(lskd.__file__).resolve().parent
ROOT = PKG.parent


def _expected(var: str):
    names = [b.strip() for b in os.environ.get(var, "").split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    assert not unknown, f"{var} names unknown backends {unknown}; known: {BACKENDS}"
    return names


def _check_expected(var: str, device: str) -> None:
    expected = _expected(var)
    available = lskd.available_backends(device)
    missing = {b: _unavailable(b, torch.device(device)) for b in expected if b not in available}
    assert not missing, f"{var}={','.join(expected)}: backends missing on {device}: {missing} (available: {available})"


def test_expected_backends():
    """Fails when LSKD_EXPECT_BACKENDS (e.g. "reference,cpu,triton") names a backend unavailable on CPU."""
    _check_expected("LSKD_EXPECT_BACKENDS", "cpu")
    assert "reference" in lskd.available_backends("cpu")


@pytest.mark.gpu
def test_expected_gpu_backends():
    """Fails when LSKD_EXPECT_GPU_BACKENDS (e.g. "cuda,triton") names a backend unavailable on CUDA."""
    _check_expected("LSKD_EXPECT_GPU_BACKENDS", "cuda")
    assert "reference" in lskd.available_backends("cuda")


def test_extension_state_is_consistent():
    error = _extension.load_error()
    cpu = lskd.available_backends("cpu")
    if error is None:
        assert _extension.has_cpu_kernels() and "cpu" in cpu
    else:
        assert not _extension.has_cpu_kernels() and not _extension.has_cuda_kernels()
        assert "cpu" not in cpu
        with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable"):
            lskd.pod_distill(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), backend="cpu")


# --------------------------------------------------------------------------- fallback in a subprocess

PROBE = r"""
import json, sys, warnings
# An editable install resolves lskd's submodules (lskd._C too) in the repository:
# drop its finder so that only the copy on PYTHONPATH is seen.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    import lskd
    import lskd.ops, lskd.nn, lskd._extension, lskd.ops._backends
    import importlib
    importlib.reload(lskd.ops)  # re-importing parts of lskd must not warn again
import torch
from lskd.ops._backends import resolve_backend
s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
res = {
    "file": lskd.__file__,
    "warnings": [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)],
    "load_error": lskd._extension.load_error(),
    "auto": {op: resolve_backend(op, "auto", torch.device("cpu")) for op in ("pod_distill", "sop_distill", "md_masks")},
    "available": lskd.available_backends("cpu"),
    "c_imported": "lskd._C" in sys.modules,
    "pod_ok": abs(lskd.pod_distill(s, t).item() - lskd.reference.pod_distances(s, t).mean().item()) < 1e-4,
    "sop_ok": abs(
        lskd.sop_distill(s, t, groups=3).item() - lskd.reference.sop_distances(s, t, groups=3).mean().item()
    ) < 1e-4,
}
try:
    lskd.pod_distill(s, t, backend="cpu")
    res["cpu_error"] = None
except RuntimeError as exc:
    res["cpu_error"] = str(exc)
print("PROBE" + json.dumps(res))
"""


def _so_files(pkg: Path):
    return [p for p in pkg.iterdir() if p.name.startswith("_C.") and p.suffix in (".so", ".pyd")]


@pytest.fixture
def pkg_copy(tmp_path):
    """A copy of the lskd package in tmp_path/site (sources, _C and _build_info included when present)."""
    site = tmp_path / "site"
    shutil.copytree(PKG, site / "lskd", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _probe(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    env["TRITON_INTERPRET"] = "0"  # no Triton on CPU: "auto" has only cpu and reference
    env.pop("LSKD_TEST_SEED", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=site.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE")][-1]
    res = json.loads(line[len("PROBE") :])
    assert Path(res["file"]).resolve().is_relative_to(site.resolve()), f"imported {res['file']}, not the copy"
    return res


def _assert_fallback(res: dict, reason: str) -> None:
    lskd_warnings = [w for w in res["warnings"] if "lskd._C" in w]
    assert len(lskd_warnings) == 1, res["warnings"]
    assert reason in lskd_warnings[0], lskd_warnings[0]
    assert "backend='auto' uses Triton or the reference" in lskd_warnings[0]
    assert reason in res["load_error"]
    assert res["auto"] == {"pod_distill": "reference", "sop_distill": "reference", "md_masks": "reference"}
    assert res["available"] == ["reference"]
    assert res["pod_ok"] and res["sop_ok"]
    assert res["cpu_error"] is not None and "backend 'cpu' is unavailable" in res["cpu_error"]
    assert reason in res["cpu_error"]


def test_fallback_when_extension_is_missing(pkg_copy):
    for p in _so_files(pkg_copy / "lskd"):
        p.unlink()
    (pkg_copy / "lskd" / "_build_info.py").unlink(missing_ok=True)
    res = _probe(pkg_copy)
    _assert_fallback(res, "lskd._C could not be loaded")
    assert "No module named 'lskd._C'" in res["load_error"]
    assert not res["c_imported"]


def test_fallback_when_built_for_another_torch(pkg_copy):
    (pkg_copy / "lskd" / "_build_info.py").write_text('TORCH_VERSION = "1.0.0+fake"\nWITH_CUDA = False\n')
    res = _probe(pkg_copy)
    _assert_fallback(res, f"lskd._C was built against torch 1.0.0+fake, but torch {torch.__version__} is installed")
    assert not res["c_imported"], "a mismatched lskd._C must not even be loaded"


def test_fallback_when_extension_is_broken(pkg_copy):
    for p in _so_files(pkg_copy / "lskd"):
        p.unlink()
    (pkg_copy / "lskd" / "_build_info.py").unlink(missing_ok=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (pkg_copy / "lskd" / f"_C{suffix}").write_bytes(b"this is not a shared library\n" * 10)
    res = _probe(pkg_copy)
    _assert_fallback(res, "lskd._C could not be loaded")
    assert not res["c_imported"]


def test_copy_with_working_extension_has_no_warning(pkg_copy):
    """Control for the fallback tests: the unmodified copy loads lskd._C like the installation does."""
    if _extension.load_error() is not None:
        pytest.skip(f"lskd._C is not loaded in this installation: {_extension.load_error()}")
    res = _probe(pkg_copy)
    assert [w for w in res["warnings"] if "lskd._C" in w] == []
    assert res["load_error"] is None and res["c_imported"]
    assert res["auto"]["pod_distill"] == "cpu" and "cpu" in res["available"]
    assert res["cpu_error"] is None and res["pod_ok"] and res["sop_ok"]


def test_stale_extension_is_refused(pkg_copy):
    """With sources next to the package (a checkout), lskd._C loads only when it was built from them."""
    if _extension.load_error() is not None:
        pytest.skip(f"lskd._C is not loaded in this installation: {_extension.load_error()}")
    shutil.copytree(ROOT / "csrc", pkg_copy / "csrc")
    (pkg_copy / "setup.py").write_text("")
    res = _probe(pkg_copy)
    assert [w for w in res["warnings"] if "lskd._C" in w] == [] and res["c_imported"]
    op_file = pkg_copy / "csrc" / "pod_distill.cpp"
    op_file.write_text(op_file.read_text() + "// an edit after the build\n")
    res = _probe(pkg_copy)
    _assert_fallback(res, "lskd._C is stale")
    assert "rebuild with `make build`" in res["load_error"]
    assert not res["c_imported"], "a stale lskd._C must not even be loaded"


# --------------------------------------------------------------------------- schemas


def test_triton_schemas_are_the_cpp_ones():
    """Every lskd_triton op (kernels/<op>.py) has the schema of the lskd op of that name
    (csrc/<op>.cpp) but for the namespace: a Triton schema that drifts from the C++ one fails here."""
    if _extension.load_error() is not None:
        pytest.skip(f"lskd._C is not loaded in this installation: {_extension.load_error()}")
    if _triton_error():
        pytest.skip(f"no Triton backend: {_triton_error()}")
    names = sorted({n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lskd_triton::")})
    assert {"pod_forward", "pod_backward", "sop_forward", "sop_backward", "md_stats"} <= set(names)
    for name in names:
        triton_schema = str(getattr(torch.ops.lskd_triton, name).default._schema)
        cpp_schema = str(getattr(torch.ops.lskd, name).default._schema)
        assert triton_schema.replace("lskd_triton::", "lskd::", 1) == cpp_schema, name
