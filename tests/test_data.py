"""Tests of lskd.data: tasks, image selection, label LUTs, readers, caching, transforms, synthetic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from data_builders import save_palette_png, write_ade, write_voc
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lskd.data import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    ADE20KSegmentation,
    EvalTransform,
    IncrementalSubset,
    SegmentationFolder,
    Task,
    TrainTransform,
    VOCSegmentation,
    check_labels,
    eval_lut,
    image_classes,
    load_dataset,
    make_synthetic,
    pad_collate,
    parse_task,
    select_images,
    step_indices,
    train_lut,
)
from lskd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_tensor

# ----------------------------------------------------------------------------------- tasks


def test_parse_15_1_voc():
    t = parse_task("15-1", 21)
    assert t.steps == [list(range(16)), [16], [17], [18], [19], [20]]
    assert t.num_steps == 6 and t.num_classes == 21 and t.name == "15-1"
    assert t.classes_per_step == [16, 1, 1, 1, 1, 1]
    assert t.old_classes(0) == 0
    assert t.old_classes(1) == 16
    assert t.old_classes(5) == 20
    assert t.new_classes(0) == list(range(16))
    assert t.new_classes(3) == [18]
    assert t.classes_until(2) == list(range(18))
    assert t.future_classes(3) == [19, 20]
    assert t.step_of(0) == 0 and t.step_of(15) == 0 and t.step_of(20) == 5


@pytest.mark.parametrize(
    "name, k, steps",
    [
        ("15-5", 21, [list(range(16)), list(range(16, 21))]),
        ("19-1", 21, [list(range(20)), [20]]),
        ("5-3", 21, [list(range(6)), [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 20]]),
        ("2-2", 21, [[0, 1, 2]] + [[c, c + 1] for c in range(3, 21, 2)]),
        ("10-1", 21, [list(range(11))] + [[c] for c in range(11, 21)]),
        ("100-50", 151, [list(range(101)), list(range(101, 151))]),
        ("100-10", 151, [list(range(101))] + [list(range(c, c + 10)) for c in range(101, 151, 10)]),
        ("50-50", 151, [list(range(51)), list(range(51, 101)), list(range(101, 151))]),
        ("offline", 21, [list(range(21))]),
        ("joint", 7, [list(range(7))]),
        ("4-1", 7, [[0, 1, 2, 3, 4], [5], [6]]),
    ],
)
def test_parse_task_cases(name, k, steps):
    t = parse_task(name, k)
    assert t.steps == steps
    assert sorted(c for s in t.steps for c in s) == list(range(k))


def test_parse_15_5s_is_15_1():
    assert parse_task("15-5s", 21).steps == parse_task("15-1", 21).steps
    assert parse_task("100-5", 151).num_steps == 11


def test_parse_first_class():
    t = parse_task("2-1", 6, first_class=2)
    assert t.steps == [[0, 2, 3], [4], [5]]


@pytest.mark.parametrize(
    "name", ["15", "a-b", "0-1", "25-1", "20-1", "15-0", "15-4", "15-4s", "", "15-1-1", "-1", "15_1", "offlin"]
)
def test_parse_invalid(name):
    with pytest.raises(ValueError) as e:
        parse_task(name, 21)
    msg = str(e.value)
    assert repr(name) in msg and "21" in msg


def test_parse_invalid_types_and_counts():
    with pytest.raises(ValueError):
        parse_task(15, 21)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parse_task("1-1", 1)
    with pytest.raises(ValueError, match="step"):
        parse_task("15-1", 21).new_classes(6)


def test_task_validation():
    with pytest.raises(ValueError, match="background"):
        Task("x", [[1, 2], [3]], 4)
    with pytest.raises(ValueError, match="appears"):
        Task("x", [[0, 1], [1]], 3)
    with pytest.raises(ValueError, match="outside"):
        Task("x", [[0, 1], [5]], 3)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 10), st.integers(1, 6))
def test_parse_partition_property(base, inc, nsteps):
    k = 1 + base + inc * nsteps
    t = parse_task(f"{base}-{inc}", k)
    assert t.num_steps == nsteps + 1
    assert [c for s in t.steps for c in s] == list(range(k))  # consecutive ids, in order
    for step in range(t.num_steps):
        assert t.old_classes(step) == len(t.classes_until(step)) - len(t.new_classes(step))
        assert all(c >= t.old_classes(step) for c in t.new_classes(step))


# --------------------------------------------------------------------- selection and LUTs

# task "2-1" on 5 classes: steps [[0, 1, 2], [3], [4]]
IMAGE_CLASSES = [{1}, {3}, {1, 3}, {3, 4}, {4}, set(), {2, 4}, {1, 2, 3}]


@pytest.mark.parametrize(
    "step, disjoint, expected",
    [
        (0, False, [0, 2, 6, 7]),
        (0, True, [0]),
        (1, False, [1, 2, 3, 7]),
        (1, True, [1, 2, 7]),
        (2, False, [3, 4, 6]),
        (2, True, [3, 4, 6]),
    ],
)
def test_select_images(step, disjoint, expected):
    task = parse_task("2-1", 5)
    assert task.steps == [[0, 1, 2], [3], [4]]
    assert select_images(IMAGE_CLASSES, task, step, disjoint) == expected


def test_select_offline_takes_every_labelled_image():
    task = parse_task("offline", 5)
    assert select_images(IMAGE_CLASSES, task, 0, True) == [0, 1, 2, 3, 4, 6, 7]


def test_luts():
    task = parse_task("2-1", 5)
    tl = train_lut(task, 1)
    el = eval_lut(task, 1)
    assert tl.shape == (256,) and tl.dtype == torch.int64
    assert tl[:6].tolist() == [0, 0, 0, 3, 0, 0] and tl[255] == 255 and tl[100] == 0
    assert el[:6].tolist() == [0, 1, 2, 3, 255, 255] and el[255] == 255
    assert train_lut(task, 0)[:5].tolist() == [0, 1, 2, 0, 0]
    assert eval_lut(task, 2)[:5].tolist() == [0, 1, 2, 3, 4]
    label = torch.tensor([[0, 1, 2], [3, 4, 255]])
    assert tl[label].tolist() == [[0, 0, 0], [3, 0, 255]]
    assert el[label].tolist() == [[0, 1, 2], [3, 255, 255]]
    assert eval_lut(task, 0)[label].tolist() == [[0, 1, 2], [255, 255, 255]]


# ----------------------------------------------------------------------------------- readers

VOC_TRAIN = {"2007_000032": [1, 15, 255], "2007_000039": [20], "2008_000001": [7, 8], "2011_000003": [0]}
VOC_VAL = {"2007_000033": [1, 255], "2010_000002": [19, 20]}


def test_voc_reader_aug(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    data = write_voc(root, VOC_TRAIN, VOC_VAL, aug=True, image_ext=".jpg")
    for r in (root, tmp_path / "VOCdevkit", tmp_path):
        ds = VOCSegmentation(r, "train")
        assert ds.split == "train_aug" and len(ds) == 4
    assert ds.class_names == VOC_CLASSES and ds.num_classes == 21
    for i, sid in enumerate(VOC_TRAIN):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (16, 12)
        assert label.dtype == np.uint8 and label.shape == (12, 16)
        np.testing.assert_array_equal(label, data[sid][1])  # palette indices, not colours
        assert "SegmentationClassAug" in ds.samples[i][1]
        assert ds.label_classes(i) == set(VOC_TRAIN[sid]) - {0, 255}
    val = VOCSegmentation(root, "val")
    assert len(val) == 2 and "SegmentationClass" + "/" in val.samples[0][1].replace("\\", "/")
    np.testing.assert_array_equal(val[1][1], data["2010_000002"][1])
    assert isinstance(load_dataset(root, "train"), VOCSegmentation)


def test_voc_reader_plain_train_png_and_pairs(tmp_path):
    data = write_voc(tmp_path, VOC_TRAIN, VOC_VAL, aug=False, image_ext=".png")
    ds = VOCSegmentation(tmp_path, "train")
    assert ds.split == "train" and len(ds) == 4
    img, lab = ds[0]
    np.testing.assert_array_equal(np.asarray(img), data["2007_000032"][0])  # lossless PNG
    # list lines given as path pairs, as some train_aug.txt files are
    sets = tmp_path / "ImageSets" / "Segmentation"
    (sets / "pairs.txt").write_text("/JPEGImages/2007_000039.png /SegmentationClass/2007_000039.png\n")
    pairs = SegmentationFolder(tmp_path, "pairs", VOC_CLASSES)
    np.testing.assert_array_equal(pairs[0][1], data["2007_000039"][1])


def test_folder_with_classes_txt(tmp_path):
    names = ["background", "a", "b", "c"]
    write_voc(tmp_path, {"x1": [1, 2], "x2": [3]}, {"y1": [2]}, aug=False, classes_txt=names)
    ds = SegmentationFolder(tmp_path, "train")
    assert ds.class_names == names and ds.num_classes == 4
    assert [ds.label_classes(i) for i in range(2)] == [{1, 2}, {3}]
    assert isinstance(load_dataset(tmp_path, "val"), SegmentationFolder)
    assert len(load_dataset(tmp_path, "val", kind="folder")) == 1


def test_ade_reader(tmp_path):
    data = write_ade(
        tmp_path, {"ADE_train_00000001": [0, 1, 150], "ADE_train_00000002": [12, 0]}, {"ADE_val_00000001": [5]}
    )
    assert len(ADE20K_CLASSES) == 151 and ADE20K_CLASSES[0] == "background" and ADE20K_CLASSES[1] == "wall"
    for r in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = ADE20KSegmentation(r, "train")
        assert len(ds) == 2 and ds.num_classes == 151
    _, lab = ds[0]
    raw = data["ADE_train_00000001"][1]
    assert (lab[raw == 0] == 255).all()  # 0 = other -> ignored
    np.testing.assert_array_equal(lab[raw != 0], raw[raw != 0])
    assert ds.label_classes(0) == {1, 150}
    assert ds.label_classes(1) == {12}
    val = ADE20KSegmentation(tmp_path, "val")
    assert len(val) == 1 and val.label_classes(0) == {5}
    assert isinstance(load_dataset(tmp_path, "val"), ADE20KSegmentation)
    with pytest.raises(ValueError, match="split"):
        ADE20KSegmentation(tmp_path, "test")


# ------------------------------------------------------------------------------------ errors


def test_missing_root_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        VOCSegmentation(tmp_path / "nope", "train")
    assert "JPEGImages" in str(e.value) and "expected layout" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCSegmentation(tmp_path / "empty", "val")
    with pytest.raises(FileNotFoundError, match="annotations"):
        ADE20KSegmentation(tmp_path / "empty", "train")
    with pytest.raises(FileNotFoundError, match="expected layout"):
        load_dataset(tmp_path / "nope", "train")


def test_malformed_layouts(tmp_path):
    write_voc(tmp_path, {"a": [1]}, {"b": [2]}, aug=False)
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        SegmentationFolder(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"test\.txt.*available splits"):
        VOCSegmentation(tmp_path, "test")
    (tmp_path / "ImageSets" / "Segmentation" / "bad.txt").write_text("a\nmissing_id\n")
    with pytest.raises(FileNotFoundError, match="missing_id"):
        VOCSegmentation(tmp_path, "bad")
    (tmp_path / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no image"):
        VOCSegmentation(tmp_path, "empty")
    (tmp_path / "classes.txt").write_text("background\n\ncat\n")
    with pytest.raises(ValueError, match="empty line"):
        SegmentationFolder(tmp_path, "train")
    (tmp_path / "classes.txt").write_text("background\ncat\ncat\n")
    with pytest.raises(ValueError, match="duplicate"):
        SegmentationFolder(tmp_path, "train")


def test_text_files_with_bom(tmp_path):
    """classes.txt and split lists saved with a UTF-8 BOM (Windows Notepad) read as plain UTF-8."""
    write_voc(tmp_path, {"a": [1], "b": [2]}, {"c": [2]}, aug=False)
    (tmp_path / "classes.txt").write_bytes("background\r\nchat\r\nch\u00e8vre\r\n".encode("utf-8-sig"))
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_bytes("c\r\n".encode("utf-8-sig"))
    ds = SegmentationFolder(tmp_path, "val")
    assert ds.class_names == ["background", "chat", "ch\u00e8vre"]
    assert len(ds) == 1 and ds.samples[0][1].endswith("c.png")
    assert len(load_dataset(tmp_path, "val")) == 1


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("which", ["classes.txt", "ImageSets/Segmentation/train.txt"])
def test_text_files_not_utf8(tmp_path, which, bom):
    """A Latin-1 text file is a ValueError naming the file and the byte offset (from the file's
    start, BOM included), not a bare UnicodeDecodeError."""
    write_voc(tmp_path, {"a": [1], "b": [2]}, {"c": [2]}, aug=False, classes_txt=["background", "x", "y"])
    content = {"classes.txt": "background\nx\nch\u00e8vre\n", "ImageSets/Segmentation/train.txt": "a\nb\u00e9\n"}
    data = bom + content[which].encode("latin-1")  # e-grave / e-acute: one byte, invalid in UTF-8
    (tmp_path / which).write_bytes(data)
    offset = data.index(b"\xe8" if "classes" in which else b"\xe9")
    with pytest.raises(ValueError) as e:
        SegmentationFolder(tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / which) in msg and "UTF-8" in msg and f"offset {offset}" in msg
    assert not isinstance(e.value, UnicodeDecodeError)


def test_label_value_outside_classes_is_lazy(tmp_path):
    write_voc(tmp_path, {"good": [1], "bad": [1]}, {"v": [1]}, aug=False, classes_txt=["background", "a", "b"])
    bad = np.zeros((12, 16), np.uint8)
    bad[3, 4] = 7
    save_palette_png(tmp_path / "SegmentationClass" / "bad.png", bad)
    ds = SegmentationFolder(tmp_path, "train")  # construction does not read labels
    ds[0]
    for fn in (
        lambda: ds[1],
        lambda: ds.label_classes(1),
        lambda: image_classes(ds),
        lambda: image_classes(ds, workers=2),
    ):
        with pytest.raises(ValueError) as e:
            fn()
        assert "bad.png" in str(e.value) and "value 7" in str(e.value)


def test_check_labels_before_training(tmp_path):
    """check_labels reads every label of a split up front: a bad value is a ValueError naming the
    file and the value; a clean split is cached so that the next check reads no label."""
    names = ["background", "a", "b", "c", "d", "e"]
    write_voc(tmp_path, {"t": [1]}, {"v1": [1, 255], "v2": [2, 5], "v3": [3]}, aug=False, classes_txt=names)
    bad = np.zeros((12, 16), np.uint8)
    bad[2, 3] = 200
    bad[5, 6] = 4
    label = tmp_path / "SegmentationClass" / "v2.png"
    save_palette_png(label, bad)
    cache = tmp_path / "cache"
    val = SegmentationFolder(tmp_path, "val")  # construction reads no label
    for cache_dir in (None, cache):
        with pytest.raises(ValueError) as e:
            check_labels(val, cache_dir=cache_dir)
        assert "v2.png" in str(e.value) and "200" in str(e.value)
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached for a bad split
    bad[2, 3] = 5
    save_palette_png(label, bad)
    _touch_later(label)
    assert check_labels(val, cache_dir=cache) is None
    again = SegmentationFolder(tmp_path, "val")
    again.label_classes = None  # type: ignore[assignment]  # the second check reads no label
    assert check_labels(again, cache_dir=cache) is None
    assert image_classes(again, cache) == [{1}, {4, 5}, {3}]


def test_ade_value_outside_classes(tmp_path):
    write_ade(tmp_path, {"a": [3]}, {"b": [4]})
    ann = tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "a.png"
    arr = np.full((10, 14), 151, np.uint8)
    Image.fromarray(arr).save(ann)
    ds = ADE20KSegmentation(tmp_path, "train")
    with pytest.raises(ValueError, match=r"a\.png.*value 151"):
        ds.label_classes(0)


def test_unreadable_files(tmp_path):
    write_voc(tmp_path, {"a": [1], "b": [2]}, {"c": [1]}, aug=False)
    (tmp_path / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg at all")
    ds = VOCSegmentation(tmp_path, "train")
    with pytest.raises(ValueError, match=r"b\.jpg"):
        ds[1]
    (tmp_path / "SegmentationClass" / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"a\.png"):
        ds.label_classes(0)
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(tmp_path / "SegmentationClass" / "a.png")
    with pytest.raises(ValueError, match=r"a\.png.*mode 'RGB'"):
        ds[0]
    save_palette_png(tmp_path / "SegmentationClass" / "a.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match="5x5"):
        ds[0]


# ------------------------------------------------------------------------ caching and subset


def test_step_indices_cache(tmp_path):
    names = ["background", "a", "b", "c", "d"]
    root = tmp_path / "data"
    train = {f"i{k}": sorted(c) or [0] for k, c in enumerate(IMAGE_CLASSES)}
    write_voc(root, train, {"v": [1]}, aug=False, classes_txt=names)
    ds = SegmentationFolder(root, "train")
    task = parse_task("2-1", 5)
    cache = tmp_path / "run" / "cache"
    before = sorted(p.name for p in root.rglob("*"))
    assert step_indices(ds, task, 1, False, cache) == [1, 2, 3, 7]
    assert step_indices(ds, task, 1, True, cache) == [1, 2, 7]
    assert [sorted(c) for c in image_classes(ds, workers=2)] == [sorted(c) for c in IMAGE_CLASSES]
    assert step_indices(ds, task, 0, True) == [0]  # no cache dir: computed, nothing written
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written into the dataset
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and not any(f.endswith(".tmp") for f in files)
    classes_file = [f for f in files if f.endswith(".classes.json")][0]
    assert json.loads((cache / classes_file).read_text())["classes"] == [sorted(c) for c in IMAGE_CLASSES]

    # a second dataset object reuses the cache without reading any label
    ds2 = SegmentationFolder(root, "train")
    ds2.label_classes = None  # type: ignore[assignment]
    assert step_indices(ds2, task, 1, True, cache) == [1, 2, 7]
    assert step_indices(ds2, task, 2, False, cache) == [3, 4, 6]  # from the cached class sets
    # a corrupt cache file is recomputed
    for f in cache.iterdir():
        f.write_text("{broken")
    assert step_indices(ds, task, 1, False, cache) == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="classes"):
        step_indices(ds, parse_task("15-1", 21), 0, False, cache)


def _touch_later(path, seconds: int = 10) -> None:
    """Move the mtime of ``path`` forward (a rewrite within the filesystem's mtime resolution
    would otherwise keep it)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_cache_follows_label_content(tmp_path):
    """Rewriting a label file (same name, new classes) invalidates the cached class lists."""
    names = ["background", "a", "b", "c", "d"]
    root = tmp_path / "data"
    train = {f"i{k}": sorted(c) or [0] for k, c in enumerate(IMAGE_CLASSES)}
    write_voc(root, train, {"v": [1]}, aug=False, classes_txt=names)
    ds = SegmentationFolder(root, "train")
    task = parse_task("2-1", 5)
    cache = tmp_path / "cache"
    assert step_indices(ds, task, 1, False, cache) == [1, 2, 3, 7]
    label = root / "SegmentationClass" / "i0.png"  # {1} -> {3}
    save_palette_png(label, np.full((12, 16), 3, np.uint8))
    _touch_later(label)
    assert step_indices(ds, task, 1, False, cache) == [0, 1, 2, 3, 7]
    assert image_classes(SegmentationFolder(root, "train"), cache)[0] == {3}
    # a label file gone is reported by the reader, not by the fingerprint
    label.unlink()
    with pytest.raises(FileNotFoundError, match=r"label file .*i0\.png is missing"):
        step_indices(ds, task, 2, False, cache)


