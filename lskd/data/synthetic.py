"""A procedural segmentation benchmark written in the Pascal VOC layout (``lskd make-synthetic``).

Purpose: a dataset on which a tiny DeepLab learns real appearance within a CPU demo, and on
which the background shift of class-incremental segmentation really hurts.

Design
------
* K object classes (ids 1..K, 0 = background). Class k has
  - its own **shape** (disc, square, triangle, ring, cross, bar, ellipse, star, diamond, crescent,
    hexagon, frame; reused with another aspect ratio beyond 12 classes), drawn in an object frame
    with random size (radius 16-30 % of the image side), position, rotation and +-15 % aspect
    jitter; the thin shapes (ring, cross, bar) are at least 0.6 radius thick, so that they cover
    whole cells of a DeepLab's stride-8 output at 64x64 (at half that thickness joint training
    reaches only 37 % mIoU on them in the demo, against 54 % at this one);
  - its own **texture** (stripes, checker, dots, rings, grid, waves, gradient, speckle, plain) with
    a class-specific frequency and orientation, in the object frame (it rotates with the object);
  - its own **colour statistics**: a dominant colour A mixed by the texture with a colour B, a
    class-specific contrast and pixel-noise level, plus per-instance hue/brightness jitter.
    Classes come in pairs (1-2, 3-4, ...) that share the hue of colour A, so colour alone does
    not identify a class: shape and texture must be learnt.
* Each image: a cluttered background (a smooth random colour field, a faint random texture, 3-8
  irregular blobs of random colours -- half of them in the colour A of some class, i.e.
  distractors -- each with a random texture), then 1-3 objects drawn in order (later objects
  occlude earlier ones), then global pixel noise. Object classes are drawn uniformly, so objects of
  several classes share images: at an incremental step the old classes present are labelled
  background (the background shift). Every class appears in every split (image i's top object is
  class ``i mod K + 1``; it is drawn last, so it is visible).
* Deterministic for a seed: image i of a split uses ``np.random.default_rng([seed, split, i])``
  (independent of the number of images), the class table ``default_rng([seed, 0])``.
* Vectorised numpy on full-image coordinate grids: ~2-4 ms per 64x64 image (PNG writing
  included), so 800 images take a few seconds.

Layout written (readable by :class:`lskd.data.SegmentationFolder`)::

    OUT/JPEGImages/<id>.png|.jpg          RGB images
    OUT/SegmentationClass/<id>.png        palette PNG, class index per pixel (0..K, 255 = ignore)
    OUT/ImageSets/Segmentation/train.txt  ids, one per line (also val.txt)
    OUT/classes.txt                       background + K names
    OUT/synthetic.json                    generator parameters and the class table
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np
from PIL import Image

#: Bumped whenever the images drawn for a given seed change: a dataset on disk written by another
#: version is rebuilt by ``lskd demo`` instead of reused.
GENERATOR_VERSION = 2

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "TEXTURES",
    "ClassSpec",
    "class_specs",
    "render_image",
    "make_synthetic",
    "voc_palette",
]

SHAPES: Tuple[str, ...] = (
    "disc", "square", "triangle", "ring", "cross", "bar",
    "ellipse", "star", "diamond", "crescent", "hexagon", "frame",
)  # fmt: skip
TEXTURES: Tuple[str, ...] = ("stripes", "checker", "dots", "rings", "grid", "waves", "gradient", "speckle", "plain")


@dataclass
class ClassSpec:
    """Appearance statistics of one class (colours are RGB in [0, 1], frequencies in cycles per
    object radius, angles in radians)."""

    name: str
    shape: str
    aspect: float  # width / height of the shape in its frame (area kept)
    texture: str
    freq: float
    angle: float
    color_a: Tuple[float, float, float]
    color_b: Tuple[float, float, float]
    contrast: float  # weight of colour B where the texture is "on"
    noise: float  # std of the per-pixel colour noise


def _hsv(h: float, s: float, v: float) -> Tuple[float, float, float]:
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def class_specs(classes: int, seed: int = 0) -> List[ClassSpec]:
    """The appearance table of ``classes`` object classes (class id = list index + 1)."""
    rng = np.random.default_rng([seed, 0])
    tex_order = rng.permutation(len(TEXTURES))
    hue0 = rng.random()
    specs = []
    for k in range(classes):
        shape = SHAPES[k % len(SHAPES)]
        rnd = k // len(SHAPES)
        name = shape if rnd == 0 else f"{shape}{rnd + 1}"
        if shape in ("bar", "ellipse"):
            aspect = float(rng.uniform(2.0, 2.8))
        else:
            aspect = float(rng.uniform(0.85, 1.2)) * (1.0 + 0.35 * rnd)
        # pairs of classes share the hue of colour A (colour alone is ambiguous)
        hue = hue0 + 0.618034 * (k // 2) + rng.uniform(-0.03, 0.03)
        color_a = _hsv(hue, rng.uniform(0.45, 0.85), rng.uniform(0.5, 0.9))
        color_b = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.2, 0.9), rng.uniform(0.3, 1.0))
        specs.append(
            ClassSpec(
                name=name,
                shape=shape,
                aspect=aspect,
                texture=TEXTURES[int(tex_order[(k + 3 * rnd) % len(TEXTURES)])],
                freq=float(rng.uniform(1.2, 2.4)),
                angle=float(rng.uniform(0, math.pi)),
                color_a=color_a,
                color_b=color_b,
                contrast=float(rng.uniform(0.35, 0.7)),
                noise=float(rng.uniform(0.02, 0.08)),
            )
        )
    return specs


# ------------------------------------------------------------------------------- primitives


def _frame(xx, yy, cx, cy, r, theta, aspect):
    """Object-frame coordinates (u, v) in units of the radius r (area-preserving aspect)."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = xx - cx, yy - cy
    sa = math.sqrt(aspect)
    u = (dx * c + dy * s) / (r * sa)
    v = (-dx * s + dy * c) * sa / r
    return u, v


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    if shape in ("disc", "ellipse"):
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "triangle":
        return (v >= -0.6) & (math.sqrt(3.0) * au + v <= 1.2)
    if shape == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.4**2)
    if shape == "cross":
        return ((au <= 0.4) & (av <= 1.0)) | ((av <= 0.4) & (au <= 1.0))
    if shape == "bar":
        return (au <= 1.0) & (av <= 0.7)
    if shape == "star":
        phi = np.arctan2(v, u)
        t = np.abs(((phi + math.pi / 2) / (2 * math.pi / 5)) % 1.0 - 0.5) * 2.0  # 0 at the tips
        return np.sqrt(u * u + v * v) <= 1.05 - 0.6 * t
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    if shape == "hexagon":
        return np.maximum(av, 0.5 * av + (math.sqrt(3.0) / 2) * au) <= 0.9
    if shape == "frame":
        m = np.maximum(au, av)
        return (m <= 0.9) & (m >= 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u, v, freq: float, angle: float, phase: float, rng) -> np.ndarray:
    """Texture weight in [0, 1] on the object frame."""
    two_pi = 2.0 * math.pi
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(two_pi * freq * (u * math.cos(angle) + v * math.sin(angle)) + phase)
    if kind == "checker":
        return ((np.sin(two_pi * freq * u + phase) * np.sin(two_pi * freq * v + phase)) > 0).astype(np.float32)
    if kind == "dots":
        return ((np.cos(two_pi * freq * u + phase) * np.cos(two_pi * freq * v)) > 0.45).astype(np.float32)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(two_pi * freq * np.sqrt(u * u + v * v) + phase)
    if kind == "grid":
        return (
            (np.abs(np.sin(math.pi * freq * u + phase)) < 0.35) | (np.abs(np.sin(math.pi * freq * v)) < 0.35)
        ).astype(np.float32)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(two_pi * freq * u + 1.8 * np.sin(math.pi * freq * v) + phase)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * (u * math.cos(angle) + v * math.sin(angle)), 0.0, 1.0)
    if kind == "speckle":
        return (rng.random(u.shape) < 0.3).astype(np.float32)
    if kind == "plain":
        return np.zeros(u.shape, np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _jitter_color(rgb, rng, hue: float = 0.04, val: Tuple[float, float] = (0.8, 1.15)) -> np.ndarray:
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    return np.array(_hsv(h + rng.uniform(-hue, hue), s * rng.uniform(0.85, 1.15), v * rng.uniform(*val)), np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, color_a, color_b, weight: np.ndarray, noise: float, rng) -> None:
    """img[mask] = mix(color_a, color_b, weight) + noise, in place (float32 [S, S, 3] in [0, 1])."""
    n = int(mask.sum())
    if n == 0:
        return
    w = weight[mask][:, None]
    pix = color_a[None, :] * (1.0 - w) + color_b[None, :] * w
    pix += rng.normal(0.0, noise, (n, 3)).astype(np.float32)
    img[mask] = pix


def _background(size: int, specs: List[ClassSpec], xx, yy, rng) -> np.ndarray:
    g = int(rng.integers(2, 6))
    small = (rng.random((g, g, 3)) * 200 + 30).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    # faint background texture over the whole image
    u, v = _frame(xx, yy, size / 2, size / 2, size * rng.uniform(0.15, 0.4), rng.uniform(0, 2 * math.pi), 1.0)
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    t = _texture(kind, u, v, rng.uniform(1.0, 3.0), rng.uniform(0, math.pi), rng.uniform(0, 6.3), rng)
    img = img * (1.0 - 0.15 * t[..., None]) + 0.15 * t[..., None] * rng.random(3).astype(np.float32)
    # irregular blobs; half of them in the dominant colour of a class (distractors)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(-0.05, 1.05, 2) * size
        r = size * rng.uniform(0.06, 0.2)
        u, v = _frame(xx, yy, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 2.0))
        phi = np.arctan2(v, u)
        a1, a2, p1, p2 = rng.uniform(0.1, 0.3), rng.uniform(0.05, 0.2), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
        mask = np.sqrt(u * u + v * v) <= 1.0 + a1 * np.sin(2 * phi + p1) + a2 * np.sin(3 * phi + p2)
        if rng.random() < 0.5 and specs:
            ca = _jitter_color(specs[int(rng.integers(len(specs)))].color_a, rng)
        else:
            ca = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.15, 1.0))
            ca = np.array(ca, np.float32)
        cb = np.array(_hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.15, 1.0)), np.float32)
        kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        w = _texture(kind, u, v, rng.uniform(1.0, 2.5), rng.uniform(0, math.pi), rng.uniform(0, 6.3), rng)
        _paint(img, mask, ca, cb, w * rng.uniform(0.2, 0.7), rng.uniform(0.01, 0.08), rng)
    return img


