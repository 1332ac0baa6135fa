"""One training iteration: the method's terms, the weighting, the backward pass and the optimiser.

``total = weighting.total(terms)`` is the only place where weights meet terms. Dynamic
weightings (RGE, GradNorm) take their per-term gradients while the graph is alive; the search
phase runs its upper-level update after the backward pass (:mod:`lskd.train.phases`).
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import TYPE_CHECKING, Deque, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..models import DeepLabV3
from .config import TrainConfig, TrainingDiverged

if TYPE_CHECKING:  # pragma: no cover
    from .step import StepTrainer

__all__ = ["train_iteration", "autocast", "memory_format", "FiniteWatch", "EpochMeans", "diverged_message"]


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` to ``dtype``; disabled for None (float32 training)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    """The models' and images' layout of ``cfg.memory_format``."""
    return torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format


def train_iteration(
    step: "StepTrainer",
    net: nn.Module,
    plain: DeepLabV3,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr_factor: float,
    lr: float,
    where: str,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """One iteration of ``step`` on a batch; returns the (graph-free use only) terms and total.

    ``net`` is the trained module (DDP-wrapped when distributed), ``plain`` the student inside
    it; ``lr_factor`` the poly schedule's factor of this iteration, ``lr`` the network's lr.
    Raises :class:`TrainingDiverged` naming ``where`` and the term when the loss is not finite.
    """
    device, method, phase = step.device, step.run.method, step.phase
    weighting, optimizer, scaler = phase.weighting, step.optimizer, step.scaler
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor
    images = images.to(device, non_blocking=True, memory_format=memory_format(step.cfg))
    labels = labels.to(device, non_blocking=True)
    with autocast(device, step.run.amp_dtype):
        t_out, bctx = method.teacher_forward(step.teacher, images, labels, step.ctx)
        s_out = net(images)
        terms = method.terms(images, labels, s_out, t_out, bctx)
    total = weighting.total(terms)
    step.finite_watch.add(total, terms, where, step.cfg)
    optimizer.zero_grad(set_to_none=True)
    # per-term gradients while the graph is alive (RGE / GradNorm; nothing for fixed weights)
    weighting.update(plain, terms, scaler.get_scale() if scaler.is_enabled() else 1.0)
    scaler.scale(total).backward()
    phase.after_backward(plain, (images, labels, t_out, bctx), lr)
    scaler.step(optimizer)
    scaler.update()
    weighting.after_step()
    return terms, total


class FiniteWatch:
    """The divergence check of every iteration's total, without stopping the host on a GPU.

    On the CPU :meth:`add` raises at once. On a GPU the iteration's ``isfinite`` flag is copied
    to pinned host memory behind an event and read when the event has passed (:meth:`poll`,
    never waiting inside an iteration); the trainer calls ``poll(wait=True)`` before it saves
    an epoch, so a checkpoint never holds weights updated from a non-finite loss. The error
    names the iteration whose total was not finite, a few iterations after it ran.
    """

    def __init__(self) -> None:
        self.pending: Deque[tuple] = collections.deque()

    def add(self, total: torch.Tensor, terms: Dict[str, torch.Tensor], where: str, cfg: TrainConfig) -> None:
        if total.device.type != "cuda":
            if not torch.isfinite(total):
                raise TrainingDiverged(diverged_message(where, terms, cfg))
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(torch.isfinite(total.detach()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, flag, where, {k: v.detach() for k, v in terms.items()}, cfg))
        self.poll(wait=False)

    def poll(self, wait: bool = False) -> None:
        """Check the flags whose copies have arrived (all of them with ``wait``); raise
        :class:`TrainingDiverged` at the first non-finite one."""
        while self.pending and (wait or self.pending[0][0].query()):
            event, flag, where, terms, cfg = self.pending.popleft()
            event.synchronize()
            if not bool(flag):
                self.pending.clear()
                raise TrainingDiverged(diverged_message(where, terms, cfg))


def diverged_message(where: str, terms: Dict[str, torch.Tensor], cfg: TrainConfig) -> str:
    """What went non-finite, where, and what to try (one host copy per term: the run is over)."""
    values = {k: float(v.detach()) for k, v in terms.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    first = ", ".join(bad) if bad else "the weighted total (every term finite; a weight is not)"
    hints = ["a lower --lr / --lr-next"]
    if cfg.amp == "fp16":
        hints.append("--amp bf16 or none (fp16 overflows)")
    if cfg.weighting != "fixed" or cfg.search != "none":
        hints.append("--weighting fixed without --search (learnt weights can run away)")
    return (
        f"training diverged at {where}: non-finite loss term(s) {first} "
        f"(all terms: {', '.join(f'{k} {v:.4g}' for k, v in values.items())}); try {', or '.join(hints)}"
    )


class EpochMeans:
    """Mean of every term and of the total over an epoch's iterations.

    The running sums stay on the device (float64, the same values as summing Python floats):
    no host synchronisation per term and iteration.
    """

    def __init__(self) -> None:
        self.names: List[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, terms: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        if not self.names:
            self.names = list(terms)
        vals = torch.stack([terms[k].detach().double() for k in self.names] + [total.detach().double()])
        self.sums = vals if self.sums is None else self.sums + vals
        self.count += 1

    def result(self) -> Tuple[Dict[str, float], float]:
        """``({term: mean}, mean total)``; ``({}, 0.0)`` for an epoch without iterations."""
        averages = (self.sums / self.count).tolist() if self.sums is not None else [0.0]
        return dict(zip(self.names, averages[:-1])), averages[-1]
