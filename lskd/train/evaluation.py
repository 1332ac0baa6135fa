"""Evaluation: a model on a validation set, and ``lskd eval`` of a run directory.

After every step the trainer evaluates on the whole validation set with ``eval_lut`` labels
(classes not yet learnt -> 255): logits upsampled bilinearly to the labels, argmax, confusion
matrix summed over the ranks, old/new/all mIoU (:mod:`lskd.train.metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import pad_collate
from ..methods.base import class_argmax
from . import report
from .checkpoint import check_identity, load_checkpoint
from .config import RunError, TrainConfig
from .distributed import DistContext
from .metrics import confusion_matrix
from .rundir import RunDir
from .step import TRAINING_EXTRAS, build_model, progress_bar, unwrap

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = ["evaluate_model", "evaluate_run"]


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
    net = unwrap(model)
    was_training = net.training
    net.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    if len(dataset) > 0:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=max(1, batch_size), shuffle=False, num_workers=workers, collate_fn=pad_collate
        )
        for images, labels in progress_bar(loader, len(loader), desc, progress):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(images).logits
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            cm += confusion_matrix(class_argmax(logits), labels, num_classes)
    net.train(was_training)
    return cm.cpu()


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
    """Re-evaluate every step checkpoint of the run directory ``out`` with its saved config.

    The checkpoints are ``out``'s own (a run directory may be moved or copied); a step the run
    trained whose checkpoint is missing is an error. Writes ``summary.json``, ``metrics.csv`` and
    ``miou.png`` to ``report_dir`` (default ``out/eval``) and returns the summary.
    """
    from .trainer import Trainer

    if batch_size is not None and batch_size < 1:
        raise RunError(f"--batch-size must be >= 1, got {batch_size}")
    run_dir = RunDir(out)
    saved = run_dir.read_config()
    if saved is None:
        raise RunError(
            f"{run_dir.root} holds no run (no config.json); train one with `lskd train --out {run_dir.root}`"
        )
    d = dict(saved["config"])
    d.update(out=str(run_dir.root), resume=False, init_from=None, step=None, device=device, quiet=quiet)
    if data_root:
        d["data_root"] = data_root
    if batch_size:
        d["eval_batch_size"] = batch_size
    if workers is not None:
        d["workers"] = workers
    trainer = Trainer(TrainConfig.from_dict(d), dctx)
    check_identity(saved.get("identity", {}), trainer.identity, list(trainer.identity), run_dir.config_path)
    lock = run_dir.lock("lskd eval") if trainer.dctx.is_main else None
    try:
        _evaluate_checkpoints(trainer, _steps_to_evaluate(trainer))
        summary = trainer.summary()
        rdir = Path(report_dir) if report_dir else run_dir.root / "eval"
        if trainer.dctx.is_main:
            report.write_reports(rdir, summary, [trainer.class_names[c] for c in trainer.task.steps[0]])
            if not quiet:
                print(report.format_table(summary), flush=True)
    finally:
        if lock is not None:
            lock.release()
    return summary


def _steps_to_evaluate(trainer: "Trainer") -> List[int]:
    """The steps with a checkpoint in the run directory; every step the run recorded as trained
    (history.json) must have one."""
    run_dir = trainer.run_dir
    found = [t for t in range(trainer.train_task.num_steps) if run_dir.step_path(t).is_file()]
    trained = sorted({int(h["step"]) for h in run_dir.read_history() if "step" in h})
    missing = [t for t in trained if t not in found]
    if missing:
        names = ", ".join(run_dir.step_path(t).name for t in missing)
        raise RunError(
            f"{run_dir.ckpt_dir} lacks the checkpoint(s) {names} of step(s) the run trained; "
            f"a run directory must be copied or moved whole"
        )
    if not found:
        raise RunError(f"{run_dir.ckpt_dir} holds no step checkpoint to evaluate")
    return found


def _evaluate_checkpoints(trainer: "Trainer", steps: List[int]) -> None:
    """Evaluate each step checkpoint into ``trainer.results`` (training losses, weights and
    schemes as the checkpoints recorded them)."""
    saved: Dict[int, dict] = {}
    for t in steps:
        path = trainer.run_dir.step_path(t)
        ckpt = load_checkpoint(path)
        trainer.check_checkpoint(ckpt, path, t)
        for r in ckpt.get("results", []):
            saved[int(r["_train_step"])] = {k: r[k] for k in ("losses", *TRAINING_EXTRAS) if k in r}
        trainer.step_extras[t] = {k: v for k, v in saved.get(t, {}).items() if k != "losses"}
        model = build_model(trainer.cfg, ckpt["classes_per_step"])
        model.load_state_dict(ckpt["model"])
        model.to(trainer.device)
        result = trainer.evaluate_step(model, t)
        result["losses"] = saved.get(t, {}).get("losses", {})
        trainer.results[t] = result