def render_image(
    specs: List[ClassSpec], size: int, rng: np.random.Generator, top_class: int = 0, max_objects: int = 3
) -> Tuple[np.ndarray, np.ndarray]:
    """Render one image.

    Args:
        specs: class table (:func:`class_specs`); class ids are 1..len(specs).
        size: image side S in pixels.
        rng: the image's generator.
        top_class: class id of the last-drawn (unoccluded) object; 0 = random.
        max_objects: objects per image are drawn uniformly from 1..max_objects.

    Returns:
        ``(image np.uint8 [S, S, 3], label np.uint8 [S, S])`` with label values in 0..K.
    """
    k = len(specs)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = _background(size, specs, xx, yy, rng)
    label = np.zeros((size, size), np.uint8)
    n = int(rng.integers(1, max_objects + 1))
    classes = [int(c) for c in rng.integers(1, k + 1, n)]
    if top_class:
        classes[-1] = int(top_class)
    for cls in classes:
        spec = specs[cls - 1]
        r = size * rng.uniform(0.16, 0.3)
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        u, v = _frame(xx, yy, cx, cy, r, rng.uniform(0, 2 * math.pi), spec.aspect * rng.uniform(0.85, 1.15))
        mask = _shape_mask(spec.shape, u, v)
        w = _texture(spec.texture, u, v, spec.freq * rng.uniform(0.85, 1.15), spec.angle, rng.uniform(0, 6.3), rng)
        ca = _jitter_color(spec.color_a, rng)
        cb = _jitter_color(spec.color_b, rng, hue=0.08)
        _paint(img, mask, ca, cb, w * spec.contrast, spec.noise, rng)
        # soft shading across the object (a little 3-D look, varies per instance)
        shade = 1.0 + 0.12 * np.clip(u * math.cos(cx) + v * math.sin(cy), -1.5, 1.5)
        img[mask] *= shade[mask][:, None]
        label[mask] = cls
    img += rng.normal(0.0, rng.uniform(0.01, 0.04), img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), label


