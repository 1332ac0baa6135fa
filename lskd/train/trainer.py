"""Training and evaluation of a class-incremental run (SPEC 1, 3, 4).

A run trains the steps ``t = 0..T`` of a task in order (or one step alone) into an output folder::

    OUT/config.json           the run's settings and identity (``lskd eval`` reads it)
    OUT/checkpoints/step{t}.pt, step{t}-last.pt   (see :mod:`lskd.train.checkpoint`)
    OUT/cache/                per-image class lists of the dataset (lskd.data caches)
    OUT/history.json          per epoch: mean loss per term, total, lr, time
    OUT/train.log             the epoch lines
    OUT/summary.json, metrics.csv, miou.png   written when the run has finished

Per step (``Trainer.train_step``):

* step 0: a fresh DeepLabV3 (``--pretrained`` backbone) trained with the step-0 classes;
* step t > 0: teacher = frozen copy of the model after step t-1; student = the same weights
  plus a new classifier (``DeepLabV3.add_step``, MiB's balanced initialisation);
  ``method.prepare_step(teacher, batches, ctx)`` once (PLOP/LSKD entropy thresholds, on the
  step's training data with a seeded augmentation); then per batch
  ``t_out, bctx = method.teacher_forward(...)``, ``terms = method.terms(...)``,
  ``total = weighting.total(terms)`` (the only place weights meet terms), backward, SGD step;
* optimiser: SGD, momentum 0.9, Nesterov, weight decay 1e-4, poly learning rate
  ``lr * (1 - i / I) ** 0.9`` per iteration over the step's ``I`` iterations; ``lr`` at step 0 and
  ``lr_next`` after;
* evaluation after the step on the whole validation set with ``eval_lut`` labels (classes not yet
  learnt -> 255), logits upsampled bilinearly to the labels, argmax, confusion matrix summed over
  the ranks, old/new/all mIoU (:mod:`lskd.train.metrics`).

Joint training (``method="joint"``) trains the "offline" task (one step with every class) and
reports it as the last step of ``task``, with the task's old/new split.

Reproducibility: the epoch's image order comes from a generator seeded by (seed, step, epoch);
the augmentation RNG (torch's, in the main process or the DataLoader workers) is reseeded from
(seed, step, epoch, rank) at the start of every epoch. A run resumed from an epoch checkpoint
therefore replays exactly the remaining epochs: on the CPU its results equal those of an
uninterrupted run bit for bit (the RNG states are saved too, for anything else that draws).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import (
    EvalTransform,
    IncrementalSubset,
    Task,
    TrainTransform,
    eval_lut,
    load_dataset,
    pad_collate,
    parse_task,
    seed_worker,
    step_indices,
    train_lut,
)
from ..methods import MAP_NAMES, SEARCH, Method, StepContext, build_method
from ..search import SchemeSearch, SearchWeighting
from ..models import DeepLabV3, convert_sync_batchnorm
from . import report
from .checkpoint import atomic_save, check_identity, load_checkpoint, rng_state, set_rng_state
from .distributed import DistContext, barrier, broadcast_object, init_distributed
from .metrics import confusion_matrix, reduce_confusion, step_metrics
from ..weighting import WEIGHTINGS, Weighting, build_weighting

__all__ = [
    "TrainConfig",
    "DATASETS",
    "DEFAULT_EPOCHS",
    "Trainer",
    "train",
    "evaluate_run",
    "evaluate_model",
    "epoch_batches",
    "RunError",
]

#: CLI dataset names -> lskd.data.load_dataset kinds.
DATASETS: Dict[str, str] = {"voc": "voc", "ade": "ade20k", "folder": "folder"}
#: Epochs per step by dataset (SPEC 4).
DEFAULT_EPOCHS: Dict[str, int] = {"voc": 30, "ade": 60, "folder": 30}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class RunError(ValueError):
    """A run that cannot start or continue (bad settings, an existing run, missing checkpoints)."""


@dataclass
class TrainConfig:
    """Settings of a run (the CLI's ``lskd train`` options; saved as ``OUT/config.json``).

    epochs / epochs_next: epochs of step 0 / of the later steps (None: by dataset, SPEC 4; the
    later steps default to ``epochs``). lr / lr_next: base learning rate of step 0 / later steps.
    batch_size: the GLOBAL batch (split over the ranks). eval_size: None = full-resolution
    evaluation; an int resizes the shorter side and centre-crops. eval_batch_size: per rank
    (default: the per-rank training batch; images of different sizes are padded with 255 labels).
    step: train this step only (the previous one must exist in ``out`` or come from
    ``init_from``). init_from: a ``step{k}.pt`` checkpoint (e.g. a shared step 0) to start step
    ``k + 1`` from. term_weights: fixed weight per loss-term name (default 1).
    """

    dataset: str
    data_root: str
    task: str
    method: str
    out: str
    disjoint: bool = False
    backbone: str = "resnet101"
    pretrained: Optional[str] = None
    output_stride: int = 16
    epochs: Optional[int] = None
    epochs_next: Optional[int] = None
    batch_size: int = 24
    lr: float = 0.01
    lr_next: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_power: float = 0.9
    crop: int = 512
    eval_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    amp: str = "none"
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    step: Optional[int] = None
    resume: bool = False
    init_from: Optional[str] = None
    quiet: bool = False
    weighting: str = "fixed"
    term_weights: Dict[str, float] = field(default_factory=dict)
    weight_lr: Optional[float] = None
    search: str = "none"
    search_epochs: int = 1
    search_split: float = 0.1
    search_order: int = 1
    search_lr: float = 3e-3
    train_split: str = "train"
    val_split: str = "val"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise RunError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.amp not in AMP_DTYPES:
            raise RunError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("batch_size", "crop"):
            if int(getattr(self, name)) < 1:
                raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "epochs_next"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise RunError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.workers < 0:
            raise RunError(f"--workers must be >= 0, got {self.workers}")
        if self.resume and self.init_from:
            raise RunError("--resume continues the run in --out; it cannot be combined with --init-from")
        if self.weighting not in WEIGHTINGS:
            raise RunError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.weighting != "fixed" and self.term_weights:
            raise RunError(f"--term-weights sets fixed weights; it cannot be combined with --weighting {self.weighting}")
        if self.weight_lr is not None and not self.weight_lr > 0:
            raise RunError(f"--weight-lr must be > 0, got {self.weight_lr}")
        if self.search not in ("none", "bilevel"):
            raise RunError(f"--search must be 'none' or 'bilevel', got {self.search!r}")
        if self.search == "bilevel":
            if self.method.lower() != "lskd":
                raise RunError(f"--search bilevel searches LSKD's per-map schemes; it needs --method lskd, not {self.method!r}")
            if self.weighting != "fixed" or self.term_weights:
                raise RunError("--search bilevel learns the per-map weights itself; use it with --weighting fixed and no --term-weights")
            if int(self.search_epochs) < 1:
                raise RunError(f"--search-epochs must be >= 1, got {self.search_epochs}")
            if not 0.0 < float(self.search_split) < 1.0:
                raise RunError(f"--search-split must be a fraction in (0, 1), got {self.search_split}")
            if int(self.search_order) not in (1, 2):
                raise RunError(f"--search-order must be 1 or 2, got {self.search_order}")
            if not self.search_lr > 0:
                raise RunError(f"--search-lr must be > 0, got {self.search_lr}")

    @property
    def epochs_step0(self) -> int:
        return int(self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.dataset])

    @property
    def epochs_later(self) -> int:
        return int(self.epochs_next if self.epochs_next is not None else self.epochs_step0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------- helpers


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_batches(
    n: int, per_rank: int, seed: int, step: int, epoch: int, rank: int = 0, world_size: int = 1
) -> List[List[int]]:
    """The batches of one rank for one epoch (indices into the step's training subset).

    One permutation of ``range(n)`` per (seed, step, epoch), identical on every rank, padded by
    wrapping to a multiple of ``world_size`` and split ``perm[rank::world_size]`` (as
    ``DistributedSampler``); then cut into batches of ``per_rank``, dropping an incomplete last
    batch unless it is the only one (as MiB/PLOP's ``drop_last``).
    """
    if n < 1:
        return []
    g = torch.Generator().manual_seed(_seed(seed, step, epoch, 0x5A3D))
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world_size) * world_size
    perm = (perm * math.ceil(total / n))[:total]
    mine = perm[rank::world_size]
    batches = [mine[i : i + per_rank] for i in range(0, len(mine), per_rank)]
    if len(batches) > 1 and len(batches[-1]) < per_rank:
        batches.pop()
    return batches


def _cycle(make_loader):
    """Endless iterator over fresh loaders from ``make_loader()`` (the search's held-out batches)."""
    while True:
        empty = True
        for item in make_loader():
            empty = False
            yield item
        if empty:
            raise RunError("the search's held-out split yields no batch")


class _Log:
    """Rank-0 printing (stdout + OUT/train.log)."""

    def __init__(self, dctx: DistContext, out: Path, quiet: bool) -> None:
        self.main = dctx.is_main
        self.quiet = quiet
        self.path = out / "train.log"

    def __call__(self, msg: str, always: bool = False) -> None:
        if not self.main:
            return
        if always or not self.quiet:
            print(msg, flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _build_model(cfg: TrainConfig, classes_per_step: Sequence[int], pretrained: Optional[str] = None) -> DeepLabV3:
    return DeepLabV3(cfg.backbone, list(classes_per_step), output_stride=cfg.output_stride, pretrained=pretrained)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict on the CPU (SyncBatchNorm and BatchNorm share their key names)."""
    return {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset,
    num_classes: int,
    device: torch.device,
    batch_size: int,
    workers: int = 0,
    amp: Optional[torch.dtype] = None,
    progress: bool = False,
    desc: str = "eval",
) -> torch.Tensor:
    """Confusion matrix ``[K, K]`` (int64, CPU) of ``model`` on ``dataset`` (this rank's part).

    ``dataset[i] -> (image [3, H, W], label [H, W])`` with the evaluation labels; logits are
    upsampled bilinearly to the label size and argmax-ed over all outputs.
    """
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    if len(dataset) > 0:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=max(1, batch_size), shuffle=False, num_workers=workers, collate_fn=pad_collate
        )
        for images, labels in _progress(loader, len(loader), desc, progress):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(images).logits
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            cm += confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    net.train(was_training)
    return cm.cpu()


# ---------------------------------------------------------------------------------- trainer


class Trainer:
    """One run (see the module docstring). ``Trainer(cfg, dctx).run() -> summary dict``."""

    def __init__(self, cfg: TrainConfig, dctx: Optional[DistContext] = None) -> None:
        self.cfg = cfg
        self.dctx = dctx or init_distributed(cfg.device)
        self.device = self.dctx.device
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.method_name = cfg.method.lower()
        self.method: Method = build_method(self.method_name)
        self.weighting: Optional[Weighting] = None  # built per step (train_step)
        kind = DATASETS[cfg.dataset]
        root = Path(cfg.data_root)
        if not root.exists():
            raise FileNotFoundError(f"--data-root {root} does not exist")
        self.train_ds = load_dataset(root, cfg.train_split, kind)
        self.val_ds = load_dataset(root, cfg.val_split, kind)
        if self.val_ds.class_names != self.train_ds.class_names:
            raise RunError("the train and val splits have different class names")
        self.class_names: List[str] = list(self.train_ds.class_names)
        self.num_classes = len(self.class_names)
        try:
            self.task: Task = parse_task(cfg.task, self.num_classes)
        except ValueError as e:
            raise RunError(str(e)) from None
        self.joint = self.method_name == "joint"
        self.train_task: Task = parse_task("offline", self.num_classes) if self.joint else self.task
        world = self.dctx.world_size
        if cfg.batch_size % world != 0:
            raise RunError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {world} ranks")
        self.per_rank_batch = cfg.batch_size // world
        if self.per_rank_batch < 2:
            raise RunError(
                f"--batch-size {cfg.batch_size} gives {self.per_rank_batch} image per rank; BatchNorm needs >= 2"
            )
        self.eval_batch = cfg.eval_batch_size or self.per_rank_batch
        self.progress = (not cfg.quiet) and self.dctx.is_main and sys.stderr.isatty()
        self.log = _Log(self.dctx, self.out, cfg.quiet)
        self.identity = {
            "dataset": cfg.dataset,
            "class_names": self.class_names,
            "task": self.task.name,
            "task_steps": self.task.steps,
            "train_steps": self.train_task.steps,
            "disjoint": bool(cfg.disjoint),
            "method": self.method_name,
            "weighting": cfg.weighting,
            "search": cfg.search,
            "backbone": cfg.backbone,
            "output_stride": cfg.output_stride,
        }
        self.history: List[dict] = []
        self.results: Dict[int, dict] = {}
        self.step_extras: Dict[int, dict] = {}

    # -- bookkeeping ------------------------------------------------------------------------
    def schemes(self, ctx: StepContext) -> Dict[str, str]:
        """``{map name: scheme}`` the method distils at this step (LSKD; empty for the others and at step 0)."""
        schemes = getattr(self.method, "schemes", None)
        if not ctx.incremental or not isinstance(schemes, dict):
            return {}
        return {MAP_NAMES[m]: schemes.get(m, "none") for m in range(len(MAP_NAMES))}

    def step_path(self, t: int) -> Path:
        return self.ckpt_dir / f"step{t}.pt"

    def last_path(self, t: int) -> Path:
        return self.ckpt_dir / f"step{t}-last.pt"

    def report_step(self, t: int) -> int:
        """The step index written in the reports (joint: the task's last step)."""
        return self.task.num_steps - 1 if self.joint else t

    def _base_classes(self) -> List[int]:
        return list(self.task.steps[0])

    def context(self, t: int) -> StepContext:
        return StepContext(step=t, old_classes=self.train_task.old_classes(t), new_classes=len(self.train_task.steps[t]))

    def epochs_of(self, t: int) -> int:
        return self.cfg.epochs_step0 if t == 0 else self.cfg.epochs_later

    def lr_of(self, t: int) -> float:
        return self.cfg.lr if t == 0 else self.cfg.lr_next

    # -- data ---------------------------------------------------------------------------------
    def train_subset(self, t: int) -> IncrementalSubset:
        idx = step_indices(self.train_ds, self.train_task, t, self.cfg.disjoint, cache_dir=self.out / "cache")
        if len(idx) < 2:
            raise RunError(
                f"step {t} of task {self.train_task.name!r} has {len(idx)} training image(s) "
                f"(classes {self.train_task.steps[t]}{', disjoint' if self.cfg.disjoint else ''}); need >= 2"
            )
        return IncrementalSubset(self.train_ds, idx, train_lut(self.train_task, t), TrainTransform(self.cfg.crop))

    def val_subset(self, t: int) -> IncrementalSubset:
        """This rank's part of the validation set with the labels of report step ``t``."""
        r, w = self.dctx.rank, self.dctx.world_size
        idx = list(range(len(self.val_ds)))[r::w]
        return IncrementalSubset(self.val_ds, idx, eval_lut(self.task, t), EvalTransform(self.cfg.eval_size))

    def _loader(self, subset, batches: List[List[int]], seed: int) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            subset,
            batch_sampler=batches,
            num_workers=self.cfg.workers,
            collate_fn=pad_collate,
            worker_init_fn=seed_worker,
            generator=g,
            pin_memory=self.device.type == "cuda",
        )

    def prepare_batches(self, subset, t: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the step's training data, augmented with a fixed seed (for
        ``method.prepare_step``; every image once)."""
        n = len(subset)
        mine = list(range(n))[self.dctx.rank :: self.dctx.world_size]
        batches = [mine[i : i + self.per_rank_batch] for i in range(0, len(mine), self.per_rank_batch)]
        s = _seed(self.cfg.seed, t, 0x9E37, self.dctx.rank)
        torch.manual_seed(s)
        return iter(self._loader(subset, batches, s))

    # -- models -------------------------------------------------------------------------------
    def _check_step_ckpt(self, ckpt: dict, path: Path, t: int, init: bool) -> None:
        if init:
            keys = ["dataset", "class_names", "backbone", "output_stride", "disjoint"]
            check_identity(ckpt["identity"], self.identity, keys, path, "(--init-from needs a checkpoint of the same dataset, classes, protocol and model)")
            saved_steps = ckpt["identity"].get("train_steps", [])[: t + 1]
            if saved_steps != self.train_task.steps[: t + 1]:
                raise RunError(
                    f"checkpoint {path} was trained on task {ckpt['identity'].get('task')!r} with steps "
                    f"{saved_steps}, but steps 0..{t} of task {self.task.name!r} are {self.train_task.steps[: t + 1]}"
                )
            if t > 0 and ckpt["identity"].get("method") != self.method_name:
                raise RunError(
                    f"checkpoint {path} is step {t} of method {ckpt['identity'].get('method')!r}; only step 0 "
                    f"is shared between methods (this run is {self.method_name!r})"
                )
        else:
            check_identity(ckpt["identity"], self.identity, list(self.identity), path, f"(use another --out than {self.out})")
        if int(ckpt.get("step", -1)) != t:
            raise RunError(f"checkpoint {path} holds step {ckpt.get('step')}, expected step {t}")

    def load_step_model(self, path: Path, t: int, init: bool = False) -> DeepLabV3:
        """The model after step ``t`` from ``path`` (identity checked), on the CPU."""
        ckpt = load_checkpoint(path)
        self._check_step_ckpt(ckpt, path, t, init)
        model = _build_model(self.cfg, ckpt["classes_per_step"])
        model.load_state_dict(ckpt["model"])
        for r in ckpt.get("results", []):
            self.results[int(r["_train_step"])] = r
        return model

    # -- planning -----------------------------------------------------------------------------
    def plan(self) -> Tuple[int, int, Optional[DeepLabV3]]:
        """``(first, last, model_before_first)``: the steps to train and the model they start from.

        Checks that the output folder is free (or holds this run when resuming), loads
        ``--init-from`` / the previous step's checkpoint, and refuses what would overwrite a run.
        """
        cfg = self.cfg
        n = self.train_task.num_steps
        if cfg.step is not None and not 0 <= cfg.step < n:
            raise RunError(f"--step {cfg.step}: method {self.method_name!r} on task {self.task.name!r} has steps 0..{n - 1}")
        config_path = self.out / "config.json"
        existing = sorted(self.ckpt_dir.glob("step*.pt")) if self.ckpt_dir.is_dir() else []
        if config_path.is_file():
            try:
                saved = json.loads(config_path.read_text())
            except ValueError as e:
                raise RunError(f"{config_path} is not valid JSON: {e}") from None
            check_identity(saved.get("identity", {}), self.identity, list(self.identity), config_path,
                           f"(the folder {self.out} holds another run; use another --out)")
        done = [t for t in range(n) if self.step_path(t).is_file()]
        if not cfg.resume and cfg.step is None and existing:
            raise RunError(
                f"{self.out} already holds a run ({len(existing)} checkpoint(s)); continue it with --resume "
                f"or choose another --out"
            )
        first = cfg.step if cfg.step is not None else 0
        last = cfg.step if cfg.step is not None else n - 1
        model: Optional[DeepLabV3] = None
        if cfg.init_from:
            if self.joint:
                raise RunError("--init-from: joint training has a single step and starts from scratch")
            ckpt_path = Path(cfg.init_from)
            k = int(load_checkpoint(ckpt_path).get("step", -1))
            if k + 1 >= n:
                raise RunError(f"--init-from {ckpt_path} is step {k}; task {self.task.name!r} has no step {k + 1}")
            if cfg.step is not None and cfg.step != k + 1:
                raise RunError(f"--init-from {ckpt_path} is step {k}: it can only start step {k + 1}, not --step {cfg.step}")
            model = self.load_step_model(ckpt_path, k, init=True)
            first = k + 1
        if cfg.resume:
            # skip the completed steps; the first unfinished one resumes from its epoch checkpoint
            while first <= last and self.step_path(first).is_file():
                first += 1
            if first > 0 and first <= last and model is None:
                model = self.load_step_model(self.step_path(first - 1), first - 1)
            elif first > last and first > 0:
                self.load_step_model(self.step_path(last), last)  # results for the reports
        else:
            clash = [t for t in range(first, last + 1) if self.step_path(t).is_file() or self.last_path(t).is_file()]
            if clash:
                raise RunError(
                    f"{self.out} already has checkpoints of step(s) {clash}; use --resume to continue or another --out"
                )
            if first > 0 and model is None:
                prev = self.step_path(first - 1)
                if not prev.is_file():
                    raise RunError(
                        f"step {first} starts from the model after step {first - 1}, but {prev} does not exist "
                        f"(train step {first - 1} first, or give --init-from CKPT)"
                    )
                model = self.load_step_model(prev, first - 1)
        # the results of earlier completed steps in this folder (e.g. `--step 2` after `--step 1`)
        for t in done:
            if t < first and t not in self.results:
                self.results.update({int(r["_train_step"]): r for r in load_checkpoint(self.step_path(t)).get("results", [])})
        return first, last, model

    # -- the search (SPEC 3.2) --------------------------------------------------------------------
    def search_split(self, n: int, t: int) -> Tuple[List[int], List[int]]:
        """``(lower, held_out)``: indices into the step's training subset, split once per (seed, step);
        ``--search-split`` of the images (at least 2 per rank, for BatchNorm) are held out for the
        upper level; its batches are at most the training batch."""
        g = torch.Generator().manual_seed(_seed(self.cfg.seed, t, 0x5EA7C4))
        perm = torch.randperm(n, generator=g).tolist()
        k = max(int(round(self.cfg.search_split * n)), 2 * self.dctx.world_size)
        if n - k < 2 * self.dctx.world_size:
            raise RunError(
                f"step {t} has {n} training images: too few to hold out {k} for the search "
                f"(--search-split {self.cfg.search_split}, batch {self.per_rank_batch} per rank)"
            )
        return sorted(perm[k:]), sorted(perm[:k])

    def check_search_data(self, first: int, last: int) -> None:
        """Before any training: every step > 0 to train has enough images for the search's split
        (so that a run does not stop at step t after training the steps before it)."""
        if self.cfg.search != "bilevel":
            return
        for t in range(max(first, 1), last + 1):
            if self.context(t).incremental:
                self.search_split(len(self.train_subset(t)), t)

    def _finish_search(self, ctx: StepContext, what: str) -> None:
        """Fix the argmax scheme of every map and the learnt map weights for the rest of the step."""
        chosen = self.weighting.finish()
        self.method.set_schemes(chosen)
        self.weighting.begin_step(self.method.term_names(ctx), ctx)
        w = self.weighting.search.weights()
        self.log(
            f"{what}: search done; schemes "
            + ", ".join(f"{MAP_NAMES[m]} {chosen[m]} (w {w[m]:.2f})" for m in sorted(chosen))
        )

    def _search_update(
        self,
        student: DeepLabV3,
        teacher: Optional[DeepLabV3],
        images: torch.Tensor,
        labels: torch.Tensor,
        t_out,
        bctx: StepContext,
        ctx: StepContext,
        val_iter,
        lr: float,
        scaler,
    ) -> None:
        """One upper-level step: hypergradient of the held-out CE + UNKD with respect to the scheme
        logits and map weights (finite differences on this batch's terms), then Adam."""
        dev = self.device
        amp = dict(device_type=dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
        v_images, v_labels = next(val_iter)
        v_images = v_images.to(dev, non_blocking=True)
        v_labels = v_labels.to(dev, non_blocking=True)
        with torch.no_grad(), torch.autocast(**amp):
            v_teacher = teacher(v_images)
        method = self.method

        def val_loss_fn() -> torch.Tensor:
            with torch.autocast(**amp):
                c = method.classification_terms(v_labels, student(v_images), v_teacher, ctx)
            return c["ce"].float() + c["unkd"].float()

        def terms_fn():  # float32 even under --amp: finite differences of bf16 losses are noise
            return method.terms(images, labels, student(images), t_out, bctx)

        params = [p for p in student.parameters() if p.requires_grad]
        train_grads = None
        if self.cfg.search_order == 2:
            inv = 1.0 / scaler.get_scale() if scaler.is_enabled() else 1.0
            train_grads = [None if p.grad is None else p.grad * inv for p in params]
        diag = self.weighting.search.hypergradient(
            params, terms_fn, val_loss_fn, xi=lr, train_grads=train_grads, buffers_of=student
        )
        self.weighting.search.step()
        self.weighting.record(diag)

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, t: int, prev: Optional[DeepLabV3]) -> DeepLabV3:
        """Train step ``t`` (resuming from its epoch checkpoint when there is one), evaluate,
        save ``step{t}.pt``; return the trained (plain, CPU-or-device) model."""
        cfg, dctx, dev = self.cfg, self.dctx, self.device
        ctx = self.context(t)
        n_new = len(self.train_task.steps[t])
        teacher: Optional[DeepLabV3] = None
        if t == 0:
            torch.manual_seed(_seed(cfg.seed, 0, 0x1A17))
            student = _build_model(cfg, [n_new], cfg.pretrained)
        else:
            if prev is None:
                raise RunError(f"step {t} needs the model after step {t - 1}")
            prev = prev.cpu()
            teacher = copy.deepcopy(prev).freeze().to(dev)
            student = copy.deepcopy(prev)
            student._frozen = False
            student.requires_grad_(True)
            student.add_step(n_new, balanced=True)
        student = student.to(dev).train()

        epochs = self.epochs_of(t)
        subset = self.train_subset(t)
        per_epoch = len(epoch_batches(len(subset), self.per_rank_batch, cfg.seed, t, 0, dctx.rank, dctx.world_size))
        total_iters = max(1, epochs * per_epoch)
        base_lr = self.lr_of(t)
        # A fresh weighting per step. The learnable weights of RGE / GradNorm are stepped by the
        # same optimiser, in their own group: no weight decay, learning rate --weight-lr (default:
        # the network's). The search (SPEC 3.2) has its own Adam on the scheme logits and map weights.
        searching = cfg.search == "bilevel" and ctx.incremental
        search_epochs = min(int(cfg.search_epochs), epochs) if searching else 0
        if searching:
            self.weighting = SearchWeighting(SchemeSearch(order=cfg.search_order, lr=cfg.search_lr).to(dev))
            self.method.set_schemes({m: SEARCH for m in range(len(MAP_NAMES))})
        else:
            self.weighting = build_weighting(cfg.weighting, cfg.term_weights)
        self.weighting.begin_step(self.method.term_names(ctx), ctx)
        if hasattr(self.weighting, "trace_every"):
            self.weighting.trace_every = max(1, (epochs * per_epoch) // 400)
        groups = [{"params": [p for p in student.parameters() if p.requires_grad], "base_lr": base_lr}]
        if self.weighting.parameters():
            w_lr = cfg.weight_lr if cfg.weight_lr is not None else base_lr
            groups.append({"params": self.weighting.parameters(), "base_lr": w_lr, "lr": w_lr, "weight_decay": 0.0})
        optimizer = torch.optim.SGD(
            groups, lr=base_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
        scaler = torch.amp.GradScaler(dev.type, enabled=cfg.amp == "fp16")
        start_epoch = 0
        last = self.last_path(t)
        if cfg.resume and last.is_file():
            state = load_checkpoint(last, map_location="cpu")
            check_identity(state["identity"], self.identity, list(self.identity), last, f"(use another --out than {self.out})")
            if state.get("classes_per_step") != student.classes_per_step:
                raise RunError(f"{last}: model classes {state.get('classes_per_step')} do not match step {t}")
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            self.weighting.load_state_dict(state.get("weighting", {}))
            if searching and self.weighting.finished:  # the search ended before the kill
                self.method.set_schemes(self.weighting.chosen)
                self.weighting.begin_step(self.method.term_names(ctx), ctx)
            self.history = list(state.get("history", []))
            set_rng_state(state.get("rng"))
            start_epoch = int(state["epoch"]) + 1
            self.log(f"step {t}: resuming after epoch {start_epoch}/{epochs} from {last}")

        net: nn.Module = student
        if dctx.distributed:
            net = convert_sync_batchnorm(net)  # global-batch statistics: SyncBatchNorm (CUDA) / DistBatchNorm2d
            net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        student_plain: DeepLabV3 = _unwrap(net)

        if t > 0 and self.method.needs_prepare_step and start_epoch < epochs:
            self.method.prepare_step(teacher, self.prepare_batches(subset, t), ctx)

        what = f"{self.method_name} step {t}/{self.train_task.num_steps - 1}"
        if start_epoch == 0:
            self.log(
                f"{what}: classes {[self.class_names[c] for c in self.train_task.steps[t]]}, "
                f"{len(subset)} images, {epochs} epochs x {per_epoch} iterations, lr {base_lr:g}, "
                f"batch {cfg.batch_size} ({dctx.world_size} rank(s)), device {dev}"
            )
        lower_part, held_out = self.search_split(len(subset), t) if searching else (None, None)
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            net.train()
            if searching and not self.weighting.finished and epoch >= search_epochs:
                self._finish_search(ctx, what)
            in_search = searching and not self.weighting.finished
            s = _seed(cfg.seed, t, epoch, dctx.rank)
            if in_search:  # the lower level trains on the images that are not held out
                batches = [[lower_part[i] for i in b] for b in epoch_batches(
                    len(lower_part), self.per_rank_batch, cfg.seed, t, epoch, dctx.rank, dctx.world_size)]
                held_batches = [[held_out[i] for i in b] for b in epoch_batches(
                    len(held_out), self.per_rank_batch, cfg.seed + 0x5EA, t, epoch, dctx.rank, dctx.world_size)]
                torch.manual_seed(s)
                val_iter = _cycle(lambda: self._loader(subset, held_batches, _seed(s, 0x5EA)))
            else:
                batches = epoch_batches(len(subset), self.per_rank_batch, cfg.seed, t, epoch, dctx.rank, dctx.world_size)
            torch.manual_seed(s)
            loader = self._loader(subset, batches, s)
            # Running sums stay on the device (float64, the same values as summing Python
            # floats): one host synchronisation per iteration (the finiteness check), not one per term.
            names: List[str] = []
            sums: Optional[torch.Tensor] = None
            count = 0
            it0 = epoch * per_epoch
            for i, (images, labels) in enumerate(
                _progress(loader, len(batches), f"{what} epoch {epoch + 1}/{epochs}", self.progress)
            ):
                it = it0 + i
                factor = (1.0 - it / total_iters) ** cfg.lr_power
                lr = base_lr * factor
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                images = images.to(dev, non_blocking=True)
                labels = labels.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    t_out, bctx = self.method.teacher_forward(teacher, images, labels, ctx)
                    s_out = net(images)
                    terms = self.method.terms(images, labels, s_out, t_out, bctx)
                total = self.weighting.total(terms)
                if not torch.isfinite(total):
                    bad = {k: float(v.detach()) for k, v in terms.items()}
                    raise FloatingPointError(f"{what} epoch {epoch + 1} iteration {i}: non-finite loss {bad}")
                optimizer.zero_grad(set_to_none=True)
                # per-term gradients while the graph is alive (RGE / GradNorm; nothing for fixed weights)
                self.weighting.update(student_plain, terms, scaler.get_scale() if scaler.is_enabled() else 1.0)
                scaler.scale(total).backward()
                if in_search:
                    self._search_update(student_plain, teacher, images, labels, t_out, bctx, ctx, val_iter, lr, scaler)
                scaler.step(optimizer)
                scaler.update()
                self.weighting.after_step()
                if not names:
                    names = list(terms)
                vals = torch.stack([terms[k].detach().double() for k in names] + [total.detach().double()])
                sums = vals if sums is None else sums + vals
                count += 1
            averages = (sums / count).tolist() if sums is not None else [0.0]
            means = dict(zip(names, averages[:-1]))
            total_mean = averages[-1]
            elapsed = time.time() - t0
            self.weighting.end_epoch(epoch, means)
            entry = {
                "step": t,
                "epoch": epoch + 1,
                "loss": means,
                "total": total_mean,
                "lr": lr if count else base_lr,
                "iterations": count,
                "time_s": round(elapsed, 3),
            }
            self.history.append(entry)
            terms_txt = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            self.log(
                f"{what} epoch {epoch + 1}/{epochs} | {terms_txt} | total {entry['total']:.4f} | "
                f"lr {entry['lr']:.2e} | {elapsed:.1f}s"
            )
            if dctx.is_main:
                atomic_save(
                    {
                        "identity": self.identity,
                        "step": t,
                        "epoch": epoch,
                        "classes_per_step": student_plain.classes_per_step,
                        "model": _plain_state(net),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "weighting": self.weighting.state_dict(),
                        "history": self.history,
                        "rng": rng_state(),
                    },
                    last,
                )
            barrier(dctx)

        if searching and not self.weighting.finished:  # every epoch was a search epoch
            self._finish_search(ctx, what)
        self.step_extras[t] = {"weights": self.weighting.weights(), "schemes": self.schemes(ctx)}
        trace = list(getattr(self.weighting, "trace", []) or [])
        if dctx.is_main and trace:
            report.write_json(
                self.out / "weights" / f"step{t}.json",
                {"step": t, "weighting": self.weighting.name, "trace": trace},
            )

        # evaluation and the step checkpoint
        model = copy.deepcopy(student_plain) if dctx.distributed and dev.type == "cuda" else student_plain
        if dctx.distributed and dev.type == "cuda":  # back to plain BatchNorm for saving / the next teacher
            plain = _build_model(self.cfg, student_plain.classes_per_step)
            plain.load_state_dict(_plain_state(student_plain))
            model = plain.to(dev)
        result = self.evaluate_step(model, t)
        self.results[t] = result
        if dctx.is_main:
            atomic_save(
                {
                    "identity": self.identity,
                    "step": t,
                    "classes_per_step": model.classes_per_step,
                    "model": _plain_state(model),
                    "results": [self.results[k] for k in sorted(self.results) if k <= t],
                    "config": self.cfg.to_dict(),
                },
                self.step_path(t),
            )
            if last.is_file():
                last.unlink()
            report.write_json(self.out / "history.json", self.history)
        barrier(dctx)
        return model

    def evaluate_step(self, model: nn.Module, t: int) -> dict:
        """Old/new/all mIoU after train step ``t`` (reduced over the ranks); the summary entry."""
        rt = self.report_step(t)
        val = self.val_subset(rt)
        cm = evaluate_model(
            model, val, self.num_classes, self.device, self.eval_batch, self.cfg.workers, self.amp_dtype,
            self.progress, f"eval step {rt}",
        )
        cm = reduce_confusion(cm)
        learnt = self.task.classes_until(rt)
        step_classes = learnt if self.joint else self.task.steps[rt]
        m = step_metrics(cm, rt, self.task.steps[0], learnt, self.class_names, step_classes).to_dict()
        losses = [h["loss"] for h in self.history if h["step"] == t]
        m["losses"] = losses[-1] if losses else {}
        m.update(self.step_extras.get(t, {"weights": {}, "schemes": {}}))
        m["_train_step"] = t
        return m

    # -- the run -----------------------------------------------------------------------------
    def summary(self) -> dict:
        steps = []
        for t in sorted(self.results):
            e = {k: v for k, v in self.results[t].items() if not k.startswith("_")}
            steps.append(e)
        return {
            "dataset": self.cfg.dataset,
            "task": self.task.name,
            "method": self.method_name,
            "disjoint": bool(self.cfg.disjoint),
            "backbone": self.cfg.backbone,
            "offline": self.joint,
            "class_names": self.class_names,
            "steps": steps,
        }

    def run(self) -> dict:
        """Train the planned steps, evaluate each, write the reports (rank 0); return the summary."""
        try:
            plan = self.plan()
            self.check_search_data(plan[0], plan[1])
            err = None
        except (RunError, ValueError, FileNotFoundError) as e:
            plan, err = None, e
        if self.dctx.distributed:  # every rank stops if one cannot plan
            errs = broadcast_object(self.dctx, repr(err) if err is not None else None)
            if err is None and errs is not None:
                raise RunError(f"rank 0 could not start the run: {errs}")
        if err is not None:
            raise err
        first, last, model = plan
        if self.dctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            report.write_json(
                self.out / "config.json",
                {"config": self.cfg.to_dict(), "identity": self.identity, "version": 1},
            )
        barrier(self.dctx)
        if first > last:
            self.log(f"{self.out}: every step is already trained")
        t_start = time.time()
        for t in range(first, last + 1):
            model = self.train_step(t, model)
            r = self.results[t]
            self.log(
                f"{self.method_name} step {self.report_step(t)}: mIoU old {report.format_number(r['miou_old']).strip()} "
                f"new {report.format_number(r['miou_new']).strip()} all {report.format_number(r['miou_all']).strip()}"
            )
        summary = self.summary()
        if self.dctx.is_main:
            report.write_reports(self.out, summary, [self.class_names[c] for c in self.task.steps[0]])
            traces = [json.loads(p.read_text()) for p in sorted((self.out / "weights").glob("step*.json"))]
            report.plot_weights(self.out / "weights.png", traces)
            self.log(report.format_table(summary), always=True)
            self.log(f"wrote {self.out / 'summary.json'} ({time.time() - t_start:.1f}s)")
        barrier(self.dctx)
        return summary


def train(cfg: TrainConfig, dctx: Optional[DistContext] = None) -> dict:
    """Run ``cfg`` (see :class:`Trainer`); returns the summary (on every rank)."""
    return Trainer(cfg, dctx).run()


def evaluate_run(
    out: str,
    data_root: Optional[str] = None,
    device: str = "auto",
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    report_dir: Optional[str] = None,
    quiet: bool = False,
    dctx: Optional[DistContext] = None,
) -> dict:
    """Re-evaluate every step checkpoint of the run in ``out`` with its saved config.

    Writes ``summary.json``, ``metrics.csv`` and ``miou.png`` to ``report_dir`` (default
    ``out/eval``) and returns the summary.
    """
    out_p = Path(out)
    config_path = out_p / "config.json"
    if not config_path.is_file():
        raise RunError(f"{out_p} holds no run (no config.json); train one with `lskd train --out {out_p}`")
    saved = json.loads(config_path.read_text())
    d = dict(saved["config"])
    d.update(resume=False, init_from=None, step=None, device=device, quiet=quiet)
    if data_root:
        d["data_root"] = data_root
    if batch_size:
        d["eval_batch_size"] = batch_size
    if workers is not None:
        d["workers"] = workers
    cfg = TrainConfig.from_dict(d)
    trainer = Trainer(cfg, dctx)
    check_identity(saved.get("identity", {}), trainer.identity, list(trainer.identity), config_path)
    found = [t for t in range(trainer.train_task.num_steps) if trainer.step_path(t).is_file()]
    if not found:
        raise RunError(f"{trainer.ckpt_dir} holds no step checkpoint to evaluate")
    saved: Dict[int, dict] = {}
    for t in found:
        ckpt = load_checkpoint(trainer.step_path(t))
        trainer._check_step_ckpt(ckpt, trainer.step_path(t), t, init=False)
        for r in ckpt.get("results", []):
            saved[int(r["_train_step"])] = {k: r.get(k, {}) for k in ("losses", "weights", "schemes")}
        trainer.step_extras[t] = {k: v for k, v in saved.get(t, {}).items() if k != "losses"}
        model = _build_model(cfg, ckpt["classes_per_step"])
        model.load_state_dict(ckpt["model"])
        model.to(trainer.device)
        result = trainer.evaluate_step(model, t)
        result["losses"] = saved.get(t, {}).get("losses", {})
        trainer.results[t] = result
    summary = trainer.summary()
    rdir = Path(report_dir) if report_dir else out_p / "eval"
    if trainer.dctx.is_main:
        report.write_reports(rdir, summary, [trainer.class_names[c] for c in trainer.task.steps[0]])
        if not quiet:
            print(report.format_table(summary), flush=True)
    return summary
