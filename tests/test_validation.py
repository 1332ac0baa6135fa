"""Bad input: every operator raises TypeError / ValueError (RuntimeError for an
unavailable backend) whose message names the argument and the shapes, before any kernel runs."""

from __future__ import annotations

import re

import pytest
import torch

import lskd
from lskd.ops import md_statistics

N, C, H, W = 2, 3, 8, 8


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape or (N, C, H, W), dtype=torch.float32, device="cpu").to(device=device, dtype=dtype)


def _pod(s, t, sm=None, cm=None, **kw):
    return lskd.pod_distill(s, t, sm, cm, **kw)


def _sop(s, t, sm=None, cm=None, **kw):
    return lskd.sop_distill(s, t, sm, cm, **{"groups": 2, **kw})


OPS = pytest.mark.parametrize("op", [_pod, _sop], ids=["pod", "sop"])


def esc(text: str) -> str:
    return re.escape(text)


# --------------------------------------------------------------------------- features


@OPS
def test_mismatched_shapes(op):
    with pytest.raises(ValueError, match=esc("teacher has shape [2, 3, 8, 9] but student has shape [2, 3, 8, 8]")):
        op(_x(), _x(N, C, H, 9))
    with pytest.raises(ValueError, match=esc("teacher has shape [1, 3, 8, 8] but student has shape [2, 3, 8, 8]")):
        op(_x(), _x(1, C, H, W))


@OPS
def test_not_four_dimensional(op):
    with pytest.raises(ValueError, match=esc("student must have shape [N, C, H, W], got [3, 8, 8]")):
        op(_x(C, H, W), _x(C, H, W))
    with pytest.raises(ValueError, match=esc("teacher must have shape [N, C, H, W], got [2, 3, 8, 8, 1]")):
        op(_x(), _x(N, C, H, W, 1))


@OPS
def test_not_a_tensor(op):
    with pytest.raises(TypeError, match="student must be a torch.Tensor, got list"):
        op([[1.0]], _x())
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor, got ndarray"):
        op(_x(), _x().numpy())


@OPS
def test_different_devices(op):
    with pytest.raises(ValueError, match="teacher is on meta but student is on cpu"):
        op(_x(), _x(device="meta"))
    with pytest.raises(ValueError, match="teacher is on cpu but student is on meta"):
        op(_x(device="meta"), _x())


@OPS
@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.uint8, torch.bool))
def test_integer_dtypes(op, dtype):
    bad = torch.ones(N, C, H, W, dtype=dtype)
    with pytest.raises(TypeError, match=f"student must be float32, float64, bfloat16 or float16, got {dtype}"):
        op(bad, bad)
    with pytest.raises(TypeError, match=f"teacher must be float32, float64, bfloat16 or float16, got {dtype}"):
        op(_x(), bad)


@OPS
def test_mixed_float_dtypes(op):
    with pytest.raises(TypeError, match="teacher has dtype torch.float64 but student has dtype torch.float32"):
        op(_x(), _x(dtype=torch.float64))


@OPS
@pytest.mark.parametrize("shape", [(0, C, H, W), (N, 0, H, W), (N, C, 0, W), (N, C, H, 0)])
def test_empty(op, shape):
    shown = "[" + ", ".join(map(str, shape)) + "]"
    with pytest.raises(ValueError, match=esc(f"student is empty (shape {shown}): N, C, H and W must be >= 1")):
        op(torch.empty(shape), torch.empty(shape))


# --------------------------------------------------------------------------- masks


@OPS
def test_wrong_mask_shapes(op):
    with pytest.raises(
        ValueError,
        match=esc("spatial_mask must have shape [2, 1, 8, 8] for features of shape [2, 3, 8, 8], got [2, 8, 8]"),
    ):
        op(_x(), _x(), torch.ones(N, H, W))
    with pytest.raises(
        ValueError,
        match=esc("spatial_mask must have shape [2, 1, 8, 8] for features of shape [2, 3, 8, 8], got [2, 3, 8, 8]"),
    ):
        op(_x(), _x(), torch.ones(N, C, H, W))
    with pytest.raises(
        ValueError, match=esc("channel_mask must have shape [2, 3] for features of shape [2, 3, 8, 8], got [2, 4]")
    ):
        op(_x(), _x(), None, torch.ones(N, C + 1))
    with pytest.raises(
        ValueError, match=esc("channel_mask must have shape [2, 3] for features of shape [2, 3, 8, 8], got [3]")
    ):
        op(_x(), _x(), None, torch.ones(C))


