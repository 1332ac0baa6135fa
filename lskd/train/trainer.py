"""A class-incremental run: its plan, its run directory, and the steps in order (docs/TRAINING_DESIGN.md).

A run trains the steps ``t = 0..T`` of a task in order (or one step alone) into a run directory
(:mod:`lskd.train.rundir`). The pieces, each in its own module:

* :mod:`lskd.train.config` -- the settings, their checks, which of them make the run's identity;
* :mod:`lskd.train.rundir` -- the files, the lock, config.json and history.json;
* this module -- the run: plan (which steps, from which model), checks before any training,
  the steps in order, the reports;
* :mod:`lskd.train.step` -- one step: set-up, resume, epochs, evaluation and checkpoint;
* :mod:`lskd.train.iteration` -- one iteration: the method's terms, the weighting, the optimiser;
* :mod:`lskd.train.phases` -- plain training or the bi-level search, as hooks of the step;
* :mod:`lskd.train.evaluation` -- evaluation of a model and ``lskd eval`` of a run directory.

Joint training (``method="joint"``) trains the "offline" task (one step with every class) and
reports it as the last step of ``task``, with the task's old/new split.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..data import (
    EvalTransform,
    IncrementalSubset,
    Task,
    TrainTransform,
    check_labels,
    eval_lut,
    load_dataset,
    parse_task,
    step_indices,
    train_lut,
)
from ..methods import Method, StepContext, build_method
from ..models import DeepLabV3
from . import report
from .batching import make_loader, mix_seed, search_split
from .checkpoint import check_identity, load_checkpoint
from .config import AMP_DTYPES, DATASETS, DEFAULT_EPOCHS, RunError, TrainConfig, TrainingDiverged
from .distributed import DistContext, barrier, broadcast_object, init_distributed
from .evaluation import evaluate_model, evaluate_run
from .metrics import reduce_confusion, step_metrics
from .rundir import RunDir, RunLock
from .step import StepTrainer, build_model

__all__ = [
    "TrainConfig",
    "DATASETS",
    "DEFAULT_EPOCHS",
    "Trainer",
    "train",
    "evaluate_run",
    "evaluate_model",
    "RunError",
    "TrainingDiverged",
]

#: What must match between a run and a checkpoint that starts it elsewhere (--init-from).
INIT_IDENTITY = ["dataset", "class_names", "backbone", "output_stride", "disjoint"]


#: Methods that pseudo-label (PLOP's entropy rule) and take ``pseudo_threshold``.
PSEUDO_LABELLING = ("plop", "lskd")


def method_options(cfg: TrainConfig, name: str) -> dict:
    """The constructor options of method ``name`` that the run's settings choose."""
    return {"pseudo_threshold": cfg.pseudo_threshold} if name in PSEUDO_LABELLING else {}


class _Log:
    """Rank-0 printing (stdout + OUT/train.log)."""

    def __init__(self, dctx: DistContext, run_dir: RunDir, quiet: bool) -> None:
        self.main = dctx.is_main
        self.quiet = quiet
        self.run_dir = run_dir

    def __call__(self, msg: str, always: bool = False) -> None:
        if not self.main:
            return
        if always or not self.quiet:
            print(msg, flush=True)
        self.run_dir.log_line(msg)


