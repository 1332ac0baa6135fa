"""Dataset readers (Pascal VOC 2012, ADE20K, any VOC-layout folder) and the incremental subset.

Every reader returns raw samples: ``dataset[i] -> (PIL.Image RGB [H, W], np.uint8 label [H, W])``
with class ids ``0..K-1`` (0 = background) and 255 = ignore. Label values are checked lazily (in
``__getitem__`` and :meth:`SegmentationDataset.label_classes`): a value outside the classes is a
``ValueError`` naming the file and the value. Layout problems are found at construction
(``FileNotFoundError`` / ``ValueError`` whose message shows the expected layout).

Per-image class sets and per-step image lists are cached by :func:`image_classes` /
:func:`step_indices` as JSON files in a cache directory chosen by the caller (next to the run),
never inside the dataset. The cache is keyed by :meth:`SegmentationDataset.fingerprint`, which
covers each label file's size and mtime, so labels rewritten in place are read again.
:func:`check_labels` reads (and checks) every label of a split up front, e.g. the val split
before training, through the same cache.

Text files (classes.txt, the split lists) must be UTF-8; a leading BOM is ignored.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .._io import atomic_open
from .tasks import IGNORE, Task, lut_numpy, select_images

__all__ = [
    "VOC_CLASSES",
    "ADE20K_CLASSES",
    "SegmentationDataset",
    "SegmentationFolder",
    "VOCSegmentation",
    "ADE20KSegmentation",
    "IncrementalSubset",
    "load_dataset",
    "image_classes",
    "step_indices",
    "check_labels",
]

PathLike = Union[str, os.PathLike]

VOC_CLASSES: List[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip

# The 150 classes of the ADE20K SceneParsing benchmark (objectInfo150), ids 1..150; id 0 is the
# incremental background channel (raw annotation 0 = "other" is ignored).
ADE20K_CLASSES: List[str] = ["background"] + [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]  # fmt: skip

VOC_LAYOUT = """expected layout (Pascal VOC):
  ROOT/JPEGImages/<id>.jpg (or .png)
  ROOT/SegmentationClassAug/<id>.png  or  ROOT/SegmentationClass/<id>.png
      (class index per pixel, 0 = background, 255 = ignore; palette or grey PNG)
  ROOT/ImageSets/Segmentation/<split>.txt   (one <id> per line; train_aug.txt, train.txt, val.txt)
  ROOT/classes.txt   (one class name per line, background first; required unless the class
                      names are given, e.g. by VOCSegmentation)
