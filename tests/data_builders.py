"""Builders of tiny on-disk datasets in the real VOC and ADE20K layouts (for the data tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from lskd.data.synthetic import voc_palette


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """np.uint8 [h, w, 3]."""
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_label(rng: np.random.Generator, h: int, w: int, values: Sequence[int]) -> np.ndarray:
    """np.uint8 [h, w] with rectangles of the given values on 0 (every value appears)."""
    lab = np.zeros((h, w), np.uint8)
    for k, v in enumerate(values):
        y0 = int(rng.integers(0, h - 2))
        x0 = int(rng.integers(0, w - 2))
        lab[y0 : y0 + 2 + int(rng.integers(0, 4)), x0 : x0 + 2 + int(rng.integers(0, 4))] = v
    # make sure every value survives the overlaps
    for k, v in enumerate(values):
        lab[k % h, (k // h) % w] = v
    return lab


def save_palette_png(path: Path, label: np.ndarray) -> None:
    """Save a class-index label as a palette ("P") PNG with the VOC colour map, as VOC does."""
    im = Image.fromarray(label.astype(np.uint8))
    im.putpalette(voc_palette())
    assert im.mode == "P"
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_voc(
    root: Path,
    train: Dict[str, Sequence[int]],
    val: Dict[str, Sequence[int]],
    aug: bool = True,
    size: Tuple[int, int] = (12, 16),
    seed: int = 0,
    classes_txt: Optional[List[str]] = None,
    image_ext: str = ".jpg",
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Write a VOC-layout dataset; ``train``/``val`` map image id -> label values it contains.

    With ``aug``: train labels in SegmentationClassAug/ + train_aug.txt (and a shorter train.txt
    listing only the first train id), val labels in SegmentationClass/ only (as in the real
    SBD-augmented set, where some files live only in one of the two folders).
    Returns id -> (image uint8 [H, W, 3], label uint8 [H, W]).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    out = {}
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("val", val)):
        for sid, values in items.items():
            img = random_image(rng, h, w)
            lab = random_label(rng, h, w, values)
            fmt = {"quality": 100} if image_ext == ".jpg" else {}
            Image.fromarray(img).save(root / "JPEGImages" / f"{sid}{image_ext}", **fmt)
            folder = "SegmentationClassAug" if aug and split == "train" else "SegmentationClass"
            save_palette_png(root / folder / f"{sid}.png", lab)
            out[sid] = (img, lab)
    ids_train = list(train)
    if aug:
        (sets / "train_aug.txt").write_text("".join(i + "\n" for i in ids_train))
        (sets / "train.txt").write_text(ids_train[0] + "\n")
    else:
        (sets / "train.txt").write_text("".join(i + "\n" for i in ids_train))
    (sets / "val.txt").write_text("".join(i + "\n" for i in val))
    if classes_txt is not None:
        (root / "classes.txt").write_text("".join(n + "\n" for n in classes_txt))
    return out


def write_ade(
    root: Path, train: Dict[str, Sequence[int]], val: Dict[str, Sequence[int]], size=(10, 14), seed: int = 0
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Write ``root/ADEChallengeData2016`` with grey PNG annotations holding the raw values given
    (0 = other). Returns id -> (image, raw annotation)."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    out = {}
    for split, items in (("training", train), ("validation", val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for sid, values in items.items():
            img = random_image(rng, *size)
            lab = random_label(rng, size[0], size[1], values)
            Image.fromarray(img).save(base / "images" / split / f"{sid}.jpg", quality=100)
            Image.fromarray(lab).save(base / "annotations" / split / f"{sid}.png")
            out[sid] = (img, lab)
    return out


def count_values(labels: Iterable[np.ndarray]) -> set:
    s: set = set()
    for lab in labels:
        s |= set(np.unique(lab).tolist())
    return s