class Trainer:
    """One run (see the module docstring). ``Trainer(cfg, dctx).run() -> summary dict``."""

    def __init__(self, cfg: TrainConfig, dctx: Optional[DistContext] = None) -> None:
        self.cfg = cfg
        self.dctx = dctx or init_distributed(cfg.device)
        self.device = self.dctx.device
        self.run_dir = RunDir(cfg.out)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.method_name = cfg.method.lower()
        self.method: Method = build_method(self.method_name, **method_options(cfg, self.method_name))
        self._load_data()
        self.joint = self.method_name == "joint"
        self.train_task: Task = parse_task("offline", self.num_classes) if self.joint else self.task
        self._check_batch()
        self.eval_batch = cfg.eval_batch_size or self.per_rank_batch
        self.progress = (not cfg.quiet) and self.dctx.is_main and sys.stderr.isatty()
        self.log = _Log(self.dctx, self.run_dir, cfg.quiet)
        self.identity = self._identity()
        self.history: List[dict] = []
        self.results: Dict[int, dict] = {}
        self.step_extras: Dict[int, dict] = {}

    def _load_data(self) -> None:
        cfg = self.cfg
        root = Path(cfg.data_root)
        if not root.exists():
            raise FileNotFoundError(f"--data-root {root} does not exist")
        kind = DATASETS[cfg.dataset]
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

    def _check_batch(self) -> None:
        world = self.dctx.world_size
        if self.cfg.batch_size % world != 0:
            raise RunError(
                f"--batch-size {self.cfg.batch_size} (the global batch) is not divisible by the {world} ranks"
            )
        self.per_rank_batch = self.cfg.batch_size // world
        if self.per_rank_batch < 2:
            raise RunError(
                f"--batch-size {self.cfg.batch_size} gives {self.per_rank_batch} image per rank; BatchNorm needs >= 2"
            )

    def _identity(self) -> dict:
        cfg = self.cfg
        return {
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

    # -- the protocol -------------------------------------------------------------------------
    def report_step(self, t: int) -> int:
        """The step index written in the reports (joint: the task's last step)."""
        return self.task.num_steps - 1 if self.joint else t

    def context(self, t: int) -> StepContext:
        return StepContext(
            step=t, old_classes=self.train_task.old_classes(t), new_classes=len(self.train_task.steps[t])
        )

    def epochs_of(self, t: int) -> int:
        return self.cfg.epochs_step0 if t == 0 else self.cfg.epochs_later

    def lr_of(self, t: int) -> float:
        return self.cfg.lr if t == 0 else self.cfg.lr_next

    def step_name(self, t: int) -> str:
        return f"{self.method_name} step {t}/{self.train_task.num_steps - 1}"

    # -- data ---------------------------------------------------------------------------------
    def train_subset(self, t: int) -> IncrementalSubset:
        idx = step_indices(self.train_ds, self.train_task, t, self.cfg.disjoint, cache_dir=self.run_dir.cache_dir)
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

    def loader(self, subset, batches: List[List[int]], seed: int) -> torch.utils.data.DataLoader:
        return make_loader(subset, batches, seed, self.cfg.workers, self.device.type == "cuda")

    def prepare_batches(self, subset, t: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the step's training data, augmented with a fixed seed (for
        ``method.prepare_step``; every image once)."""
        mine = list(range(len(subset)))[self.dctx.rank :: self.dctx.world_size]
        batches = [mine[i : i + self.per_rank_batch] for i in range(0, len(mine), self.per_rank_batch)]
        s = mix_seed(self.cfg.seed, t, 0x9E37, self.dctx.rank)
        torch.manual_seed(s)
        return iter(self.loader(subset, batches, s))

    def search_split(self, n: int, t: int) -> Tuple[List[int], List[int]]:
        """``(lower, held_out)`` of step ``t``'s training subset (see :func:`batching.search_split`)."""
        return search_split(n, self.cfg.seed, t, self.cfg.search_split, self.dctx.world_size)

    # -- checkpoints ----------------------------------------------------------------------------
    def check_checkpoint(self, ckpt: dict, path: Path, t: int, init: bool = False) -> None:
        """Raise unless ``ckpt`` holds step ``t`` of this run (``init``: of a run that may start this one)."""
        if not init:
            check_identity(
                ckpt["identity"],
                self.identity,
                list(self.identity),
                path,
                f"(use another --out than {self.run_dir.root})",
            )
        else:
            check_identity(
                ckpt["identity"],
                self.identity,
                INIT_IDENTITY,
                path,
                "(--init-from needs a checkpoint of the same dataset, classes, protocol and model)",
            )
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
        if int(ckpt.get("step", -1)) != t:
            raise RunError(f"checkpoint {path} holds step {ckpt.get('step')}, expected step {t}")

    def load_step_model(self, path: Path, t: int, init: bool = False) -> DeepLabV3:
        """The model after step ``t`` from ``path`` (checked), on the CPU; its results are kept."""
        ckpt = load_checkpoint(path)
        self.check_checkpoint(ckpt, path, t, init)
        model = build_model(self.cfg, ckpt["classes_per_step"])
        model.load_state_dict(ckpt["model"])
        for r in ckpt.get("results", []):
            self.results[int(r["_train_step"])] = r
        return model

    # -- planning -----------------------------------------------------------------------------
    def plan(self) -> Tuple[int, int, Optional[DeepLabV3]]:
        """``(first, last, model_before_first)``: the steps to train and the model they start from.

        Checks that the run directory is free (or holds this run, with the same settings, when
        resuming or training a later step), loads ``--init-from`` / the previous step's
        checkpoint, and refuses what would overwrite a run.
        """
        cfg, run_dir = self.cfg, self.run_dir
        n = self.train_task.num_steps
        if cfg.step is not None and not 0 <= cfg.step < n:
            raise RunError(
                f"--step {cfg.step}: method {self.method_name!r} on task {self.task.name!r} has steps 0..{n - 1}"
            )
        saved = run_dir.read_config()
        if saved is not None:
            check_identity(
                saved.get("identity", {}),
                self.identity,
                list(self.identity),
                run_dir.config_path,
                f"(the folder {run_dir.root} holds another run; use another --out)",
            )
            run_dir.check_settings(saved, cfg)
        existing = run_dir.checkpoints()
        if not cfg.resume and cfg.step is None and existing:
            raise RunError(
                f"{run_dir.root} already holds a run ({len(existing)} checkpoint(s)); continue it with --resume "
                f"or choose another --out"
            )
        first = cfg.step if cfg.step is not None else 0
        last = cfg.step if cfg.step is not None else n - 1
        model: Optional[DeepLabV3] = None
        if cfg.init_from:
            first, model = self._init_from(Path(cfg.init_from), n)
        if cfg.resume:
            first, model = self._resume_plan(first, last, model)
        else:
            model = self._fresh_plan(first, last, model)
        self._load_earlier_steps(first)
        return first, last, model

    def _init_from(self, path: Path, n: int) -> Tuple[int, DeepLabV3]:
        if self.joint:
            raise RunError("--init-from: joint training has a single step and starts from scratch")
        k = int(load_checkpoint(path).get("step", -1))
        if k + 1 >= n:
            raise RunError(f"--init-from {path} is step {k}; task {self.task.name!r} has no step {k + 1}")
        if self.cfg.step is not None and self.cfg.step != k + 1:
            raise RunError(
                f"--init-from {path} is step {k}: it can only start step {k + 1}, not --step {self.cfg.step}"
            )
        return k + 1, self.load_step_model(path, k, init=True)

    def _resume_plan(self, first: int, last: int, model: Optional[DeepLabV3]) -> Tuple[int, Optional[DeepLabV3]]:
        """Skip the completed steps; the first unfinished one resumes from its epoch checkpoint."""
        while first <= last and self.run_dir.step_path(first).is_file():
            first += 1
        if 0 < first <= last and model is None:
            model = self.load_step_model(self.run_dir.step_path(first - 1), first - 1)
        elif first > last and first > 0:
            self.load_step_model(self.run_dir.step_path(last), last)  # results for the reports
        return first, model

    def _fresh_plan(self, first: int, last: int, model: Optional[DeepLabV3]) -> Optional[DeepLabV3]:
        run_dir = self.run_dir
        clash = [t for t in range(first, last + 1) if run_dir.step_path(t).is_file() or run_dir.last_path(t).is_file()]
        if clash:
            raise RunError(
                f"{run_dir.root} already has checkpoints of step(s) {clash}; use --resume to continue or another --out"
            )
        if first > 0 and model is None:
            prev = run_dir.step_path(first - 1)
            if not prev.is_file():
                raise RunError(
                    f"step {first} starts from the model after step {first - 1}, but {prev} does not exist "
                    f"(train step {first - 1} first, or give --init-from CKPT)"
                )
            model = self.load_step_model(prev, first - 1)
        return model

    def _load_earlier_steps(self, first: int) -> None:
        """Results and epoch history of the steps before ``first`` trained in this run directory
        (e.g. ``--step 1`` after ``--step 0``): the reports and history.json keep them."""
        on_disk = self.run_dir.read_history()
        for t in range(first):
            path = self.run_dir.step_path(t)
            if not path.is_file():
                continue
            entries = [h for h in on_disk if h.get("step") == t]
            if t not in self.results or not entries:  # e.g. killed before history.json was written
                ckpt = load_checkpoint(path)
                if t not in self.results:
                    self.results.update({int(r["_train_step"]): r for r in ckpt.get("results", [])})
                entries = entries or list(ckpt.get("history", []))
            self.history += entries

    # -- checks before any training -------------------------------------------------------------
    def preflight(self, first: int, last: int) -> None:
        """Everything that would otherwise fail after hours of training: the images of every step
        to train, the labels of the validation split, the search's split, the term names."""
        for t in range(first, last + 1):
            n = len(self.train_subset(t))
            if self.cfg.search == "bilevel" and t > 0 and self.context(t).incremental:
                self.search_split(n, t)
        check_labels(self.val_ds, cache_dir=self.run_dir.cache_dir, progress=self.progress)
        self._check_term_weights()

    def _check_term_weights(self) -> None:
        names = set()
        for t in range(self.train_task.num_steps):
            names.update(self.method.term_names(self.context(t)))
        unknown = sorted(set(self.cfg.term_weights) - names)
        if unknown:
            raise RunError(
                f"--term-weights: unknown term(s) {', '.join(unknown)} for method {self.method_name!r}; "
                f"its terms are {', '.join(sorted(names))}"
            )

    # -- evaluation and reports -----------------------------------------------------------------
    def evaluate_step(self, model: nn.Module, t: int) -> dict:
        """Old/new/all mIoU after train step ``t`` (reduced over the ranks); the summary entry."""
        rt = self.report_step(t)
        cm = evaluate_model(
            model,
            self.val_subset(rt),
            self.num_classes,
            self.device,
            self.eval_batch,
            self.cfg.workers,
            self.amp_dtype,
            self.progress,
            f"eval step {rt}",
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

    def summary(self) -> dict:
        steps = [{k: v for k, v in self.results[t].items() if not k.startswith("_")} for t in sorted(self.results)]
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

    def write_reports(self, t_start: float) -> dict:
        summary = self.summary()
        if self.dctx.is_main:
            out = self.run_dir.root
            report.write_reports(out, summary, [self.class_names[c] for c in self.task.steps[0]])
            traces = [json.loads(p.read_text()) for p in sorted(self.run_dir.weights_dir.glob("step*.json"))]
            report.plot_weights(out / "weights.png", traces)
            self.log(report.format_table(summary), always=True)
            self.log(f"wrote {out / 'summary.json'} ({time.time() - t_start:.1f}s)")
        barrier(self.dctx)
        return summary

    # -- the run ----------------------------------------------------------------------------------
    def start(self) -> Tuple[int, int, Optional[DeepLabV3], Optional[RunLock]]:
        """Lock the run directory, plan and check (on every rank; every rank stops if one
        cannot), clean what a killed run left, write config.json for a new run."""
        lock = None
        try:
            if self.dctx.is_main:
                lock = self.run_dir.lock("lskd train")
            first, last, model = self.plan()
            self.preflight(first, last)
            err = None
        except (RunError, ValueError, FileNotFoundError, OSError) as e:
            err = e
        if self.dctx.distributed:
            errs = broadcast_object(self.dctx, repr(err) if err is not None else None)
            if err is None and errs is not None:
                raise RunError(f"rank 0 could not start the run: {errs}")
        if err is not None:
            if lock is not None:
                lock.release()
            raise err
        if self.dctx.is_main:
            self._clean_start(lock)
        barrier(self.dctx)
        return first, last, model, lock

    def _clean_start(self, lock: RunLock) -> None:
        if lock.stale:
            self.log(f"{self.run_dir.root}: the previous process ({lock.stale}) ended without releasing its lock")
        for path in self.run_dir.remove_temporaries():
            self.log(f"removed {path} (left by an interrupted write)")
        if self.run_dir.read_config() is None:
            self.run_dir.write_config(self.cfg, self.identity)

    def run(self) -> dict:
        """Train the planned steps, evaluate each, write the reports (rank 0); return the summary."""
        first, last, model, lock = self.start()
        try:
            if first > last:
                self.log(f"{self.run_dir.root}: every step is already trained")
            t_start = time.time()
            for t in range(first, last + 1):
                model = StepTrainer(self, t, model).train()
                r = self.results[t]
                old, new, all_ = (report.format_number(r[k]).strip() for k in ("miou_old", "miou_new", "miou_all"))
                self.log(f"{self.method_name} step {self.report_step(t)}: mIoU old {old} new {new} all {all_}")
            return self.write_reports(t_start)
        finally:
            if lock is not None:
                lock.release()


def train(cfg: TrainConfig, dctx: Optional[DistContext] = None) -> dict:
    """Run ``cfg`` (see :class:`Trainer`); returns the summary (on every rank)."""
    return Trainer(cfg, dctx).run()