@OPS
@pytest.mark.parametrize("dtype", (torch.int64, torch.uint8, torch.int32))
def test_integer_masks(op, dtype):
    with pytest.raises(TypeError, match=f"spatial_mask must be bool or floating point, got {dtype}"):
        op(_x(), _x(), torch.ones(N, 1, H, W, dtype=dtype))
    with pytest.raises(TypeError, match=f"channel_mask must be bool or floating point, got {dtype}"):
        op(_x(), _x(), None, torch.ones(N, C, dtype=dtype))


@OPS
def test_mask_not_a_tensor_or_on_another_device(op):
    with pytest.raises(TypeError, match="spatial_mask must be a torch.Tensor or None, got list"):
        op(_x(), _x(), [[1.0]])
    with pytest.raises(ValueError, match="spatial_mask is on meta but the features are on cpu"):
        op(_x(), _x(), torch.ones(N, 1, H, W, device="meta"))
    with pytest.raises(ValueError, match="channel_mask is on meta but the features are on cpu"):
        op(_x(), _x(), None, torch.ones(N, C, device="meta"))


# --------------------------------------------------------------------------- operator parameters


def test_scales():
    s, t = _x(), _x()
    with pytest.raises(ValueError, match=esc("scale 9 exceeds the feature map of size 8x8")):
        _pod(s, t, scales=(1, 9))
    a, b = _x(N, C, 4, 9), _x(N, C, 4, 9)
    with pytest.raises(ValueError, match=esc("scale 5 exceeds the feature map of size 4x9")):
        _pod(a, b, scales=(5,))
    with pytest.raises(ValueError, match=esc("scales must be >= 1, got 0 in (0, 1)")):
        _pod(s, t, scales=(0, 1))
    with pytest.raises(ValueError, match=esc("scales must be >= 1, got -2")):
        _pod(s, t, scales=[-2])
    with pytest.raises(ValueError, match="between 1 and 8 scales are supported, got 0"):
        _pod(s, t, scales=())
    with pytest.raises(ValueError, match="between 1 and 8 scales are supported, got 9"):
        _pod(s, t, scales=(1,) * 9)
    with pytest.raises(TypeError, match="scales must be a list or tuple of ints, got 2"):
        _pod(s, t, scales=2)
    with pytest.raises(TypeError, match=esc("scales must be ints, got 2.0 in (1, 2.0)")):
        _pod(s, t, scales=(1, 2.0))
    with pytest.raises(TypeError, match="scales must be ints, got True"):
        _pod(s, t, scales=(True,))


def test_groups_window_stride():
    s, t = _x(), _x()
    with pytest.raises(ValueError, match=esc("groups must be between 1 and the channel count C = 3, got 4")):
        _sop(s, t, groups=4)
    with pytest.raises(ValueError, match=esc("groups must be between 1 and the channel count C = 3, got 0")):
        _sop(s, t, groups=0)
    with pytest.raises(ValueError, match=esc("groups must be between 1 and the channel count C = 3, got -1")):
        _sop(s, t, groups=-1)
    with pytest.raises(TypeError, match="groups must be an int, got 2.0"):
        _sop(s, t, groups=2.0)
    with pytest.raises(ValueError, match="window must be >= 1, got 0"):
        _sop(s, t, window=0)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        _sop(s, t, stride=0)
    with pytest.raises(TypeError, match=esc("window must be an int, got (3, 3)")):
        _sop(s, t, window=(3, 3))
    with pytest.raises(TypeError, match="stride must be an int, got True"):
        _sop(s, t, stride=True)


@OPS
def test_reduction(op):
    with pytest.raises(ValueError, match=esc("reduction must be one of ('mean', 'sum', 'none'), got 'avg'")):
        op(_x(), _x(), reduction="avg")


# --------------------------------------------------------------------------- backends


@OPS
def test_unknown_backend(op):
    with pytest.raises(
        ValueError, match=esc("backend must be 'auto' or one of ('reference', 'cpu', 'cuda', 'triton'), got 'foo'")
    ):
        op(_x(), _x(), backend="foo")
    with pytest.raises(ValueError, match="got 'CPU'"):
        op(_x(), _x(), backend="CPU")


