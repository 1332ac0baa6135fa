"""Triton backend of lskd (installed as ``lskd.kernels``).

Importing the submodules registers the custom ops ``lskd_triton::pod_forward``,
``pod_backward``, ``sop_forward``, ``sop_backward``, ``md_stats``, ``ce_unkd_forward`` and
``pseudo_labels``, with the schemas of the C++ ops of those names (csrc/<op>.cpp; tests/test_extension.py
checks that they agree). Fake kernels and autograd are registered in ``lskd/ops/``.
Import this package only where triton is importable.
"""
from . import ce_unkd, md_stats, pod_distill, pseudo_labels, sop_distill  # noqa: F401  (registrations)

__all__ = ["pod_distill", "sop_distill", "md_stats", "ce_unkd", "pseudo_labels"]