def test_fingerprint_covers_label_stat_for_every_reader(tmp_path):
    write_voc(tmp_path / "voc", {"a": [1], "b": [2]}, {"c": [3]}, aug=False)
    write_ade(tmp_path / "ade", {"a": [3], "b": [4]}, {"c": [5]})
    voc = VOCSegmentation(tmp_path / "voc", "train")
    ade = ADE20KSegmentation(tmp_path / "ade", "train")
    for ds in (voc, ade):
        fp = ds.fingerprint()
        assert ds.fingerprint() == fp  # stable while nothing changes
        _touch_later(ds.samples[1][1])
        assert ds.fingerprint() != fp, type(ds).__name__


def test_incremental_subset(tmp_path):
    names = ["background", "a", "b", "c", "d"]
    data = write_voc(tmp_path, {"p": [1, 3, 255], "q": [4, 2]}, {"v": [1]}, aug=False, classes_txt=names)
    ds = SegmentationFolder(tmp_path, "train")
    task = parse_task("2-1", 5)
    sub = IncrementalSubset(ds, [1, 0], train_lut(task, 1))
    assert len(sub) == 2
    x, y = sub[1]
    assert x.shape == (3, 12, 16) and x.dtype == torch.float32
    assert y.shape == (12, 16) and y.dtype == torch.int64
    raw = torch.from_numpy(data["p"][1]).long()
    assert torch.equal(y, train_lut(task, 1)[raw])
    assert set(y.unique().tolist()) == {0, 3, 255}
    ev = IncrementalSubset(ds, range(len(ds)), eval_lut(task, 0), EvalTransform())
    assert set(ev[1][1].unique().tolist()) <= {0, 2, 255}
    with pytest.raises(ValueError, match="outside"):
        IncrementalSubset(ds, [5])
    loader = torch.utils.data.DataLoader(sub, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, 3, 12, 16) and yb.shape == (2, 12, 16)