@OPS
def test_unavailable_backend(op):
    name = "pod_distill" if op is _pod else "sop_distill"
    with pytest.raises(
        RuntimeError,
        match=esc(f"{name}: backend 'cuda' is unavailable: backend 'cuda' needs CUDA tensors, got tensors on cpu"),
    ):
        op(_x(), _x(), backend="cuda")
    # meta tensors pass the checks; no compiled backend runs on them
    with pytest.raises(
        RuntimeError, match=esc("backend 'cpu' is unavailable: backend 'cpu' needs CPU tensors, got tensors on meta")
    ):
        op(_x(device="meta"), _x(device="meta"), backend="cpu")
    with pytest.raises(
        RuntimeError, match=esc("backend 'triton' is unavailable: backend 'triton' does not support meta tensors")
    ):
        op(_x(device="meta"), _x(device="meta"), backend="triton")


def test_unavailable_backend_reason_is_in_the_message():
    """Every backend the installation lacks raises RuntimeError with the reason available_backends() has."""
    from lskd.ops._backends import _unavailable

    for backend in lskd.ops.BACKENDS:
        why = _unavailable(backend, torch.device("cpu"))
        if not why:
            continue
        with pytest.raises(RuntimeError, match=esc(f"backend {backend!r} is unavailable: {why}")):
            _pod(_x(), _x(), backend=backend)
        with pytest.raises(RuntimeError, match=esc(why)):
            md_statistics(_x(), _x(), _x(), backend=backend)


# --------------------------------------------------------------------------- md_masks


def _md(labels=None, old_classes=4, feats=None, **kw):
    feats = feats or (_x(), _x(), _x())
    labels = torch.zeros(N, 16, 16, dtype=torch.long) if labels is None else labels
    return lskd.md_masks(*feats, labels, old_classes, **kw)


def test_md_masks_features():
    with pytest.raises(ValueError, match=esc("feat_bg_erased has shape [2, 3, 8, 9] but feat has shape [2, 3, 8, 8]")):
        _md(feats=(_x(), _x(N, C, H, 9), _x()))
    with pytest.raises(
        TypeError, match="feat_new_erased must be float32, float64, bfloat16 or float16, got torch.int64"
    ):
        _md(feats=(_x(), _x(), torch.ones(N, C, H, W, dtype=torch.long)))
    with pytest.raises(ValueError, match="feat_new_erased is on meta but feat is on cpu"):
        _md(feats=(_x(), _x(), _x(device="meta")))
    with pytest.raises(ValueError, match=esc("feat is empty (shape [0, 3, 8, 8])")):
        _md(feats=(_x(0, C, H, W), _x(0, C, H, W), _x(0, C, H, W)), labels=torch.zeros(0, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bool))
def test_md_masks_labels_dtype(dtype):
    with pytest.raises(TypeError, match=f"labels must be an integer tensor, got {dtype}"):
        _md(labels=torch.zeros(N, 8, 8, dtype=dtype))


def test_md_masks_labels_shape_device_and_old_classes():
    with pytest.raises(ValueError, match=esc("labels must have shape [N, Hl, Wl] with N = 2, got [3, 8, 8]")):
        _md(labels=torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=esc("labels must have shape [N, Hl, Wl] with N = 2, got [8, 8]")):
        _md(labels=torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=esc("labels must have shape [N, Hl, Wl] with N = 2, got [2, 0, 8]")):
        _md(labels=torch.zeros(2, 0, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got list"):
        _md(labels=[[0]])
    with pytest.raises(ValueError, match="labels are on meta but the features are on cpu"):
        _md(labels=torch.zeros(N, 8, 8, dtype=torch.long, device="meta"))
    for bad in (0, -1, True, 2.0, None):
        with pytest.raises(ValueError, match=esc(f"old_classes must be an int >= 1 (background counts), got {bad!r}")):
            _md(old_classes=bad)


def test_md_masks_backends():
    with pytest.raises(ValueError, match="md_masks: backend must be 'auto' or one of"):
        _md(backend="nope")
    with pytest.raises(
        RuntimeError, match="md_masks: backend 'cuda' is unavailable: backend 'cuda' needs CUDA tensors"
    ):
        _md(backend="cuda")


def test_modules_validate_like_the_functions():
    with pytest.raises(ValueError, match=esc("teacher has shape [2, 3, 8, 9] but student has shape [2, 3, 8, 8]")):
        lskd.nn.PODDistillLoss()(_x(), _x(N, C, H, 9))
    with pytest.raises(ValueError, match="groups must be between 1 and the channel count C = 3, got 20"):
        lskd.nn.SOPDistillLoss()(_x(), _x())
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        lskd.nn.MDMasks()(_x(), _x(), _x(), torch.zeros(N, 8, 8), 4)
