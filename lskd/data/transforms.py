"""Joint image/label transforms in plain PIL/numpy/torch (no torchvision).

A transform is called as ``transform(image: PIL.Image RGB [H, W], label: np.uint8 [H, W])`` and
returns ``(image float32 [3, h, w] normalised with the ImageNet mean/std, label int64 [h, w])``.
Labels are always resampled with nearest neighbour (values are preserved). Training crops never
leave the image (no padding, as released); only :func:`pad_collate` pads (label 255).

Randomness comes from torch's default generator only (``torch.rand``, ``torch.randint``), so it
is reproducible with ``torch.manual_seed`` in the main process and, in DataLoader workers, from the per-worker seed
that torch derives from the DataLoader's ``generator`` (``base_seed + worker_id``): a DataLoader
with a seeded generator gives the same crops run after run, for any ``num_workers``.
"""

from __future__ import annotations

import math
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .tasks import IGNORE

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "to_tensor",
    "label_to_tensor",
    "denormalize",
    "TrainTransform",
    "EvalTransform",
    "pad_collate",
    "seed_worker",
]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


def to_tensor(
    image: Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """PIL RGB image [H, W] -> float32 [3, H, W], ``(x / 255 - mean) / std``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(m).div_(s)


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """np.uint8 label [H, W] -> int64 tensor [H, W]."""
    return torch.from_numpy(np.asarray(label, dtype=np.uint8).copy()).to(torch.int64)


def denormalize(
    image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Normalised float [3, H, W] -> np.uint8 [H, W, 3] (for visualisation)."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (image.detach().cpu().float() * s + m).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def _as_label_image(label: np.ndarray) -> Image.Image:
    arr = np.asarray(label)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ValueError(f"label must be np.uint8 [H, W], got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)  # mode "L"


def _check_pair(image: Image.Image, label: np.ndarray) -> None:
    if label.shape != (image.height, image.width):
        raise ValueError(f"label shape {label.shape} does not match image {image.height}x{image.width} (HxW)")


class TrainTransform:
    """Random resized crop to ``crop x crop`` + horizontal flip + ImageNet normalisation.

    The window follows the release (LSKD/PLOP ``run.py`` 44:
    ``RandomResizedCrop(opts.crop_size, (0.5, 2.0))`` then ``RandomHorizontalFlip()``; the crop
    rule is ``dataset/transform.py`` 507-545, torchvision's): up to 10 draws of an area
    ``a * H * W``, ``a ~ U(scale)``, and an aspect ratio ``r`` (width / height) log-uniform in
    ``ratio``; ``w = round(sqrt(a H W r))``, ``h = round(sqrt(a H W / r))`` (Python ``round``);
    the first draw with ``w <= W`` and ``h <= H`` is placed uniformly in the image (top-left
    ``i ~ U{0..H-h}``, ``j ~ U{0..W-w}``). If none fits, the central crop: the whole image,
    or the largest centred window of aspect ratio ``min(ratio)`` / ``max(ratio)`` when the
    image's own ratio is outside ``ratio``. So the window always lies inside the image and
    nothing is padded: draws with ``a > 1`` never fit (with the default ``(0.5, 2.0)`` the
    used area fraction is in [0.5, 1]; about 1.7% of the crops of an image with ratio in
    range are the fallback). The window is cropped, then resized to the square crop (image
    bilinear, label nearest), like torchvision's ``resized_crop``; images smaller than the
    crop are enlarged. The flip has probability 0.5.

    Differences from the release, on purpose: the draws come from torch's default generator
    (``torch.rand`` / ``torch.randint``) instead of Python's ``random`` (reproducible with
    seeded DataLoaders, module doc); windows of 0 pixels (only possible with a scale far below
    the release's) are treated as not fitting.

    Args:
        crop: output side in pixels.
        scale: range of the window area as a fraction of the image area.
        ratio: range of the window aspect ratio (width / height).
        flip: horizontal flip with probability 0.5.

    Call: ``(PIL RGB [H, W], np.uint8 [H, W]) -> (float32 [3, crop, crop], int64 [crop, crop])``.
    """

    attempts = 10

    def __init__(
        self,
        crop: int,
        scale: Tuple[float, float] = (0.5, 2.0),
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if int(crop) != crop or crop < 1:
            raise ValueError(f"crop must be a positive int, got {crop}")
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be 0 < lo <= hi, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be 0 < lo <= hi, got {ratio}")
        self.crop = int(crop)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip = bool(flip)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __repr__(self) -> str:
        return f"TrainTransform(crop={self.crop}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"

    def _draw_size(self, width: int, height: int) -> Tuple[int, int]:
        """One draw of the window's ``(w, h)`` in pixels (may not fit the image)."""
        u = torch.rand(2, dtype=torch.float64).tolist()
        area = width * height * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = math.exp(lo + (hi - lo) * u[1])
        return int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))

    def _central(self, width: int, height: int) -> Tuple[int, int, int, int]:
        """The fallback window ``(x0, y0, x1, y1)``: centred, aspect ratio clamped to ``ratio``."""
        w, h = width, height
        if width / height < self.ratio[0]:
            h = int(round(width / self.ratio[0]))
        elif width / height > self.ratio[1]:
            w = int(round(height * self.ratio[1]))
        x0, y0 = (width - w) // 2, (height - h) // 2
        return x0, y0, x0 + w, y0 + h

    def sample_window(self, width: int, height: int) -> Tuple[Tuple[int, int, int, int], bool]:
        """Draw ``((x0, y0, x1, y1), flip)``: a window of whole pixels inside the ``width x height``
        image (``0 <= x0 < x1 <= width``, ``0 <= y0 < y1 <= height``), from torch's RNG."""
        box = None
        for _ in range(self.attempts):
            w, h = self._draw_size(width, height)
            if 1 <= w <= width and 1 <= h <= height:
                y0 = int(torch.randint(0, height - h + 1, ()).item())
                x0 = int(torch.randint(0, width - w + 1, ()).item())
                box = (x0, y0, x0 + w, y0 + h)
                break
        if box is None:
            box = self._central(width, height)
        flip = bool(torch.rand((), dtype=torch.float64).item() < 0.5)
        return box, self.flip and flip

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        box, flip = self.sample_window(image.width, image.height)
        size = (self.crop, self.crop)
        img = image.convert("RGB").crop(box).resize(size, Image.Resampling.BILINEAR)
        lbl = _as_label_image(label).crop(box).resize(size, Image.Resampling.NEAREST)
        x = to_tensor(img, self.mean, self.std)
        y = label_to_tensor(np.asarray(lbl))
        if flip:
            x = x.flip(-1)
            y = y.flip(-1)
        return x.contiguous(), y.contiguous()