def voc_palette() -> List[int]:
    """The 256-entry Pascal VOC colour map as a flat ``[r0, g0, b0, r1, ...]`` list (768 ints)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _ignore_border(label: np.ndarray) -> np.ndarray:
    """Set the 1-pixel band on both sides of every class boundary to 255 (as VOC's outlines)."""
    edge = np.zeros(label.shape, bool)
    dv = label[1:, :] != label[:-1, :]
    dh = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    out = label.copy()
    out[edge] = 255
    return out


def make_synthetic(
    out: Union[str, os.PathLike],
    classes: int = 6,
    images: int = 600,
    size: int = 64,
    seed: int = 0,
    val_images: int = 200,
    image_format: str = "png",
    max_objects: int = 3,
    ignore_border: bool = False,
) -> Path:
    """Write the synthetic benchmark to ``out`` in the VOC layout (see the module docstring).

    Args:
        out: output folder. If it exists it must be empty or a previous synthetic dataset (it has
            synthetic.json), which is replaced; the new one is built in a temporary sibling folder
            and moved into place.
        classes: K object classes (ids 1..K; 2 <= K <= 254).
        images: number of training images (>= K, so that every class appears).
        size: image side in pixels (>= 16).
        seed: generator seed; the output is a deterministic function of all the arguments.
        val_images: number of validation images (0 or >= K).
        image_format: "png" (lossless, default) or "jpg" (quality 95).
        max_objects: objects per image drawn from 1..max_objects.
        ignore_border: label a 1-pixel band around object boundaries 255, as VOC does.

    Returns:
        the dataset root (``Path(out)``); read it with ``SegmentationFolder(root, "train"|"val")``.
    """
    out = Path(out)
    if not 2 <= classes <= 254:
        raise ValueError(f"classes must be in 2..254, got {classes}")
    if images < classes:
        raise ValueError(f"images={images} must be >= classes={classes} so that every class appears")
    if val_images != 0 and val_images < classes:
        raise ValueError(f"val_images={val_images} must be 0 or >= classes={classes}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    fmt = image_format.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    ext = ".png" if fmt == "png" else ".jpg"
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "synthetic.json").is_file():
            raise FileExistsError(
                f"{out} exists, is not empty and is not a synthetic dataset; refusing to overwrite it"
            )

    specs = class_specs(classes, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClass").mkdir()
        (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)
        palette = voc_palette()
        for split_code, (split, count) in enumerate((("train", images), ("val", val_images)), start=1):
            ids = []
            for i in range(count):
                rng = np.random.default_rng([seed, split_code, i])
                image, label = render_image(specs, size, rng, top_class=i % classes + 1, max_objects=max_objects)
                if ignore_border:
                    label = _ignore_border(label)
                sid = f"{split}_{i:05d}"
                im = Image.fromarray(image)
                if ext == ".png":
                    im.save(tmp / "JPEGImages" / f"{sid}.png", compress_level=1)
                else:
                    im.save(tmp / "JPEGImages" / f"{sid}.jpg", quality=95)
                lab = Image.fromarray(label)  # "L"; putpalette turns it into "P", indices kept
                lab.putpalette(palette)
                lab.save(tmp / "SegmentationClass" / f"{sid}.png", compress_level=1)
                ids.append(sid)
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(s + "\n" for s in ids))
        (tmp / "classes.txt").write_text("background\n" + "".join(s.name + "\n" for s in specs))
        meta = {
            "generator": "lskd.data.synthetic",
            "generator_version": GENERATOR_VERSION,
            "classes": classes,
            "images": images,
            "val_images": val_images,
            "size": size,
            "seed": seed,
            "image_format": ext[1:],
            "max_objects": max_objects,
            "ignore_border": ignore_border,
            "class_table": [asdict(s) for s in specs],
        }
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
