"""Build the CPU emulation of lskd's CUDA kernels (test infrastructure).

The CUDA sources (csrc/cuda/*.cu with csrc/cuda/device_utils.cuh and csrc/*.h) and
the op files (csrc/<op>.cpp: schemas, C++ autograd, fused loss kernels) are compiled
as C++ for the CPU, with tests/cuda_emu/runtime.h force-included (fibers for the
threads of a block, barriers, warp operations, shared memory; see there). A few
textual changes make them host code:

  * the namespace, library and op names ``lskd`` become ``lskd_emu`` (so that
    this library and lskd._C can be loaded together; ``lskd::md_stats`` inside
    md_masks.cu becomes ``lskd_emu::md_stats``, the emulated CUDA kernel);
  * ``TORCH_LIBRARY_IMPL(lskd, CUDA, m)`` registers for the CPU dispatch key, and
    the launchers' ``.is_cuda()`` checks accept CPU tensors;
  * ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
    ``lskd_emu_rt::launch(kernel, grid, block, smem, stream)(args)``;
  * ``extern __shared__ ... smem_raw[]`` becomes the launch's dynamic shared memory.

The schemas are the op files', under ``lskd_emu``. The result is loaded into
``torch.ops.lskd_emu``: pod_forward/backward, sop_forward/backward, md_stats,
md_masks (the CUDA kernels), pod_distill, sop_distill, distill_terms (the C++
autograd and reduction of the op files around them), plus
``emu_set_device(sms, smem_optin)``, ``emu_set_float64_ranks(rule)`` (md_masks'
quantile rank rule: -1 as this torch, 0 float32, 1 float64), ``emu_launches()``
(launches so far) and ``emu_kernels()`` (the addresses of the kernels launched
since the last call: which code path a call took).

    python tests/cuda_emu/build.py      # build (about 2-3 minutes on 2 cores) and load
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
BUILD = ROOT / "build" / "cuda_emu"

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;(){}]*>)?)<<<(.+?)>>>\(", re.S)
_DYN_SMEM = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char (\w+)\[\];")


def transform(text: str, name: str) -> str:
    """The host-code version of one CUDA/C++ source of lskd (see the module docstring)."""
    out = re.sub(r"\blskd\b", "lskd_emu", text)
    out = out.replace("TORCH_LIBRARY_IMPL(lskd_emu, CUDA, m)", "TORCH_LIBRARY_IMPL(lskd_emu, CPU, m)")
    out = out.replace(".is_cuda()", ".is_cpu()")
    out, n_smem = _DYN_SMEM.subn(r"unsigned char* \1 = ::lskd_emu_rt::dynamic_smem();", out)
    out, n_launch = _LAUNCH.subn(r"::lskd_emu_rt::launch(\1, \2)(", out)
    if "<<<" in out or "extern __shared__" in out:
        raise RuntimeError(f"cuda emulation: {name}: a kernel launch or dynamic shared memory was not converted")
    return out


_EXTRA = r"""
#include <torch/library.h>

#include "md_masks.h"

TORCH_LIBRARY(lskd_emu, m) {
  m.def("emu_set_device(int sms, int smem_optin) -> ()");
  m.def("emu_set_float64_ranks(int rule) -> ()");
  m.def("emu_launches() -> int");
  m.def("emu_kernels() -> int[]");
}

namespace {
void emu_set_device(int64_t sms, int64_t smem_optin) {
  ::lskd_emu_rt::device().sms = static_cast<int>(sms);
  ::lskd_emu_rt::device().smem_optin = static_cast<int>(smem_optin);
  ::lskd_emu_rt::device().func_max_dyn_smem.clear();
}
// md_masks' rank rule is the op file's (csrc/md_masks.cpp), as lskd._C._set_quantile_rank_rule sets it.
void emu_set_float64_ranks(int64_t rule) { ::lskd_emu::set_quantile_rank_rule(static_cast<int>(rule)); }
int64_t emu_launches() { return ::lskd_emu_rt::device().launches; }
// The addresses of the kernels launched since the last call.
std::vector<int64_t> emu_kernels() {
  std::vector<int64_t> out;
  out.swap(::lskd_emu_rt::device().kernels);
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(lskd_emu, CompositeExplicitAutograd, m) {
  m.impl("emu_set_device", &emu_set_device);
  m.impl("emu_set_float64_ranks", &emu_set_float64_ranks);
  m.impl("emu_launches", &emu_launches);
  m.impl("emu_kernels", &emu_kernels);
}
"""


def sources() -> list:
    """Write the converted sources into build/cuda_emu/src; return the files to compile."""
    src = BUILD / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = []

    def write(path: Path, text: str) -> Path:
        if not path.exists() or path.read_text() != text:  # keep mtimes: ninja rebuilds what changed
            path.write_text(text)
        return path

    for h in sorted(CSRC.glob("*.h")) + [CSRC / "cuda" / "device_utils.cuh"]:
        write(src / h.name, transform(h.read_text(), h.name))
    for cu in sorted((CSRC / "cuda").glob("*.cu")):
        files.append(write(src / (cu.stem + "_cu.cpp"), transform(cu.read_text(), cu.name)))
    # The op files (not csrc/cpu: the emulated CUDA kernels take the CPU dispatch key), less the
    # Python module's entry point.
    for cpp in sorted(CSRC.glob("*.cpp")):
        if cpp.name != "extension.cpp":
            files.append(write(src / cpp.name, transform(cpp.read_text(), cpp.name)))
    files.append(write(src / "emu_ops.cpp", _EXTRA))
    return files


def load(verbose: bool = False):
    """Compile (when sources changed) and load the emulation into torch.ops.lskd_emu."""
    import torch
    from torch.utils import cpp_extension

    if hasattr(torch.ops.lskd_emu, "emu_launches"):  # already loaded in this process
        return torch.ops.lskd_emu
    files = sources()
    build_dir = BUILD / "obj"
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = [
        "-O1",
        "-include",
        str(HERE / "runtime.h"),
        "-DLSKD_WITH_CUDA",
        "-DLSKD_CUDA_EMULATION",
        "-ffp-contract=off",
        "-fvisibility=hidden",
        "-Wno-unknown-pragmas",
        "-Wno-unused-variable",
    ]
    cpp_extension.load(
        name="lskd_cuda_emu",
        sources=[str(f) for f in files],
        extra_cflags=flags,
        extra_include_paths=[str(HERE / "include"), str(BUILD / "src"), str(CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.lskd_emu


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", "2")
    ops = load(verbose="-v" in sys.argv)
    print("loaded:", ops, "launches so far:", ops.emu_launches())
