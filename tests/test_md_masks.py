"""md_masks / md_statistics / batched_quantile.

* md_statistics of every backend against the float64 reference (values).
* md_masks of every backend equals the released per-image computation
  (lskd.reference.md_masks, torch.quantile) exactly, on features whose
  statistics are well separated or exactly tied (integer-valued features:
  every dot product and channel sum is exact, duplicates are bitwise equal).
* batched_quantile equals torch.quantile bitwise.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    DTYPES_TRITON,
    F64,
    check_masks_match_composite,
    check_md_masks_parity,
    check_md_masks_ties_and_nan,
    check_rank_rule_case,
    dtype_id,
    integer_features,
    labels_for,
    md_labels,
    stat_inputs,
)

import lskd
from lskd import reference
from lskd._dtypes import acc_dtype
from lskd.ops import batched_quantile, md_statistics

SCENARIOS = ["mixed", "all_background", "all_old", "all_new", "ignore", "all_ignore", "o_covers_all", "per_image"]
FEATURE_KINDS = ["prototypes", "constant", "distinct"]


# --------------------------------------------------------------------------- md_statistics


@pytest.mark.backend_params(
    "dtype,layout",
    [(d, lay) for d in DTYPES for lay in ("contiguous", "channels_last")]
    + [(torch.float32, "strided"), (F64, "transposed")],
    triton=[(d, "contiguous") for d in DTYPES_TRITON] + [(torch.bfloat16, "channels_last")],
)
def test_statistics_match_reference(backend, dtype, layout):
    shape = (2, 37, 9, 11) if backend != "triton" else (2, 19, 5, 7)
    a, cb, dn = stat_inputs(shape, dtype, layout)
    got = md_statistics(a, cb, dn, backend=backend)
    exp = reference.md_statistics(a.double(), cb.double(), dn.double())
    acc = acc_dtype(dtype)
    tol = 1e-12 if dtype == F64 else 2e-6
    for name, g, e in zip(("cos_bg", "cos_new", "gap_bg", "gap_new"), got, exp):
        assert g.dtype == acc and g.shape == e.shape, (name, g.dtype, g.shape)
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(g.double(), e, rtol=tol * 10, atol=tol * scale, msg=name)
    assert torch.equal(got[1][:, 0, 0], torch.zeros_like(got[1][:, 0, 0]))  # zero vectors give cos 0


def test_statistics_deterministic(backend):
    a, cb, dn = stat_inputs((2, 19, 8, 9), torch.float32, "channels_last")
    first = md_statistics(a, cb, dn, backend=backend)
    second = md_statistics(a, cb, dn, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_statistics_ignore_requires_grad(backend):
    a, cb, dn = stat_inputs((1, 5, 4, 4), torch.float32)
    out = md_statistics(a.requires_grad_(True), cb, dn, backend=backend)
    assert not any(o.requires_grad for o in out)


# --------------------------------------------------------------------------- md_masks parity


@pytest.mark.backend_params(
    "scenario,kind",
    [(s, k) for s in SCENARIOS for k in FEATURE_KINDS],
    triton=[(s, k) for s, k in zip(SCENARIOS, FEATURE_KINDS * 3)],
)
def test_masks_match_release(backend, scenario, kind, rng):
    sm, cm = check_md_masks_parity(backend, rng, scenario, kind, torch.float32)
    if scenario == "all_new" or scenario == "all_ignore":  # rho_old = 0: Q = min, every value >= it
        assert sm.all() and cm.all()


@pytest.mark.backend_params("dtype", (F64, torch.bfloat16, torch.float16), triton=(torch.bfloat16,))
def test_masks_match_release_dtypes(backend, dtype, rng):
    check_md_masks_parity(backend, rng, "per_image", "prototypes", dtype)
    check_md_masks_parity(backend, rng, "ignore", "distinct", dtype)


@pytest.mark.parametrize("case", range(6))
def test_masks_reference_backend_random_features(case, rng):
    """Same statistics (reference backend): the batched quantiles decide exactly as torch.quantile."""
    n = rng.randint(1, 3)
    c, h, w = rng.randint(1, 40), rng.randint(1, 20), rng.randint(1, 20)
    dtype = rng.choice([torch.float32, F64])
    a, cb, dn = stat_inputs((n, c, h, w), dtype)
    labels, old = labels_for(rng, rng.choice(SCENARIOS), n, rng.randint(1, 40), rng.randint(1, 40))
    sm, cm = lskd.md_masks(a, cb, dn, labels, old, backend="reference")
    esm, ecm = reference.md_masks(a, cb, dn, labels, old)
    assert torch.equal(sm, esm) and torch.equal(cm, ecm)


def test_labels_integer_dtypes_and_resolution(backend, rng):
    n, c, h, w = 2, 6, 5, 7
    a, cb, dn = integer_features(rng, (n, c, h, w), "prototypes", torch.float32)
    labels, old = labels_for(rng, "ignore", n, 4 * h, 4 * w)
    ref = lskd.md_masks(a, cb, dn, labels, old, backend=backend)
    for dt in (torch.int32, torch.int16, torch.uint8):
        got = lskd.md_masks(a, cb, dn, labels.to(dt), old, backend=backend)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), dt
    noncontig = labels.transpose(1, 2).contiguous().transpose(1, 2)
    got = lskd.md_masks(a, cb, dn, noncontig, old, backend=backend)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_module_matches_function(backend, rng):
    n, c, h, w = 2, 6, 5, 7
    a, cb, dn = stat_inputs((n, c, h, w), torch.float32)
    labels, old = labels_for(rng, "mixed", n, h, w)
    mod = lskd.nn.MDMasks(backend=backend)
    got, exp = mod(a, cb, dn, labels, old), lskd.md_masks(a, cb, dn, labels, old, backend=backend)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
    labels[0, 0, 0] = 7
    got = lskd.nn.MDMasks(ignore_index=7, backend=backend)(a, cb, dn, labels, old)
    exp = lskd.md_masks(a, cb, dn, labels, old, ignore_index=7, backend=backend)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


# --------------------------------------------------------------------------- the CPU kernel of lskd::md_masks

needs_c = pytest.mark.skipif(not lskd._extension.has_cpu_kernels(), reason="lskd._C not loaded")


def _set_rank_rule(rule):
    lskd._C._set_quantile_rank_rule(-1 if rule is None else int(rule))


def _check_cpu_kernel(a, cb, dn, labels, old=4, ignore=255):
    """lskd::md_masks on the CPU == the rule on the same statistics, bit for bit, under this torch's
    quantile rank rule and both rules."""
    stats = md_statistics(a, cb, dn, backend="cpu")
    return check_masks_match_composite(torch.ops.lskd.md_masks, stats, a, cb, dn, labels, old, ignore, _set_rank_rule)


CPU_KERNEL_CASES = [
    ((2, 16, 16, 16), torch.float32, "contiguous"),
    ((3, 19, 13, 11), torch.bfloat16, "channels_last"),
    ((2, 7, 9, 5), F64, "contiguous"),
    ((1, 40, 48, 48), torch.float32, "channels_last"),
    ((4, 6, 1, 67), torch.float16, "contiguous"),
    ((16, 4, 8, 8), torch.float32, "channels_last"),  # the demo step's logits map
]
CPU_KERNEL_LABELS = [
    (torch.uint8, "mixed"),
    (torch.int64, "per_image"),
    (torch.int32, "ignore"),
    (torch.int64, "extremes"),
]


@needs_c
@pytest.mark.parametrize(
    "label_dtype,scenario", CPU_KERNEL_LABELS, ids=[f"{str(d)[6:]}-{s}" for d, s in CPU_KERNEL_LABELS]
)
@pytest.mark.parametrize(
    "shape,dtype,layout", CPU_KERNEL_CASES, ids=[f"{list(s)}-{dtype_id(d)}-{lay}" for s, d, lay in CPU_KERNEL_CASES]
)
def test_cpu_kernel_matches_rule(shape, dtype, layout, label_dtype, scenario, seed):
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    a, cb, dn = stat_inputs(shape, dtype, layout)
    hl, wl = (2 * h, 2 * w) if scenario in ("mixed", "extremes") else (3 * h + 1, w + 2)
    _check_cpu_kernel(a, cb, dn, md_labels(n, hl, wl, label_dtype, scenario, g))


@needs_c
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, F64), ids=dtype_id)
def test_cpu_kernel_ties_and_nan(dtype, seed):
    check_md_masks_ties_and_nan(_check_cpu_kernel, dtype, torch.Generator().manual_seed(seed))


@needs_c
def test_cpu_kernel_follows_the_rank_rule():
    check_rank_rule_case(torch.ops.lskd.md_masks, _set_rank_rule)


@needs_c
def test_cpu_kernel_does_not_depend_on_threads(seed):
    torch.manual_seed(seed)
    a, cb, dn = stat_inputs((9, 12, 20, 24), torch.float32)
    labels = md_labels(9, 40, 48, torch.int64, "per_image", torch.Generator().manual_seed(seed))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.lskd.md_masks(a, cb, dn, labels, 4, 255, 1e-8)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.lskd.md_masks(a, cb, dn, labels, 4, 255, 1e-8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_c
def test_cpu_kernel_rejects_bad_labels():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="labels must be an integer tensor"):
        torch.ops.lskd.md_masks(a, a, a, torch.zeros(2, 4, 4), 1, 255, 1e-8)
    with pytest.raises(RuntimeError, match=r"labels must be \[N, Hl, Wl\] with N = 2"):
        torch.ops.lskd.md_masks(a, a, a, torch.zeros(3, 4, 4, dtype=torch.int64), 1, 255, 1e-8)


# --------------------------------------------------------------------------- batched_quantile


@pytest.mark.parametrize("dtype", (torch.float32, F64), ids=dtype_id)
@pytest.mark.parametrize("case", range(5))
def test_batched_quantile_equals_torch_quantile(dtype, case, rng):
    n = rng.randint(1, 6)
    length = rng.choice([1, 2, 3, rng.randint(4, 300)])
    values = torch.randn(n, length, dtype=dtype)
    if rng.random() < 0.5:  # many duplicates
        values = (values * 2).round() / 2
    if n > 1:
        values[1] = values[1, :1].clone().expand(length)  # a constant row
    qs = [0.0, 1.0, rng.random(), rng.randint(0, 7) / 7]
    q = torch.tensor([qs[i % len(qs)] for i in range(n)], dtype=dtype)
    got = batched_quantile(values, q)
    for i in range(n):
        exp = torch.quantile(values[i], q[i])
        assert torch.equal(got[i], exp), (i, got[i].item(), exp.item(), q[i].item())


def test_batched_quantile_nan_rows():
    values = torch.randn(3, 10)
    values[1, 4] = float("nan")
    q = torch.tensor([0.3, 0.3, 1.0])
    got = batched_quantile(values, q)
    assert got[1].isnan() and not got[0].isnan() and not got[2].isnan()
    assert torch.equal(got[0], torch.quantile(values[0], q[0]))


def test_batched_quantile_with_fractions_as_md_masks_uses_them():
    """q = count / total as md_masks computes it (float32), on label-sized fractions."""
    values = torch.randn(4, 97)
    counts = torch.tensor([0, 13, 96, 97])
    q = counts / 97
    got = batched_quantile(values, q)
    for i in range(4):
        assert torch.equal(got[i], torch.quantile(values[i], q[i]))
