"""Build of lskd's extension lskd._C (the package metadata is in pyproject.toml).

lskd._C always holds the op files (csrc/<op>.cpp: schemas, C++ autograd, fused
loss ops) and the C++ CPU kernels (csrc/cpu/*.cpp, OpenMP).
The CUDA kernels (csrc/cuda/*.cu) are added when a CUDA build of torch and
nvcc are found, or when FORCE_CUDA=1 (which also works without a GPU, e.g. in
CI). Environment:

  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU
  LSKD_NO_CUDA=1          never build the CUDA kernels
  LSKD_NO_EXTENSION=1     build no extension at all (pure Python, reference backend)
  CUDA_HOME               the CUDA toolkit (default: /usr/local/cuda when present)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: 9.0, Hopper)
  MAX_JOBS                parallel compile jobs (ninja)

Install with ``pip install --no-build-isolation .`` so that the extension is
built against the torch you already have.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"lskd setup: {msg}", file=sys.stderr)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_cuda_home() -> str | None:
    """The CUDA toolkit. A `nvcc` wrapper on PATH can mislead torch's guess."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isdir(home):
        return home
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _sources(folder: str, pattern: str) -> list:
    """csrc/<folder>/<pattern> (csrc/<pattern> for folder ""), relative to the project root, sorted."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", folder, pattern)))


def _extensions():
    if _truthy("LSKD_NO_EXTENSION"):
        _say("LSKD_NO_EXTENSION=1: no compiled extension; the reference backend will be used")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable: install torch first, then `pip install --no-build-isolation .`")
        raise

    want_cuda = False
    cuda_home = None
    if not _truthy("LSKD_NO_CUDA"):
        cuda_home = _find_cuda_home()
        if torch.version.cuda is None:
            reason = "this torch is a CPU build"
        elif cuda_home is None:
            reason = "no CUDA toolkit found (set CUDA_HOME)"
        else:
            reason = ""
        if _truthy("FORCE_CUDA"):
            if reason:
                raise RuntimeError(f"FORCE_CUDA=1 but {reason}")
            want_cuda = True
        elif not reason and torch.cuda.is_available():
            want_cuda = True
        else:
            _say(f"building without CUDA kernels ({reason or 'no GPU visible; FORCE_CUDA=1 builds them anyway'})")

    if want_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = _sources("", "*.cpp") + _sources("cpu", "*.cpp")  # csrc/<op>.cpp: schemas, autograd, fused ops
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros: list = []
    extra_link = ["-fopenmp"]
    if want_cuda:
        sources += _sources("cuda", "*.cu")
        # cusparse.h / cublas_v2.h live in the pip CUDA wheels, not in every toolkit.
        for sp in sys.path:
            inc = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                include_dirs.append(inc)
                break
        define_macros.append(("LSKD_WITH_CUDA", None))
        _say(
            f"building CUDA kernels with CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        ext = CUDAExtension(
            "lskd._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++20"]},
            extra_link_args=extra_link,
        )
    else:
        ext = CppExtension(
            "lskd._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    _write_build_info(torch.__version__, want_cuda)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _source_hash():
    """The fingerprint of csrc/ (lskd/_sources.py, loaded by path: lskd itself is not importable here)."""
    spec = importlib.util.spec_from_file_location("_lskd_sources", os.path.join(ROOT, "lskd", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(os.path.join(ROOT, "csrc"))


def _write_build_info(torch_version: str, with_cuda: bool) -> None:
    """Record the torch and the sources the extension is built from; lskd checks both at import."""
    path = os.path.join(ROOT, "lskd", "_build_info.py")
    text = (
        '"""Written by setup.py: the torch and the sources (csrc/) that lskd._C was built from."""\n'
        f"TORCH_VERSION = {torch_version!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"SOURCE_HASH = {_source_hash()!r}\n"
    )
    with open(path, "w") as fh:
        fh.write(text)


ext_modules, cmdclass = _extensions()

# The metadata, dependencies and the console script are in pyproject.toml; this file builds
# the extension only (as torchvision and flash-attention do).
setup(ext_modules=ext_modules, cmdclass=cmdclass)
