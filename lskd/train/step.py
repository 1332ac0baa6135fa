"""One step of a run: set-up, resume, epochs, evaluation and the step checkpoint.

* step 0: a fresh DeepLabV3 (``--pretrained`` backbone) trained with the step-0 classes;
* step t > 0: teacher = frozen copy of the model after step t-1; student = the same weights
  plus a new classifier (``DeepLabV3.add_step``, MiB's balanced initialisation);
  ``method.prepare_step(teacher, batches, ctx)`` once (PLOP/LSKD entropy thresholds, on the
  step's training data with a seeded augmentation); then the iterations
  (:func:`lskd.train.iteration.train_iteration`);
* optimiser: SGD, momentum 0.9, Nesterov, weight decay 1e-4, poly learning rate
  ``lr * (1 - i / I) ** 0.9`` per iteration over the step's ``I`` iterations; ``lr`` at step 0 and
  ``lr_next`` after; the learnable weights of RGE / GradNorm in their own group (no weight
  decay, ``--weight-lr``, default the network's);
* after every epoch ``step{t}-last.pt`` (model, optimiser, scaler, weighting, the step's history,
  RNG states); after the step the evaluation on the whole validation set and ``step{t}.pt``.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
from torch import nn

from .._dist import average_over_ranks_
from ..models import DeepLabV3, convert_sync_batchnorm
from ..search import SchemeSearch
from ..weighting import build_weighting
from . import report
from .batching import epoch_batches, mix_seed
from .checkpoint import atomic_save, check_identity, load_checkpoint, rng_state, set_rng_state
from .config import RunError, TrainConfig
from .distributed import barrier
from .iteration import EpochMeans, FiniteWatch, autocast, memory_format, train_iteration
from .phases import SearchPhase, TrainingPhase

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = ["StepTrainer", "build_model", "plain_state", "TRAINING_EXTRAS"]


def build_model(cfg: TrainConfig, classes_per_step: Sequence[int], pretrained: Optional[str] = None) -> DeepLabV3:
    return DeepLabV3(cfg.backbone, list(classes_per_step), output_stride=cfg.output_stride, pretrained=pretrained)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile`` and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict on the CPU (SyncBatchNorm and BatchNorm share their key names)."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


#: What a step reports besides its metrics and losses (summary.json, step checkpoints, lskd eval).
TRAINING_EXTRAS = ("weights", "schemes", "pseudo_labels", "bn_gap")


def average_statistics(stats: Dict[str, float], dctx) -> Dict[str, float]:
    """The method's per-epoch statistics averaged over the ranks (each rank saw its own batches)."""
    if not stats or not dctx.distributed:
        return stats
    names = sorted(stats)
    values = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=dctx.device)
    average_over_ranks_([values])
    return dict(zip(names, values.tolist()))


