"""Fidelity to the released LSKD code (github:wwwwyw/LSKD, a fork of PLOP).

* MD masks and the erased images come from the labels AFTER entropy pseudo-labelling
  (release train.py 257-331: pseudo-label, then erase; 486-494: the same labels go to
  ``features_distillation``, whose rho counts every label pixel, train.py 1207-1214).
* Training crops never leave the image (release run.py 44: ``RandomResizedCrop(crop, (0.5, 2.0))``,
  dataset/transform.py 507-545: windows sampled inside the image, central-crop fallback).
"""

from __future__ import annotations

import copy
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lskd.data.transforms import TrainTransform
from lskd.methods import LSKD, StepContext, pseudo_label, teacher_triplet
from lskd.methods.base import cross_entropy
from lskd.models import DeepLabV3
from lskd.reference import md_statistics

OLD, NEW, SIZE = 3, 2, 48
CTX = StepContext(step=1, old_classes=OLD, new_classes=NEW)


def _batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    labels[:, 6:22, 8:30] = OLD  # new class 3
    labels[:, 28:44, 14:40] = OLD + 1  # new class 4
    labels[:, :, :3] = 255
    return images, labels


class _Recorder(nn.Module):
    """The teacher, recording every input batch it is run on."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.inputs: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor):
        self.inputs.append(x.clone())
        return self.net(x)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    teacher = DeepLabV3("tiny", [OLD])
    with torch.no_grad():  # calibrate BN running statistics like a trained model
        for i in range(3):
            teacher(_batch(4, 100 + i)[0])
    teacher.freeze()
    student = copy.deepcopy(teacher)
    student._frozen = False
    student.requires_grad_(True).eval()
    student.add_step(NEW)
    return teacher, student


def _erase(images: torch.Tensor, labels: torch.Tensor):
    old = (labels < OLD)[:, None]
    new = ((labels >= OLD) & (labels != 255))[:, None]
    return images.masked_fill(old, 0.0), images.masked_fill(new, 0.0)


def _prepared(teacher, images, labels) -> LSKD:
    method = LSKD()
    method.prepare_step(teacher, [(images, labels)], CTX)  # median thresholds: about half rejected
    return method


def _expected(teacher, method, images, labels):
    with torch.no_grad():
        plain = teacher(images)
    pseudo, factor = pseudo_label(labels, plain.logits, method.thresholds, OLD)
    return plain, pseudo, factor


def _check_batch_has_both(labels, pseudo):
    bg = labels < OLD
    assert (bg & (pseudo == 255)).any(), "test needs rejected background pixels"
    assert (bg & (pseudo < OLD)).any(), "test needs accepted background pixels"


def test_erased_images_come_from_pseudo_labels(nets):
    teacher, _ = nets
    images, labels = _batch()
    method = _prepared(teacher, images, labels)
    plain, pseudo, _ = _expected(teacher, method, images, labels)
    _check_batch_has_both(labels, pseudo)
    cb, dn = _erase(images, pseudo)
    cb_orig, _ = _erase(images, labels)
    assert not torch.equal(cb, cb_orig)  # rejected background pixels are not erased
    rec = _Recorder(teacher)
    t_out, bctx = method.teacher_forward(rec, images, labels, CTX)
    seen = torch.cat(rec.inputs)
    assert seen.shape[0] == 3 * images.shape[0]
    torch.testing.assert_close(seen, torch.cat([images, cb, dn]), rtol=0, atol=0)
    with torch.no_grad():
        want_cb, want_dn = teacher(cb), teacher(dn)
    torch.testing.assert_close(t_out.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(bctx.teacher_erased, (want_cb, want_dn)):
        for g, w in zip(got.maps, want.maps):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _direct_spatial_mask(t_map, cb_map, dn_map, y):
    """The released spatial mask of one map, rho from ``y`` with |y| = every label pixel."""
    cos_bg, cos_new, _, _ = md_statistics(t_map, cb_map, dn_map)
    out = []
    for i in range(y.shape[0]):
        rho_old = (y[i] < OLD).sum().item() / y[i].numel()
        rho_new = ((y[i] >= OLD) & (y[i] != 255)).sum().item() / y[i].numel()
        q_old = torch.quantile(cos_bg[i].flatten(), rho_old)
        q_new = torch.quantile(cos_new[i].flatten(), rho_new)
        out.append((cos_bg[i] >= q_old) | (cos_new[i] <= q_new))
    return torch.stack(out)[:, None]


def test_md_masks_and_ce_use_the_same_pseudo_labels(nets, monkeypatch):
    teacher, student = nets
    images, labels = _batch(seed=3)
    method = _prepared(teacher, images, labels)
    _, pseudo, factor = _expected(teacher, method, images, labels)
    _check_batch_has_both(labels, pseudo)
    calls: list = []
    monkeypatch.setattr(method, "labeler", _Counting(method.labeler, calls))
    t_out, bctx = method.teacher_forward(teacher, images, labels, CTX)
    s_out = student(images)
    first = method.terms(images, labels, s_out, t_out, bctx)
    again = method.terms(images, labels, s_out, t_out, bctx)  # the search re-evaluates a batch
    assert len(calls) == 1, "pseudo-labels are computed once per batch"
    want_ce = cross_entropy(s_out.logits, pseudo, 255, pixel_weight=factor[:, None, None], mean_over="all")
    torch.testing.assert_close(first["ce"], want_ce)
    torch.testing.assert_close(again["ce"], want_ce)
    cb, dn = bctx.teacher_erased
    differs = False
    for m in method.masked_maps():
        spatial, _ = bctx.cache[("md_masks", m)]
        want = _direct_spatial_mask(t_out.maps[m], cb.maps[m], dn.maps[m], pseudo)
        assert torch.equal(spatial, want), m
        orig = _direct_spatial_mask(t_out.maps[m], cb.maps[m], dn.maps[m], labels)
        differs |= not torch.equal(spatial, orig)
    assert differs, "rho from the original labels would give other masks in this test"


class _Counting:
    """Wraps an EntropyPseudoLabeler and counts its calls (other attributes pass through)."""

    def __init__(self, labeler, calls: list) -> None:
        self._labeler = labeler
        self._calls = calls

    def __call__(self, *args, **kwargs):
        self._calls.append(1)
        return self._labeler(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._labeler, name)


def test_run_teacher_path_erases_from_pseudo_labels(nets):
    teacher, student = nets
    images, labels = _batch(seed=5)
    method = _prepared(teacher, images, labels)
    plain, pseudo, _ = _expected(teacher, method, images, labels)
    _check_batch_has_both(labels, pseudo)
    rec = _Recorder(teacher)
    with torch.no_grad():
        method.terms(images, labels, student(images), plain, CTX.replace(run_teacher=rec))
    torch.testing.assert_close(torch.cat(rec.inputs), torch.cat(_erase(images, pseudo)), rtol=0, atol=0)


def test_teacher_triplet_relabel_order(nets):
    teacher, _ = nets
    images, labels = _batch(seed=7)
    method = _prepared(teacher, images, labels)
    _, pseudo, _ = _expected(teacher, method, images, labels)

    def relabel(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return pseudo_label(y, logits, method.thresholds, OLD)[0]

    for fused in (True, False):
        rec = _Recorder(teacher)
        teacher_triplet(rec, images, labels, OLD, fused=fused, relabel=relabel)
        sizes = [x.shape[0] for x in rec.inputs]
        assert sizes == ([2, 4] if fused else [2, 2, 2])
        torch.testing.assert_close(torch.cat(rec.inputs), torch.cat([images, *_erase(images, pseudo)]), rtol=0, atol=0)


# -------------------------------------------------------------------------------- crops

SHAPES = [(40, 50), (50, 40), (32, 32), (10, 7), (7, 10), (3, 3), (1, 1), (200, 30), (30, 200), (512, 300)]


def _image(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    lab = rng.integers(0, 21, (h, w), dtype=np.uint8)  # no 255 anywhere
    return img, lab


@pytest.mark.parametrize("hw", SHAPES)
def test_train_crop_never_pads(hw):
    h, w = hw
    img, lab = _image(h, w)
    tr = TrainTransform(32)
    torch.manual_seed(1)
    for _ in range(30):
        x, y = tr(img, lab)
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        assert not (y == 255).any(), "padding in the crop"
        assert set(y.unique().tolist()) <= set(np.unique(lab).tolist())
    for _ in range(60):
        (x0, y0, x1, y1), _flip = tr.sample_window(w, h)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, "window outside the image"
        assert all(float(v).is_integer() for v in (x0, y0, x1, y1))  # whole pixels, as released


def test_train_crop_follows_the_release_rule():
    """Area fraction in [0.5, 1] and aspect ratio in [3/4, 4/3] (up to rounding) when a draw fits;
    else the central crop (whole image when its aspect ratio is in range)."""
    tr = TrainTransform(32)
    torch.manual_seed(2)
    w, h = 300, 250  # aspect ratio 1.2 in [3/4, 4/3]: the fallback is the whole image
    fallbacks = 0
    for _ in range(400):
        (x0, y0, x1, y1), _ = tr.sample_window(w, h)
        cw, ch = x1 - x0, y1 - y0
        if (cw, ch) == (w, h) and (x0, y0) == (0, 0):
            fallbacks += 1
            continue
        assert 0.5 * w * h - 2 * (cw + ch) <= cw * ch <= w * h
        assert 3 / 4 - 0.02 <= cw / ch <= 4 / 3 + 0.02
    assert fallbacks < 40  # (2/3)^10 ~ 1.7% for a draw range (0.5, 2.0)
    never = TrainTransform(32, scale=(2.0, 2.0))  # no draw fits: always the fallback
    assert never.sample_window(300, 250)[0] == (0, 0, 300, 250)


@pytest.mark.parametrize(
    "wh,box",
    [((300, 300), (0, 0, 300, 300)), ((300, 200), (16, 0, 283, 200)), ((100, 300), (0, 83, 100, 216))],
)
def test_train_crop_fallback_is_central(wh, box):
    w, h = wh
    tr = TrainTransform(32, scale=(2.0, 2.0), flip=False)
    assert tr.sample_window(w, h) == (box, False)
    img, lab = _image(h, w)
    _, y = tr(img, lab)
    want = Image.fromarray(lab).crop(box).resize((32, 32), Image.Resampling.NEAREST)
    assert torch.equal(y, torch.from_numpy(np.array(want)).long())


def test_train_crop_reproducible_with_torch_seed():
    img, lab = _image(40, 50)
    tr = TrainTransform(24)
    torch.manual_seed(123)
    a = [tr(img, lab) for _ in range(4)]
    torch.manual_seed(123)
    b = [tr(img, lab) for _ in range(4)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(a[0][1], t[1]) for t in a[1:])