# ------------------------------------------------------------------------------- transforms


def _pair(h=40, w=50, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    lab = np.zeros((h, w), np.uint8)
    lab[5:20, 10:30] = 3
    lab[25:, 35:] = 7
    lab[0, :] = 255
    return img, lab


def test_train_transform_shapes_and_values():
    img, lab = _pair()
    tr = TrainTransform(32)
    seen = set()
    for _ in range(40):  # the 255 row is inside ~37% of the windows (no padding any more)
        x, y = tr(img, lab)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (32, 32) and y.dtype == torch.int64
        vals = set(y.unique().tolist())
        assert vals <= {0, 3, 7, 255}
        seen |= vals
    assert {0, 3, 7, 255} <= seen


def test_train_transform_identity_window_and_flip():
    img, lab = _pair(32, 32)
    tr = TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    full = torch.from_numpy(lab).long()
    flips = 0
    for _ in range(16):
        x, y = tr(img, lab)
        if torch.equal(y, full):
            torch.testing.assert_close(x, to_tensor(img))
        else:
            assert torch.equal(y, full.flip(-1))
            flips += 1
    assert 0 < flips < 16


def test_train_transform_zoom_out_falls_back_to_the_image():
    # a window larger than the image never fits: the release's central-crop fallback (whole image,
    # its aspect ratio 1 is in range), resized to the crop; nothing is padded
    img, lab = _pair(32, 32)
    tr = TrainTransform(64, scale=(2.0, 2.0), ratio=(1.0, 1.0), flip=False)
    x, y = tr(img, lab)
    assert tr.sample_window(32, 32) == ((0, 0, 32, 32), False)
    want = torch.from_numpy(lab).long().repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(y, want)


def test_train_transform_reproducible():
    img, lab = _pair()
    tr = TrainTransform(24)
    torch.manual_seed(123)
    a = [tr(img, lab) for _ in range(3)]
    torch.manual_seed(123)
    b = [tr(img, lab) for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(a[0][1], t[1]) for t in a[1:])


def test_normalisation_and_eval_transform():
    img, lab = _pair()
    x, y = EvalTransform()(img, lab)
    arr = np.asarray(img, np.float32) / 255.0
    expected = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(lab).long())
    xs, ys = EvalTransform(size=20)(img, lab)
    assert xs.shape == (3, 20, 20) and ys.shape == (20, 20)
    assert set(ys.unique().tolist()) <= {0, 3, 7, 255}
    images, labels = pad_collate([(x, y), (xs, ys)])
    assert images.shape == (2, 3, 40, 50) and labels.shape == (2, 40, 50)
    assert (labels[1, 20:, :] == 255).all() and (images[1, :, 20:, :] == 0).all()


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=6):
        self.items = [_pair(seed=i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_seeded_dataloader_workers_reproducible():
    sub = IncrementalSubset(_Pairs(), range(6), None, TrainTransform(16))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(sub, batch_size=3, num_workers=2, generator=g, shuffle=True)
        return [b for b in loader]

    a, b, c = run(5), run(5), run(6)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


# -------------------------------------------------------------------------------- synthetic


def test_synthetic_layout_and_content(tmp_path):
    k = 5
    root = make_synthetic(tmp_path / "syn", classes=k, images=15, size=32, seed=3, val_images=5)
    assert root == tmp_path / "syn"
    for p in (
        "JPEGImages",
        "SegmentationClass",
        "ImageSets/Segmentation/train.txt",
        "ImageSets/Segmentation/val.txt",
        "classes.txt",
    ):
        assert (root / p).exists(), p
    names = (root / "classes.txt").read_text().splitlines()
    assert names[0] == "background" and len(names) == k + 1 and len(set(names)) == k + 1
    assert not list(tmp_path.glob(".syn.tmp-*"))
    for split, n in (("train", 15), ("val", 5)):
        ds = SegmentationFolder(root, split)
        assert len(ds) == n and ds.num_classes == k + 1
        present = set()
        for i in range(n):
            img, lab = ds[i]
            assert img.size == (32, 32) and lab.shape == (32, 32)
            assert set(np.unique(lab).tolist()) <= set(range(k + 1))
            present |= ds.label_classes(i)
            with Image.open(ds.samples[i][1]) as im:
                assert im.mode == "P"
        assert present == set(range(1, k + 1))  # every class appears in each split
    # the background dominates but objects are not tiny
    labs = np.stack([SegmentationFolder(root, "train")[i][1] for i in range(15)])
    assert 0.4 < (labs == 0).mean() < 0.97


def test_synthetic_deterministic(tmp_path):
    kw = dict(classes=4, images=8, size=24, val_images=4)
    a = make_synthetic(tmp_path / "a", seed=1, **kw)
    b = make_synthetic(tmp_path / "b", seed=1, **kw)
    c = make_synthetic(tmp_path / "c", seed=2, **kw)
    da, db, dc = (SegmentationFolder(r, "train") for r in (a, b, c))
    diff = 0
    for i in range(8):
        (ia, la), (ib, lb), (ic, _) = da[i], db[i], dc[i]
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and np.array_equal(la, lb)
        diff += not np.array_equal(np.asarray(ia), np.asarray(ic))
    assert diff == 8
    assert (a / "classes.txt").read_text() == (b / "classes.txt").read_text()
    # regenerating over a synthetic dataset replaces it; a foreign folder is refused
    make_synthetic(a, seed=2, **kw)
    assert np.array_equal(np.asarray(SegmentationFolder(a, "train")[0][0]), np.asarray(dc[0][0]))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path / "mine", **kw)
    with pytest.raises(ValueError, match="images"):
        make_synthetic(tmp_path / "d", classes=6, images=3)


def test_synthetic_jpeg_and_ignore_border(tmp_path):
    root = make_synthetic(
        tmp_path / "s", classes=3, images=6, size=32, val_images=0, image_format="jpg", ignore_border=True
    )
    ds = SegmentationFolder(root, "train")
    assert ds.samples[0][0].endswith(".jpg")
    vals = set()
    for i in range(len(ds)):
        vals |= set(np.unique(ds[i][1]).tolist())
    assert 255 in vals and vals <= {0, 1, 2, 3, 255}
    assert (root / "ImageSets" / "Segmentation" / "val.txt").read_text() == ""


def test_synthetic_fast(tmp_path):
    import time

    t = time.perf_counter()
    make_synthetic(tmp_path / "f", classes=6, images=100, size=64, val_images=20)
    assert time.perf_counter() - t < 10.0  # ~0.5 s on a laptop core; generous for loaded CI