ROOT may also be VOCdevkit/ or the folder holding VOCdevkit/ (VOCSegmentation only)."""

ADE_LAYOUT = """expected layout (ADE20K SceneParsing):
  ROOT/images/training/*.jpg      ROOT/annotations/training/*.png
  ROOT/images/validation/*.jpg    ROOT/annotations/validation/*.png
  (annotation 0 = other/ignored, 1..150 = the classes)
ROOT is ADEChallengeData2016/ or the folder holding it."""

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _read_text_lines(path: Path, what: str) -> List[str]:
    """Lines of the UTF-8 text file ``path`` (a leading BOM dropped; \\n, \\r\\n or \\r endings).

    ``what`` says what the file holds, for the messages. Raises FileNotFoundError when the file
    cannot be read and ValueError naming the file and the byte offset when it is not UTF-8.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read {what} from {path}: {e}") from e
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        at = skip + e.start
        raise ValueError(
            f"{path}: byte 0x{data[at]:02x} at offset {at} is not UTF-8; {what} must be saved as UTF-8 text"
        ) from e


def _read_classes_txt(path: Path) -> List[str]:
    """Class names of ``path``, one per line, background first (see :func:`_read_text_lines`)."""
    lines = _read_text_lines(path, "the class names")
    names = [ln.strip() for ln in lines]
    while names and not names[-1]:
        names.pop()
    if any(not n for n in names):
        raise ValueError(f"{path}: empty line among the class names (one name per line, background first)")
    return names


def _check_class_names(names: Sequence[str], where: str) -> List[str]:
    names = [str(n) for n in names]
    if len(names) < 2:
        raise ValueError(f"{where}: need the background and at least one class, got {names}")
    if len(names) > 255:
        raise ValueError(f"{where}: at most 255 classes (255 is the ignore label), got {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: duplicate class names {dup}")
    return names


def _list_stems(folder: Path) -> dict:
    """stem -> file name of the image-like files directly in ``folder`` (first extension wins)."""
    out: dict = {}
    try:
        entries = sorted(os.listdir(folder))
    except FileNotFoundError:
        return out
    for name in entries:
        stem, ext = os.path.splitext(name)
        if ext in _IMAGE_EXTS and stem not in out:
            out[stem] = name
    return out


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: a list of (image file, label file) pairs and the class names.

    ``raw_map`` ([256] uint8) maps the stored label values to class ids (identity for VOC; for
    ADE20K 0 -> 255); ``raw_valid`` ([256] bool) says which stored values are allowed.
    Subclasses fill ``root``, ``split``, ``class_names``, ``samples``, ``raw_map``, ``raw_valid``.
    """

    root: Path
    split: str
    class_names: List[str]
    samples: List[Tuple[str, str]]
    raw_map: np.ndarray
    raw_valid: np.ndarray

    def _set_classes(self, names: Sequence[str], ignore_raw_zero: bool = False) -> None:
        self.class_names = list(names)
        k = len(self.class_names)
        self.raw_map = np.arange(256, dtype=np.uint8)
        self.raw_valid = np.zeros(256, dtype=bool)
        self.raw_valid[:k] = True
        self.raw_valid[IGNORE] = True
        if ignore_raw_zero:
            self.raw_map[0] = IGNORE

    @property
    def num_classes(self) -> int:
        """K: number of class ids, background included."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes})"
        )

    # -- reading ------------------------------------------------------------------------------
    def load_image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image (ValueError naming the file if it cannot be read)."""
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image file {path} is missing") from e
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"cannot read image file {path}: {e}") from e

    def load_label(self, i: int) -> np.ndarray:
        """Label ``i`` as np.uint8 [H, W] class ids (255 = ignore), values checked."""
        path = self.samples[i][1]
        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "L"):
                    raw = np.array(im, dtype=np.uint8)
                elif im.mode in ("I", "I;16", "I;16B", "I;16L"):
                    wide = np.array(im)
                    bad = wide[wide > 255]
                    if bad.size:
                        raise ValueError(
                            f"label file {path} has value {int(bad.flat[0])}, outside the classes "
                            f"0..{self.num_classes - 1} (and 255 = ignore)"
                        )
                    raw = wide.astype(np.uint8)
                else:
                    raise ValueError(
                        f"label file {path} has mode {im.mode!r}; expected a single-channel class-index "
                        f"PNG (palette 'P' or grey 'L'), not a colour rendering"
                    )
        except FileNotFoundError as e:
            raise FileNotFoundError(f"label file {path} is missing") from e
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read label file {path}: {e}") from e
        invalid = ~self.raw_valid[raw]
        if invalid.any():
            values = sorted(set(np.unique(raw[invalid]).tolist()))
            raise ValueError(
                f"label file {path} has value {values[0]}"
                + (f" (all bad values: {values[:10]})" if len(values) > 1 else "")
                + f", outside the classes ({self._valid_text()})"
            )
        return self.raw_map[raw]

    def _valid_text(self) -> str:
        return f"0..{self.num_classes - 1} and 255 = ignore"

    def __getitem__(self, i: int) -> Tuple[Image.Image, np.ndarray]:
        """``(PIL RGB image [H, W], np.uint8 label [H, W])``, raw (no transform)."""
        image = self.load_image(i)
        label = self.load_label(i)
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"label file {self.samples[i][1]} is {label.shape[1]}x{label.shape[0]} but image file "
                f"{self.samples[i][0]} is {image.width}x{image.height} (width x height)"
            )
        return image, label

    def label_classes(self, i: int) -> Set[int]:
        """Set of class ids present in label ``i``, without 0 and 255 (values checked)."""
        label = self.load_label(i)
        counts = np.bincount(label.ravel(), minlength=256)
        return {int(c) for c in np.flatnonzero(counts) if c not in (0, IGNORE)}

    def fingerprint(self) -> str:
        """Hex digest of what the per-image class lists depend on: type, root, split, class names,
        the (image, label) file list, and each label file's size and mtime (``st_mtime_ns``), so
        that a label rewritten in place changes it. One ``stat`` per label, no file is read."""
        h = hashlib.sha1()
        h.update(
            json.dumps([type(self).__name__, str(Path(self.root).resolve()), self.split, self.class_names]).encode()
        )
        for img, lbl in self.samples:
            h.update(b"\0".join((os.fsencode(img), os.fsencode(lbl), _stat_key(lbl))) + b"\n")
        return h.hexdigest()


def _stat_key(path: str) -> bytes:
    """``b"<size>:<mtime_ns>"`` of ``path``; ``b"-"`` when it cannot be stat'ed (the reader then
    reports the missing file)."""
    try:
        st = os.stat(path)
    except OSError:
        return b"-"
    return b"%d:%d" % (st.st_size, st.st_mtime_ns)


class SegmentationFolder(SegmentationDataset):
    """Any dataset in the Pascal VOC layout (see ``VOC_LAYOUT``).

    Args:
        root: the folder holding JPEGImages/, SegmentationClass[Aug]/, ImageSets/Segmentation/.
        split: name of the list file ``ImageSets/Segmentation/<split>.txt``.
        class_names: class names, background first; default: ``root/classes.txt``.

    Labels are read from SegmentationClassAug/ when the file is there, else SegmentationClass/.
    A list line may be an id (``2007_000032``) or a pair of paths relative to root
    (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``, as some train_aug.txt files are).
    """

    layout = VOC_LAYOUT

    def __init__(self, root: PathLike, split: str, class_names: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        self.split = str(split)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder\n{self.layout}")
        if class_names is None:
            txt = self.root / "classes.txt"
            if not txt.is_file():
                raise FileNotFoundError(f"{self.root}: no classes.txt and no class names given\n{self.layout}")
            class_names = _read_classes_txt(txt)
            where = str(txt)
        else:
            where = f"class names of {self.root}"
        self._set_classes(_check_class_names(class_names, where))
        self.samples = self._find_samples(self._split_file())

    def _split_file(self) -> Path:
        sets = self.root / "ImageSets" / "Segmentation"
        path = sets / f"{self.split}.txt"
        if not path.is_file():
            have = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
            raise FileNotFoundError(f"split list {path} not found (available splits: {have or 'none'})\n{self.layout}")
        return path

    def _find_samples(self, list_file: Path) -> List[Tuple[str, str]]:
        img_dir = self.root / "JPEGImages"
        label_dirs = [self.root / "SegmentationClassAug", self.root / "SegmentationClass"]
        if not img_dir.is_dir() or not any(d.is_dir() for d in label_dirs):
            missing = [str(d) for d in [img_dir] if not d.is_dir()]
            if not any(d.is_dir() for d in label_dirs):
                missing.append(f"{label_dirs[0]} or {label_dirs[1]}")
            raise FileNotFoundError(f"{self.root}: missing {', '.join(missing)}\n{self.layout}")
        images = _list_stems(img_dir)
        labels = [_list_stems(d) for d in label_dirs]
        samples: List[Tuple[str, str]] = []
        missing_files: List[str] = []
        for n, line in enumerate(_read_text_lines(list_file, "the split list"), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 2:  # "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
                img = self.root / parts[0].lstrip("/")
                lbl = self.root / parts[1].lstrip("/")
                for p in (img, lbl):
                    if not p.is_file():
                        missing_files.append(str(p))
                samples.append((str(img), str(lbl)))
                continue
            if len(parts) != 1:
                raise ValueError(f"{list_file}:{n}: expected an image id or two paths, got {line!r}")
            sid = parts[0]
            if sid not in images:
                missing_files.append(str(img_dir / f"{sid}.jpg"))
                continue
            lbl_path = None
            for d, names in zip(label_dirs, labels):
                if sid in names and names[sid].lower().endswith(".png"):
                    lbl_path = d / names[sid]
                    break
            if lbl_path is None:
                missing_files.append(f"{label_dirs[0] / (sid + '.png')} (or {label_dirs[1].name}/)")
                continue
            samples.append((str(img_dir / images[sid]), str(lbl_path)))
        if missing_files:
            more = f" and {len(missing_files) - 5} more" if len(missing_files) > 5 else ""
            raise FileNotFoundError(
                f"{list_file} lists files that do not exist: {', '.join(missing_files[:5])}{more}\n{self.layout}"
            )
        if not samples:
            raise ValueError(f"{list_file} lists no image\n{self.layout}")
        return samples


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return root


class VOCSegmentation(SegmentationFolder):
    """Pascal VOC 2012 (21 classes). ``split="train"`` reads train_aug.txt when present (the
    10,582-image augmented set of SBD), else train.txt; other splits read ``<split>.txt``."""

    def __init__(self, root: PathLike, split: str = "train") -> None:
        root = _voc_root(Path(root))
        if split == "train" and (root / "ImageSets" / "Segmentation" / "train_aug.txt").is_file():
            split = "train_aug"
        super().__init__(root, split, VOC_CLASSES)


class ADE20KSegmentation(SegmentationDataset):
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes as ids 1..150.

    Annotation value 0 ("other") becomes 255 (ignored); id 0 is the background channel of the
    incremental setting (docs/MATHEMATICS.md §1.1), which labels the pixels of the classes not in the current step.
    ``split``: ``"train"``/``"training"`` or ``"val"``/``"validation"``.
    """

    layout = ADE_LAYOUT
    _SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

    def __init__(self, root: PathLike, split: str = "train") -> None:
        root = Path(root)
        if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root = root
        if split not in self._SPLITS:
            raise ValueError(f"ADE20K split must be one of {sorted(self._SPLITS)}, got {split!r}")
        self.split = split
        sub = self._SPLITS[split]
        img_dir, ann_dir = root / "images" / sub, root / "annotations" / sub
        if not root.is_dir():
            raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder\n{self.layout}")
        for d in (img_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{root}: missing {d}\n{self.layout}")
        self._set_classes(ADE20K_CLASSES, ignore_raw_zero=True)
        images = _list_stems(img_dir)
        anns = _list_stems(ann_dir)
        if not images:
            raise ValueError(f"{img_dir} holds no image\n{self.layout}")
        missing = [f"{ann_dir / (s + '.png')}" for s in images if s not in anns]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"annotations missing: {', '.join(missing[:5])}{more}\n{self.layout}")
        self.samples = [(str(img_dir / images[s]), str(ann_dir / anns[s])) for s in sorted(images)]

    def _valid_text(self) -> str:
        return "stored values 0..150 (0 = ignored)"


def load_dataset(root: PathLike, split: str, kind: str = "auto") -> SegmentationDataset:
    """Open a dataset by kind: ``"voc"``, ``"ade20k"``, ``"folder"`` (VOC layout + classes.txt) or
    ``"auto"`` (ADE20K layout -> ADE20K; a classes.txt -> folder; else VOC).

    ``split`` is ``"train"`` or ``"val"`` for every kind (VOC: train -> train_aug when present).
    """
    root = Path(root)
    kind = kind.lower()
    if kind == "auto":
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset root {root} does not exist or is not a folder\n{VOC_LAYOUT}\nor\n{ADE_LAYOUT}"
            )
        if (root / "images").is_dir() and (root / "annotations").is_dir() or (root / "ADEChallengeData2016").is_dir():
            kind = "ade20k"
        elif (root / "classes.txt").is_file():
            kind = "folder"
        else:
            kind = "voc"
    if kind in ("voc", "pascal", "voc2012"):
        return VOCSegmentation(root, split)
    if kind in ("ade", "ade20k"):
        return ADE20KSegmentation(root, split)
    if kind == "folder":
        return SegmentationFolder(root, split)
    raise ValueError(f"unknown dataset kind {kind!r} (voc, ade20k, folder or auto)")


# ------------------------------------------------------------------------------------ caching


def _atomic_write_json(path: Path, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f)


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _cache_prefix(dataset: SegmentationDataset) -> Tuple[str, str]:
    fp = dataset.fingerprint()
    return fp, f"{_safe(type(dataset).__name__)}-{_safe(dataset.split)}-{fp[:12]}"


def image_classes(
    dataset: SegmentationDataset,
    cache_dir: Optional[PathLike] = None,
    progress: bool = False,
    workers: Optional[int] = None,
) -> List[Set[int]]:
    """Per image, the set of class ids in its label (without 0 and 255).

    With ``cache_dir`` the result is cached in ``cache_dir/<dataset>-<split>-<hash>.classes.json``
    (written atomically; reused when the dataset fingerprint matches, i.e. same files with the
    same label sizes and mtimes: see :meth:`SegmentationDataset.fingerprint`).
    Reading every label is the slow part (~10k PNGs for VOC train_aug); it runs on ``workers``
    threads (default ``min(8, cpu_count)``; 1 = serial). A bad label raises its ValueError.
    """
    path = None
    fp, prefix = _cache_prefix(dataset)
    if cache_dir is not None:
        path = Path(cache_dir) / f"{prefix}.classes.json"
        cached = _read_json(path)
        if (
            isinstance(cached, dict)
            and cached.get("fingerprint") == fp
            and len(cached.get("classes", ())) == len(dataset)
        ):
            return [set(c) for c in cached["classes"]]
    n_workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if n_workers > 1 and (workers is not None or len(dataset) > 64):
        # PNG decoding releases the GIL: threads give a near-linear speed-up on large datasets
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n_workers) as pool:
            it = pool.map(dataset.label_classes, range(len(dataset)), chunksize=16)
            if progress:
                from tqdm import tqdm

                it = tqdm(it, total=len(dataset), desc=f"label classes of {dataset.split}", leave=False)
            classes = list(it)
    else:
        it = range(len(dataset))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"label classes of {dataset.split}", leave=False)
        classes = [dataset.label_classes(i) for i in it]
    if path is not None:
        _atomic_write_json(path, {"fingerprint": fp, "classes": [sorted(c) for c in classes]})
    return classes


def step_indices(
    dataset: SegmentationDataset,
    task: Task,
    step: int,
    disjoint: bool,
    cache_dir: Optional[PathLike] = None,
    progress: bool = False,
) -> List[int]:
    """Training image indices of ``step`` (:func:`~lskd.data.tasks.select_images`), cached.

    Caches the per-image class sets (see :func:`image_classes`) and the list of the step in
    ``cache_dir/<dataset>-<split>-<hash>.<task>.step<t>.<overlap|disjoint>.json`` (atomic writes).
    A cached list is used only when the dataset fingerprint and the task's steps match.
    """
    if task.num_classes != dataset.num_classes:
        raise ValueError(
            f"task {task.name!r} was built for {task.num_classes} classes but the dataset has {dataset.num_classes}"
        )
    mode = "disjoint" if disjoint else "overlap"
    path = None
    fp, prefix = _cache_prefix(dataset)
    key = {"fingerprint": fp, "task": task.to_dict(), "step": int(step), "disjoint": bool(disjoint)}
    if cache_dir is not None:
        path = Path(cache_dir) / f"{prefix}.{_safe(task.name)}.step{step}.{mode}.json"
        cached = _read_json(path)
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
            return [int(i) for i in cached["indices"]]
    indices = select_images(image_classes(dataset, cache_dir, progress), task, step, disjoint)
    if path is not None:
        _atomic_write_json(path, {**key, "indices": indices})
    return indices


def check_labels(dataset: SegmentationDataset, cache_dir: Optional[PathLike] = None, progress: bool = False) -> None:
    """Read every label of ``dataset`` once and check it, e.g. the val split before training
    (evaluation would otherwise meet a bad label only after step 0).

    Checks, per label file: it exists, it is a single-channel class-index PNG (mode P/L, or 16-bit
    grey), and every value is allowed (``dataset.raw_valid``: class ids ``0..K-1`` and 255 for
    VOC / folder datasets, stored values 0..150 and 255 for ADE20K). The first bad file in
    dataset order raises its ValueError (FileNotFoundError when missing), which names the file and
    the bad value(s). Image files are not opened (nor label/image sizes compared).

    This is :func:`image_classes` with its result dropped: with ``cache_dir`` a clean result is
    cached, so a second check (and :func:`step_indices` on the same split) only ``stat``s the
    label files. Nothing is cached for a split with a bad label.
    """
    image_classes(dataset, cache_dir, progress)


# ------------------------------------------------------------------------------------- subset


class IncrementalSubset(torch.utils.data.Dataset):
    """The images ``indices`` of ``dataset`` with labels remapped by ``lut`` and transformed.

    Args:
        dataset: a raw dataset (``dataset[i] -> (PIL image, np.uint8 label)``).
        indices: the images to use (e.g. from :func:`step_indices`, or ``range(len(dataset))``).
        lut: ``[256]`` int tensor/array, ``new = lut[old]`` (:func:`~lskd.data.tasks.train_lut`,
            :func:`~lskd.data.tasks.eval_lut`), applied before the transform (so padding stays 255).
        transform: ``transform(image, label) -> (float32 [3, H, W], int64 [H, W])``; default
            :class:`~lskd.data.transforms.EvalTransform` (normalisation only).

    ``subset[k] -> (image tensor [3, H, W] float32 normalised, label tensor [H, W] int64)``.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        indices: Sequence[int],
        lut: Union[torch.Tensor, np.ndarray, None] = None,
        transform: Optional[Callable] = None,
    ) -> None:
        from .transforms import EvalTransform

        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        n = len(dataset)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices {bad[:5]} are outside 0..{n - 1} of {dataset!r}")
        self.lut = lut_numpy(lut) if lut is not None else np.arange(256, dtype=np.uint8)
        self.transform = transform if transform is not None else EvalTransform()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[self.indices[k]]
        return self.transform(image, self.lut[label])