def step_statistics(entries: List[dict]) -> Dict[str, float]:
    """The mean over a step's epochs of each per-epoch statistic (history entries' ``pseudo_labels``)."""
    per_epoch = [e["pseudo_labels"] for e in entries if e.get("pseudo_labels")]
    if not per_epoch:
        return {}
    return {k: sum(p[k] for p in per_epoch) / len(per_epoch) for k in per_epoch[0]}


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` with a tqdm bar of ``total`` items when ``enabled`` (rank 0, a terminal)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


class StepTrainer:
    """Trains step ``t`` of ``run`` from the model ``prev`` after step ``t - 1`` (None at step 0).
    ``StepTrainer(run, t, prev).train()`` returns the trained plain model."""

    def __init__(self, run: "Trainer", t: int, prev: Optional[DeepLabV3]) -> None:
        self.run, self.t, self.cfg = run, t, run.cfg
        self.dctx, self.device = run.dctx, run.device
        self.ctx = run.context(t)
        self.what = run.step_name(t)
        self.student, self.teacher = self._models(prev)
        self.subset = run.train_subset(t)
        self.epochs = run.epochs_of(t)
        self.per_epoch = len(self._batches(len(self.subset), 0, 0))
        self.total_iters = max(1, self.epochs * self.per_epoch)
        self.base_lr = run.lr_of(t)
        self.phase = self._phase()
        self.phase.start(self.epochs * self.per_epoch)
        self.optimizer = self._optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")
        self.finite_watch = FiniteWatch()
        self.last_path = run.run_dir.last_path(t)
        self.history: List[dict] = [h for h in run.history if h["step"] != t]
        self.bn_gap: Dict[str, Dict[str, float]] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def _models(self, prev: Optional[DeepLabV3]):
        """``(student, teacher)`` on the device in the run's memory format; the teacher frozen
        (None at step 0) and compiled when ``--compile`` says so."""
        n_new = len(self.run.train_task.steps[self.t])
        fmt = memory_format(self.cfg)
        if self.t == 0:
            torch.manual_seed(mix_seed(self.cfg.seed, 0, 0x1A17))
            return build_model(self.cfg, [n_new], self.cfg.pretrained).to(self.device, memory_format=fmt).train(), None
        if prev is None:
            raise RunError(f"step {self.t} needs the model after step {self.t - 1}")
        prev = prev.cpu()
        teacher = copy.deepcopy(prev).freeze().to(self.device, memory_format=fmt)
        if self.cfg.compile in ("teacher", "both"):
            teacher = torch.compile(teacher)
        student = copy.deepcopy(prev).unfreeze()
        student.add_step(n_new, balanced=True)
        if self.cfg.bn == "frozen":
            student.freeze_batchnorm()
        return student.to(self.device, memory_format=fmt).train(), teacher

    def _batches(self, n: int, salt: int, epoch: int) -> List[List[int]]:
        d = self.dctx
        return epoch_batches(n, self.run.per_rank_batch, self.cfg.seed + salt, self.t, epoch, d.rank, d.world_size)

    def _phase(self) -> TrainingPhase:
        """A fresh weighting per step; the bi-level search where asked (steps that add classes)."""
        cfg, run = self.cfg, self.run
        log = lambda msg: run.log(f"{self.what}: {msg}")  # noqa: E731
        if not (cfg.search == "bilevel" and self.ctx.incremental):
            return TrainingPhase(build_weighting(cfg.weighting, cfg.term_weights), run.method, self.ctx, log)
        search = SchemeSearch(order=cfg.search_order, lr=cfg.search_lr).to(self.device)
        return SearchPhase(
            search,
            run.method,
            self.ctx,
            log,
            split=run.search_split(len(self.subset), self.t),
            search_epochs=min(int(cfg.search_epochs), self.epochs),
            make_loader=lambda batches, seed: run.loader(self.subset, batches, seed),
            upper_objective=self._upper_objective,
            order=cfg.search_order,
            loss_scale=lambda: self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
            device=self.device,
        )

    def _upper_objective(self, student: DeepLabV3, images: torch.Tensor, labels: torch.Tensor):
        """The search's held-out loss (CE + UNKD) as a closure; the teacher pass runs once here."""
        amp = self.run.amp_dtype
        with torch.no_grad(), autocast(self.device, amp):
            t_out = self.teacher(images)

        def loss() -> torch.Tensor:
            with autocast(self.device, amp), self.run.method.statistics_paused():
                c = self.run.method.classification_terms(labels, student(images), t_out, self.ctx)
            return c["ce"].float() + c["unkd"].float()

        return loss

    def _optimizer(self) -> torch.optim.SGD:
        cfg, weighting = self.cfg, self.phase.weighting
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "base_lr": self.base_lr}]
        if weighting.parameters():
            w_lr = cfg.weight_lr if cfg.weight_lr is not None else self.base_lr
            groups.append({"params": weighting.parameters(), "base_lr": w_lr, "lr": w_lr, "weight_decay": 0.0})
        return torch.optim.SGD(
            groups, lr=self.base_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
        )

    def _resume(self) -> int:
        """Continue from ``step{t}-last.pt`` when resuming; the first epoch to train."""
        if not (self.cfg.resume and self.last_path.is_file()):
            return 0
        last, run = self.last_path, self.run
        state = load_checkpoint(last, map_location="cpu")
        check_identity(
            state["identity"], run.identity, list(run.identity), last, f"(use another --out than {run.run_dir.root})"
        )
        if state.get("classes_per_step") != self.student.classes_per_step:
            raise RunError(f"{last}: model classes {state.get('classes_per_step')} do not match step {self.t}")
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.phase.restore(state.get("weighting", {}))
        self.bn_gap = dict(state.get("bn_gap") or {})
        self.history += [h for h in state.get("history", []) if h.get("step") == self.t]
        set_rng_state(state.get("rng"))
        start = int(state["epoch"]) + 1
        run.log(f"step {self.t}: resuming after epoch {start}/{self.epochs} from {last}")
        return start

    def _wrap(self) -> nn.Module:
        """The student as trained: DDP with global-batch BatchNorm statistics when distributed."""
        net: nn.Module = self.student
        if self.dctx.distributed:
            net = convert_sync_batchnorm(net)  # SyncBatchNorm (CUDA) / DistBatchNorm2d
            dev = self.device
            net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
        if self.cfg.compile in ("student", "both"):
            net = torch.compile(net)  # the custom ops enter the graph through their fake kernels
        return net

    @torch.no_grad()
    def _measure_bn_gap(self, plain: DeepLabV3) -> None:
        """Each term at the step's first batch with the student's BatchNorm in train and in eval
        mode (on a copy: the running statistics stay as they are), into the log and the summary.
        At the first iteration the student has the teacher's weights: in eval mode its feature
        terms are exactly 0, in train mode they measure the batch-vs-running-statistics gap."""
        method = self.run.method
        if self.t == 0 or not (method.needs_teacher and self.ctx.incremental):
            return
        seed = mix_seed(self.cfg.seed, self.t, 0xB9A9)
        torch.manual_seed(seed)  # the epochs reseed torch's RNG: training is unaffected
        batch = self._batches(len(self.subset), 0, 0)[:1]
        images, labels = (x.to(self.device) for x in next(iter(self.run.loader(self.subset, batch, seed))))
        with autocast(self.device, self.run.amp_dtype):
            t_out, bctx = method.teacher_forward(self.teacher, images, labels, self.ctx)
        for mode in ("train", "eval"):
            probe = copy.deepcopy(plain).train(mode == "train")  # a train-mode pass moves running stats
            with autocast(self.device, self.run.amp_dtype):
                terms = method.terms(images, labels, probe(images), t_out, bctx)
            self.bn_gap[mode] = {k: float(v) for k, v in terms.items()}
        gap = ", ".join(f"{k} {self.bn_gap['train'][k]:.4g}/{self.bn_gap['eval'][k]:.4g}" for k in self.bn_gap["train"])
        self.run.log(f"{self.what}: first batch, student BatchNorm train/eval: {gap}")

    # -- the step ---------------------------------------------------------------------------------
    def train(self) -> DeepLabV3:
        """Train the remaining epochs, evaluate, save ``step{t}.pt``; return the plain model."""
        start = self._resume()
        net = self._wrap()
        plain: DeepLabV3 = unwrap(net)
        run = self.run
        if self.t > 0 and run.method.needs_prepare_step and start < self.epochs:
            run.method.prepare_step(self.teacher, run.prepare_batches(self.subset, self.t), self.ctx)
        if start == 0:
            run.log(
                f"{self.what}: classes {[run.class_names[c] for c in run.train_task.steps[self.t]]}, "
                f"{len(self.subset)} images, {self.epochs} epochs x {self.per_epoch} iterations, lr {self.base_lr:g}, "
                f"batch {self.cfg.batch_size} ({self.dctx.world_size} rank(s)), device {self.device}"
            )
            self._measure_bn_gap(plain)
        for epoch in range(start, self.epochs):
            entry = self._epoch(net, plain, epoch)
            self._save_epoch(net, plain, epoch, entry)
        self.phase.end()
        return self._finish(plain)

    def _epoch(self, net: nn.Module, plain: DeepLabV3, epoch: int) -> dict:
        """One epoch; its history entry."""
        t0 = time.time()
        net.train()
        seed = mix_seed(self.cfg.seed, self.t, epoch, self.dctx.rank)
        batches = self.phase.begin_epoch(epoch, seed, len(self.subset), self._batches)
        torch.manual_seed(seed)
        loader = self.run.loader(self.subset, batches, seed)
        self.run.method.reset_statistics()
        means = EpochMeans()
        lr = self.base_lr
        desc = f"{self.what} epoch {epoch + 1}/{self.epochs}"
        for i, (images, labels) in enumerate(progress_bar(loader, len(batches), desc, self.run.progress)):
            it = epoch * self.per_epoch + i
            factor = (1.0 - it / self.total_iters) ** self.cfg.lr_power
            lr = self.base_lr * factor
            where = f"{self.what} epoch {epoch + 1}/{self.epochs} iteration {i + 1}"
            terms, total = train_iteration(self, net, plain, images, labels, factor, lr, where)
            means.add(terms, total)
        self.finite_watch.poll(wait=True)  # before this epoch's weights are logged or saved
        return self._log_epoch(epoch, means, lr, time.time() - t0)

    def _log_epoch(self, epoch: int, means: "EpochMeans", lr: float, elapsed: float) -> dict:
        terms, total = means.result()
        self.phase.weighting.end_epoch(epoch, terms)
        stats = average_statistics(self.run.method.step_statistics(), self.dctx)
        entry = {
            "step": self.t,
            "epoch": epoch + 1,
            "loss": terms,
            "total": total,
            "lr": lr if means.count else self.base_lr,
            "iterations": means.count,
            "time_s": round(elapsed, 3),
        }
        if stats:
            entry["pseudo_labels"] = stats
        self.history.append(entry)
        terms_txt = " ".join(f"{k} {v:.4f}" for k, v in [*terms.items(), *stats.items()])
        self.run.log(
            f"{self.what} epoch {epoch + 1}/{self.epochs} | {terms_txt} | total {entry['total']:.4f} | "
            f"lr {entry['lr']:.2e} | {elapsed:.1f}s"
        )
        return entry

    def _save_epoch(self, net: nn.Module, plain: DeepLabV3, epoch: int, entry: dict) -> None:
        if self.dctx.is_main:
            atomic_save(
                {
                    "identity": self.run.identity,
                    "step": self.t,
                    "epoch": epoch,
                    "classes_per_step": plain.classes_per_step,
                    "model": plain_state(net),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "weighting": self.phase.weighting.state_dict(),
                    "history": [h for h in self.history if h["step"] == self.t],
                    "bn_gap": self.bn_gap,
                    "rng": rng_state(),
                },
                self.last_path,
            )
        barrier(self.dctx)

    # -- the end of the step ----------------------------------------------------------------------
    def _finish(self, plain: DeepLabV3) -> DeepLabV3:
        """Traces, evaluation, ``step{t}.pt``, history.json; the model for the next step."""
        run, t = self.run, self.t
        run.history = self.history
        run.step_extras[t] = {"weights": self.phase.weighting.weights(), "schemes": self.phase.schemes()}
        stats = step_statistics([h for h in self.history if h["step"] == t])
        if stats:
            run.step_extras[t]["pseudo_labels"] = stats
        if self.bn_gap:
            run.step_extras[t]["bn_gap"] = self.bn_gap
        trace = list(self.phase.weighting.trace)
        if self.dctx.is_main and trace:
            report.write_json(
                run.run_dir.weights_dir / f"step{t}.json",
                {"step": t, "weighting": self.phase.weighting.name, "trace": trace},
            )
        model = plain
        if self.dctx.distributed and self.device.type == "cuda":  # back to plain BatchNorm
            model = build_model(self.cfg, plain.classes_per_step)
            model.load_state_dict(plain_state(plain))
            model = model.to(self.device)
        run.results[t] = run.evaluate_step(model, t)
        if self.dctx.is_main:
            self._save_step(model)
        barrier(self.dctx)
        return model

    def _save_step(self, model: DeepLabV3) -> None:
        run, t = self.run, self.t
        atomic_save(
            {
                "identity": run.identity,
                "step": t,
                "classes_per_step": model.classes_per_step,
                "model": plain_state(model),
                "results": [run.results[k] for k in sorted(run.results) if k <= t],
                "history": [h for h in self.history if h["step"] == t],
                "config": self.cfg.to_dict(),
            },
            run.run_dir.step_path(t),
        )
        if self.last_path.is_file():
            self.last_path.unlink()
        run.run_dir.write_history(self.history)
