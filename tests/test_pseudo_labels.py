"""pseudo_labels (PLOP's entropy pseudo-labels on upsampled teacher logits, fused) against its
float64 reference.

* every backend on random cases: upsampling by non-integer factors, identity and downsampling,
  O from 1 to 151, labels mixing eligible (< O), new-class and ignored pixels, thresholds from 0
  to past 1, all four dtypes and four layouts. The kernels compute in float32 for the low
  precision dtypes, the oracle in float64: a pixel may differ only where the float64 entropy is
  within a rounding error of its threshold or the two largest logits nearly tie, and the counts
  must be the kernel's own targets';
* NaN logits (never accepted), O = 1 (entropy 0), ties (the first class), threads;
* the methods' PLOP pseudo-labels (lskd.methods.plop.pseudo_label_counts) on the op;
* opcheck, torch.compile, clear errors; the same random cases on a GPU (marked gpu).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, LAYOUTS, to_layout

import lskd
from lskd import reference

F64 = torch.float64
IGNORE = 255
#: How close (float64) an entropy may be to its threshold, or the top two logits to each other,
#: for a kernel computing in the acc dtype to decide the pixel the other way.
NEAR = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _sizes(rng: random.Random, small: bool):
    """``(h, w, H, W)``: upsampling by a non-integer factor, the identity or downsampling."""
    h, w = rng.randint(1, 5 if small else 12), rng.randint(1, 5 if small else 12)
    kind = rng.choice(["up", "up", "same", "down"])
    if kind == "same":
        return h, w, h, w
    if kind == "down":
        return h + 3, w + 4, max(1, h - 1), rng.randint(1, w + 2)
    top = 3 if small else 8
    return h, w, h * rng.randint(1, top) + rng.randint(0, 3), w * rng.randint(1, top) + rng.randint(0, 3)


def random_inputs(rng: random.Random, dtype: torch.dtype, layout: str, small: bool, device="cpu", o=None):
    """``(teacher [N, O, h, w], labels [N, H, W], thresholds [O] float32)`` of one random case."""
    n = rng.randint(1, 3)
    o = o or rng.choice([1, rng.randint(2, 6), rng.randint(2, 12 if small else 40)])
    h, w, hh, ww = _sizes(rng, small)
    teacher = to_layout((torch.randn(n, o, h, w) * rng.choice([0.3, 1.0, 4.0])).to(dtype), layout).to(device)
    k = o + rng.randint(0, 4)  # labels of new classes too
    labels = torch.randint(0, k, (n, hh, ww))
    labels[torch.rand(n, hh, ww) < rng.choice([0.0, 0.2])] = IGNORE
    thresholds = torch.rand(o) * rng.choice([0.5, 1.0, 1.2])
    thresholds[torch.rand(o) < 0.2] = rng.choice([0.0, 1.0])
    return teacher, labels.to(device), thresholds.to(device)


def _near(teacher64, labels, thresholds, tol):
    """Eligible pixels whose decision depends on a rounding error: the float64 entropy within tol
    of its threshold, or the two largest logits within tol but not equal (argmax may go either
    way; an exact tie is one in every precision, the first class). With one class the entropy is
    exactly 0 everywhere: no pixel is near."""
    t = teacher64
    if tuple(t.shape[-2:]) != tuple(labels.shape[-2:]):
        t = F.interpolate(t, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    if t.shape[1] == 1:
        return torch.zeros_like(labels, dtype=torch.bool)
    ent = reference.normalized_entropy(t)
    pred = t.max(dim=1).indices
    near = (ent - thresholds.double().cpu()[pred]).abs() <= tol * (1 + ent.abs())
    top2 = t.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    near |= (gap > 0) & (gap <= tol * (1 + top2[:, 0].abs()))
    return near & (labels < t.shape[1])


def check_case(backend, teacher, labels, thresholds) -> None:
    """lskd.pseudo_labels on ``backend`` against the float64 reference on the same (upcast) inputs."""
    check_op(lambda *x: lskd.pseudo_labels(*x, IGNORE, backend=backend), teacher, labels, thresholds)


def check_op(op, teacher, labels, thresholds) -> None:
    """``op(teacher, labels, thresholds) -> (targets, accepted, eligible)`` (the wrapper, or a raw op
    given acc-dtype thresholds) against the float64 reference on the same (upcast) inputs."""
    y, a, e = (x.cpu() for x in op(teacher, labels, thresholds))
    assert y.dtype == torch.int64 and y.shape == labels.shape and y.is_contiguous()
    t64, lab, thr = teacher.double().cpu(), labels.cpu(), thresholds.cpu()
    ref_y, _, ref_e = reference.pseudo_labels(t64, lab, thr.double(), IGNORE)
    near = _near(t64, lab, thr, NEAR[teacher.dtype])
    assert near.float().mean() < 0.05, "too many near pixels: the case tests little"
    differ = (y != ref_y) & ~near
    assert not differ.any(), f"{int(differ.sum())} pixels differ, first at {differ.nonzero()[0].tolist()}"
    # at a near pixel the kernel still gives a class or ignore_index
    assert ((y[near] == IGNORE) | ((y[near] >= 0) & (y[near] < teacher.shape[1]))).all()
    eligible = lab < teacher.shape[1]
    assert torch.equal(e, ref_e) and torch.equal(e, eligible.sum(dim=(1, 2)))
    assert torch.equal(a, (eligible & (y != IGNORE)).sum(dim=(1, 2)))


@pytest.mark.cases(default=16, triton=4)
def test_random_cases(backend, case, seed):
    rng = random.Random(seed)
    dtype = DTYPES[case % len(DTYPES)]
    layout = LAYOUTS[(case // len(DTYPES)) % len(LAYOUTS)]
    check_case(backend, *random_inputs(rng, dtype, layout, small=backend == "triton"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("o", [21, 151])
def test_many_classes(backend, o, dtype, seed):
    """VOC's and ADE20K's class counts: the kernels loop over (or block) the channels; in float64
    any slip in the rescaled sums across channel blocks shows beyond the near-pixel allowance."""
    rng = random.Random(seed)
    check_case(backend, *random_inputs(rng, dtype, "channels_last", small=True, o=o))


def test_nan_ties_and_one_class(backend):
    """A NaN logit is never accepted; exact ties give the first class; O = 1 has entropy 0."""
    t = torch.zeros(1, 3, 2, 2)
    t[0, :, 0, 0] = torch.tensor([1.0, 5.0, 5.0])  # tie between 1 and 2: class 1
    t[0, 1, 0, 1] = float("nan")
    labels = torch.zeros(1, 2, 2, dtype=torch.int64)
    got = lskd.pseudo_labels(t, labels, torch.full((3,), 2.0), IGNORE, backend=backend)  # accepts any number
    assert got.targets[0, 0, 0] == 1 and got.targets[0, 0, 1] == IGNORE
    assert got.targets[0, 1, 0] == 0 and got.accepted.tolist() == [3] and got.eligible.tolist() == [4]
    labels = torch.zeros(2, 5, 5, dtype=torch.int64)
    one = lskd.pseudo_labels(torch.randn(2, 1, 3, 3), labels, torch.tensor([0.5]), backend=backend)
    assert (one.targets == 0).all() and one.accepted.tolist() == [25, 25]
    zero = lskd.pseudo_labels(torch.randn(2, 1, 3, 3), labels, torch.tensor([0.0]), backend=backend)
    assert (zero.targets == IGNORE).all() and zero.accepted.tolist() == [0, 0]


def test_threads_give_the_same_labels(seed):
    """The CPU kernel splits images and rows over threads: the result may not depend on it."""
    rng = random.Random(seed)
    teacher, labels, thresholds = random_inputs(rng, torch.float32, "contiguous", small=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lskd.pseudo_labels(teacher, labels, thresholds, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = lskd.pseudo_labels(teacher, labels, thresholds, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_plop_pseudo_labels_run_the_op(backend, seed):
    """lskd.methods.plop.pseudo_label_counts is the op (on the labeler's backend)."""
    from lskd.methods.plop import pseudo_label_counts

    rng = random.Random(seed)
    teacher, labels, thresholds = random_inputs(rng, torch.float32, "contiguous", small=True, o=4)
    got = pseudo_label_counts(labels, teacher, thresholds, 4, IGNORE, backend=backend)
    op = lskd.pseudo_labels(teacher, labels, thresholds, IGNORE, backend=backend)
    for a, b in zip(got, op):
        assert torch.equal(a, b)


def _raw_op(backend):
    return torch.ops.lskd_triton.pseudo_labels if backend == "triton" else torch.ops.lskd.pseudo_labels


@pytest.mark.compile
def test_opcheck(compiled_backend):
    t, y, thr = torch.randn(2, 4, 3, 5), torch.randint(0, 6, (2, 7, 9)), torch.rand(4)
    torch.library.opcheck(_raw_op(compiled_backend), (t, y, thr, IGNORE))


@pytest.mark.compile
def test_compile_matches_eager(compiled_backend):
    t, y, thr = torch.randn(2, 4, 3, 5), torch.randint(0, 6, (2, 7, 9)), torch.rand(4)

    def fn(x):
        return tuple(lskd.pseudo_labels(x, y, thr, IGNORE, backend=compiled_backend))

    for a, b in zip(torch.compile(fn, fullgraph=True)(t), fn(t)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(labels=torch.zeros(2, 4, 4, dtype=torch.int32)), "int64"),
        (dict(labels=torch.zeros(3, 4, 4, dtype=torch.int64)), r"labels must be int64 \[N=2"),
        (dict(thresholds=torch.ones(4)), r"thresholds must be .* \[O\] = \[3\]"),
        (dict(thresholds=torch.ones(3, dtype=torch.int64)), "thresholds must be a float"),
        (dict(teacher=torch.randn(2, 3, 3)), r"shape \[N, C, H, W\]"),
        (dict(teacher=torch.randn(2, 3, 3, 3).long()), "teacher must be float32"),
    ],
)
def test_clear_errors(change, match):
    args = dict(
        teacher=torch.randn(2, 3, 3, 3), labels=torch.zeros(2, 4, 4, dtype=torch.int64), thresholds=torch.ones(3)
    )
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        lskd.pseudo_labels(**args)


@pytest.mark.parametrize("args,match", [((3, 2), "thresholds"), ((2, 1), "labels must be")])
def test_raw_op_errors(compiled_backend, args, match):
    """The raw op checks its inputs too (a call that bypasses the wrapper)."""
    o, lab_n = args
    t, y, thr = torch.randn(2, 2, 3, 3), torch.zeros(lab_n, 4, 4, dtype=torch.int32), torch.ones(o)
    if match == "thresholds":
        y = y.long()
    with pytest.raises((ValueError, RuntimeError), match=match):
        _raw_op(compiled_backend)(t, y, thr, IGNORE)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(8))
def test_random_cases_gpu(gpu_backend, case, seed):
    rng = random.Random(seed)
    dtype = DTYPES[case % len(DTYPES)]
    check_case(gpu_backend, *random_inputs(rng, dtype, LAYOUTS[case % len(LAYOUTS)], small=False, device="cuda"))