class EvalTransform:
    """Normalisation, optionally after resizing the shorter side to ``size`` and centre-cropping
    ``size x size`` (image bilinear, label nearest). ``size=None`` keeps the full resolution.

    Call: ``(PIL RGB [H, W], np.uint8 [H, W]) -> (float32 [3, h, w], int64 [h, w])``.
    """

    def __init__(
        self, size: Optional[int] = None, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        if size is not None and (int(size) != size or size < 1):
            raise ValueError(f"size must be a positive int or None, got {size}")
        self.size = None if size is None else int(size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        image = image.convert("RGB")
        lbl = _as_label_image(label)
        if self.size is not None:
            w, h = image.size
            s = self.size / min(w, h)
            nw, nh = max(self.size, round(w * s)), max(self.size, round(h * s))
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            box = (left, top, left + self.size, top + self.size)
            image = image.resize((nw, nh), Image.Resampling.BILINEAR).crop(box)
            lbl = lbl.resize((nw, nh), Image.Resampling.NEAREST).crop(box)
        return to_tensor(image, self.mean, self.std), label_to_tensor(np.asarray(lbl))


def pad_collate(batch: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Collate samples of different sizes: images padded with 0 (the mean after normalisation) and
    labels with 255 at the bottom/right to the largest H, W. Returns ``([N, 3, H, W], [N, H, W])``."""
    hs = max(x.shape[-2] for x, _ in batch)
    ws = max(x.shape[-1] for x, _ in batch)
    images = torch.zeros(len(batch), 3, hs, ws, dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), hs, ws), IGNORE, dtype=torch.int64)
    for i, (x, y) in enumerate(batch):
        images[i, :, : x.shape[-2], : x.shape[-1]] = x
        labels[i, : y.shape[-2], : y.shape[-1]] = y
    return images, labels


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed (the
    transforms here only use torch's RNG; this is for user code that draws from numpy/random)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
