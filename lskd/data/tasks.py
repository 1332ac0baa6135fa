"""Incremental tasks: which classes are learnt at which step, image selection and label remapping.

Setting (docs/MATHEMATICS.md §1.1 and §6). Class ids are ``0..K-1`` with ``0`` = background and ``255`` = ignore.
A task splits the object classes ``first_class..K-1`` into steps ``t = 0..T``; step 0 also holds
the background. At step ``t``:

* training labels keep the classes of step ``t`` and map everything else (background, old and
  future classes) to 0 -- the "background shift" -- while 255 stays 255 (:func:`train_lut`);
* evaluation labels keep every class learnt up to ``t`` and map the rest to 255
  (:func:`eval_lut`);
* the training images are those with at least one class of step ``t`` ("overlapped"), and in the
  "disjoint" protocol additionally none of a future step (:func:`select_images`, as MiB).

Task strings
------------
``"B-I"``   B base classes at step 0, then I classes per step until all classes are covered.
            ``K - first_class - B`` must be a positive multiple of ``I`` (every step has exactly
            ``I`` classes; a shorter last step is refused rather than silently created).
``"B-Ns"``  B base classes then N steps of one class each (PLOP's naming: "15-5s" == "15-1");
            ``B + N`` must cover all classes.
``"offline"`` (alias ``"joint"``)  one step with every class (joint training, the upper bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence, Set

import numpy as np
import torch

__all__ = ["Task", "parse_task", "select_images", "train_lut", "eval_lut", "IGNORE"]

IGNORE = 255  #: label value of ignored pixels

_BI = re.compile(r"^(\d+)-(\d+)(s?)$")


@dataclass
class Task:
    """Classes per incremental step.

    Attributes:
        name: the task string it was parsed from (e.g. ``"15-1"``).
        steps: ``steps[t]`` = sorted class ids learnt at step ``t``; ``steps[0]`` starts with 0
            (background); every object class appears in exactly one step.
        num_classes: K, the number of class ids of the dataset (background included).
    """

    name: str
    steps: List[List[int]]
    num_classes: int
    _step_of: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.steps or not self.steps[0] or self.steps[0][0] != 0:
            raise ValueError(f"task {self.name!r}: steps[0] must start with the background class 0")
        seen: dict = {}
        for t, classes in enumerate(self.steps):
            if not classes:
                raise ValueError(f"task {self.name!r}: step {t} has no class")
            for c in classes:
                if not 0 <= c < self.num_classes:
                    raise ValueError(f"task {self.name!r}: class {c} at step {t} is outside 0..{self.num_classes - 1}")
                if c in seen:
                    raise ValueError(f"task {self.name!r}: class {c} appears at steps {seen[c]} and {t}")
                seen[c] = t
        self._step_of = seen

    @property
    def num_steps(self) -> int:
        """Number of steps T + 1 (step 0 included)."""
        return len(self.steps)

    @property
    def classes_per_step(self) -> List[int]:
        """``[len(steps[0]), len(steps[1]), ...]`` (step 0 counts the background)."""
        return [len(s) for s in self.steps]

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"task {self.name!r} has steps 0..{self.num_steps - 1}, got step {step}")

    def new_classes(self, step: int) -> List[int]:
        """The classes learnt at ``step`` (with 0 at step 0)."""
        self._check_step(step)
        return list(self.steps[step])

    def classes_until(self, step: int) -> List[int]:
        """All classes learnt at steps ``0..step`` (background included), sorted."""
        self._check_step(step)
        return sorted(c for s in self.steps[: step + 1] for c in s)

    def old_classes(self, step: int) -> int:
        """O = number of classes learnt before ``step`` (background included; 0 at step 0).

        With consecutive ids (as :func:`parse_task` builds), label values ``< O`` are background
        or old classes and ``O <= y != 255`` are the new ones.
        """
        self._check_step(step)
        return sum(len(s) for s in self.steps[:step])

    def future_classes(self, step: int) -> List[int]:
        """The classes of the steps after ``step``."""
        self._check_step(step)
        return sorted(c for s in self.steps[step + 1 :] for c in s)

    def step_of(self, cls: int) -> int:
        """The step at which class ``cls`` is learnt (ValueError if no step holds it)."""
        if cls not in self._step_of:
            raise ValueError(f"class {cls} is in no step of task {self.name!r}")
        return self._step_of[cls]

    def to_dict(self) -> dict:
        """JSON-friendly description ``{"name", "num_classes", "steps"}``."""
        return {"name": self.name, "num_classes": self.num_classes, "steps": [list(s) for s in self.steps]}


def parse_task(task: str, num_classes: int, first_class: int = 1) -> Task:
    """Build the :class:`Task` of a task string for a dataset with ``num_classes`` ids.

    Args:
        task: ``"B-I"`` (e.g. ``"15-1"``, ``"100-10"``), ``"B-Ns"`` (``"15-5s"`` = ``"15-1"``), or
            ``"offline"`` / ``"joint"`` (one step with all classes).
        num_classes: K, number of class ids including background 0 (21 for VOC, 151 for ADE20K).
        first_class: the first object class id; object classes are ``first_class..K-1``.

    Returns:
        the Task; ``steps[0] = [0, first_class, ..., first_class + B - 1]``.

    Raises:
        ValueError: the string is not a task, or it does not fit the class count; the message
            names both.
    """
    if not isinstance(task, str):
        raise ValueError(f"task must be a string like '15-1' or 'offline', got {task!r}")
    if int(num_classes) != num_classes or num_classes < first_class + 1 or first_class < 1:
        raise ValueError(
            f"task {task!r}: need at least one object class, got num_classes={num_classes}, first_class={first_class}"
        )
    name = task.strip()
    objects = list(range(first_class, num_classes))
    n = len(objects)
    where = f"task {task!r} with {num_classes} classes (object classes {first_class}..{num_classes - 1})"
    if name.lower() in ("offline", "joint"):
        return Task(name=name, steps=[[0] + objects], num_classes=num_classes)
    m = _BI.match(name.replace(" ", ""))
    if m is None:
        raise ValueError(f"invalid {where}: expected 'B-I' (e.g. '15-1', '100-10'), 'B-Ns' (e.g. '15-5s') or 'offline'")
    base, inc, single = int(m.group(1)), int(m.group(2)), bool(m.group(3))
    if base < 1:
        raise ValueError(f"invalid {where}: the base step needs at least one class (B >= 1)")
    if inc < 1:
        raise ValueError(f"invalid {where}: each incremental step needs at least one class (I >= 1)")
    if base >= n:
        raise ValueError(
            f"invalid {where}: B={base} leaves no class for an incremental step "
            f"(B must be < {n}; use 'offline' for joint training)"
        )
    rest = n - base
    if single:
        if inc != rest:
            raise ValueError(
                f"invalid {where}: '{base}-{inc}s' means {inc} single-class steps after {base} base "
                f"classes, but {rest} classes remain (use '{base}-{rest}s' or '{base}-1')"
            )
        inc = 1
    if rest % inc != 0:
        raise ValueError(f"invalid {where}: the {rest} classes after the base step are not a multiple of I={inc}")
    steps = [[0] + objects[:base]]
    steps += [objects[i : i + inc] for i in range(base, n, inc)]
    return Task(name=name, steps=steps, num_classes=num_classes)


def select_images(image_classes: Sequence[Iterable[int]], task: Task, step: int, disjoint: bool) -> List[int]:
    """Indices of the training images of ``step`` (MiB protocols).

    Args:
        image_classes: per image, the set of label values present, without 0 and 255.
        task: the task.
        step: the step.
        disjoint: False = "overlapped": images with at least one class of the step (other classes,
            old or future, may be present and are labelled background). True = "disjoint":
            additionally no class of a future step.

    Returns:
        sorted image indices.
    """
    current: Set[int] = set(task.new_classes(step)) - {0, IGNORE}
    future: Set[int] = set(task.future_classes(step))
    out = []
    for i, classes in enumerate(image_classes):
        cs = set(classes)
        if not cs & current:
            continue
        if disjoint and cs & future:
            continue
        out.append(i)
    return out


def _lut(keep: Iterable[int], other: int) -> torch.Tensor:
    lut = torch.full((256,), other, dtype=torch.int64)
    for c in keep:
        lut[c] = c
    lut[IGNORE] = IGNORE
    return lut


def train_lut(task: Task, step: int) -> torch.Tensor:
    """Training label map of ``step``: ``[256]`` int64, ``new = lut[old]``.

    The classes of ``step`` keep their id, every other value (background, old, future) -> 0,
    255 -> 255.
    """
    return _lut(task.new_classes(step), 0)


def eval_lut(task: Task, step: int) -> torch.Tensor:
    """Evaluation label map after ``step``: ``[256]`` int64.

    Classes learnt at steps ``0..step`` (background included) keep their id, the rest -> 255.
    """
    return _lut(task.classes_until(step), IGNORE)


def lut_numpy(lut: torch.Tensor) -> np.ndarray:
    """A ``[256]`` LUT as ``np.uint8`` (for indexing uint8 label arrays)."""
    arr = torch.as_tensor(lut).detach().cpu().numpy()
    if arr.shape != (256,) or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"a label LUT must have 256 entries in 0..255, got shape {arr.shape}")
    return arr.astype(np.uint8)
