"""How a step's loss terms are weighted while it trains: plain training, or the bi-level search.

The step loop (:mod:`lskd.train.step`) calls the same hooks whatever the phase:

* :meth:`TrainingPhase.start` once, :meth:`TrainingPhase.restore` when resuming;
* :meth:`TrainingPhase.begin_epoch` before every epoch: it returns the epoch's batches;
* :meth:`TrainingPhase.after_backward` after every backward pass;
* :meth:`TrainingPhase.end` once the epochs are done; :meth:`TrainingPhase.schemes` for the summary.

:class:`TrainingPhase` trains with a :class:`lskd.weighting.Weighting` (fixed, RGE, GradNorm).
:class:`SearchPhase` runs LSKD's bi-level search (docs/TRAINING_DESIGN.md) during the
first ``--search-epochs`` of the step: the lower level trains on the images not held out, an
upper-level update of the scheme logits and map weights follows every lower-level backward, then
the argmax schemes and the learnt map weights are fixed for the rest of the step.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..methods import MAP_NAMES, SEARCH, Method, StepContext
from ..models import DeepLabV3
from ..search import SchemeSearch, SearchWeighting
from ..weighting import Weighting
from .batching import mix_seed
from .config import RunError

__all__ = ["TrainingPhase", "SearchPhase", "EpochBatches"]

#: ``(n, salt, epoch) -> batches``: the epoch's batches of indices into ``range(n)`` on this rank
#: (the permutation seeded by the run's seed plus ``salt``).
EpochBatches = Callable[[int, int, int], List[List[int]]]
#: ``(batches, seed) -> loader`` of the step's training subset.
MakeLoader = Callable[[List[List[int]], int], Iterator]
#: Salt of the held-out split's batch order and loader seed.
HELD_OUT_SALT = 0x5EA
#: How many weight-trace entries a step records at most (for the plots).
TRACE_POINTS = 400


class TrainingPhase:
    """A step trained with one weighting and no search (the hooks are nearly no-ops)."""

    def __init__(self, weighting: Weighting, method: Method, ctx: StepContext, log: Callable[[str], None]) -> None:
        self.weighting = weighting
        self.method = method
        self.ctx = ctx
        self.log = log  # takes a message; prefixes it with the step's name

    def start(self, iterations: int) -> None:
        """Before the first epoch (also when resuming): the method's terms meet the weighting."""
        self.weighting.begin_step(self.method.term_names(self.ctx), self.ctx)
        self.weighting.trace_every = max(1, iterations // TRACE_POINTS)

    def restore(self, state: dict) -> None:
        """The weighting's state from an epoch checkpoint."""
        self.weighting.load_state_dict(state)

    def begin_epoch(self, epoch: int, epoch_seed: int, n: int, batches_of: EpochBatches) -> List[List[int]]:
        """The epoch's batches (indices into the step's training subset of ``n`` images).
        ``epoch_seed``: the seed of the epoch's augmentation on this rank."""
        return batches_of(n, 0, epoch)

    def after_backward(self, student: DeepLabV3, batch: tuple, lr: float) -> None:
        """After the lower-level backward of one iteration (nothing without a search)."""

    def end(self) -> None:
        """After the step's last epoch."""

    def schemes(self) -> Dict[str, str]:
        """``{map name: scheme}`` the method distils at this step (LSKD; empty for the others and at step 0)."""
        schemes = getattr(self.method, "schemes", None)
        if not self.ctx.incremental or not isinstance(schemes, dict):
            return {}
        return {MAP_NAMES[m]: schemes.get(m, "none") for m in range(len(MAP_NAMES))}


class SearchPhase(TrainingPhase):
    """LSKD's bi-level search of per-map schemes and weights (see the module docstring).

    Args:
        search: the scheme logits, map weights and their Adam (on the training device).
        split: ``(lower, held_out)`` indices into the step's training subset.
        search_epochs: epochs of the step that search (the rest train with the fixed result).
        make_loader: a loader of the step's training subset for given batches and seed.
        upper_objective: ``(student, images, labels) -> loss_fn``: the held-out loss (CE + UNKD
            against the teacher, whose pass on the held-out batch it runs once) as a closure.
        order: 1 (first order in the step size) or 2 (DARTS' unrolled step).
        loss_scale: the GradScaler's current scale (1 without one).
    """

    def __init__(
        self,
        search: SchemeSearch,
        method: Method,
        ctx: StepContext,
        log: Callable[[str], None],
        split: Tuple[Sequence[int], Sequence[int]],
        search_epochs: int,
        make_loader: MakeLoader,
        upper_objective: Callable[[DeepLabV3, torch.Tensor, torch.Tensor], Callable[[], torch.Tensor]],
        order: int,
        loss_scale: Callable[[], float],
        device: torch.device,
    ) -> None:
        super().__init__(SearchWeighting(search), method, ctx, log)
        self.lower, self.held_out = list(split[0]), list(split[1])
        self.search_epochs = search_epochs
        self.make_loader = make_loader
        self.upper_objective = upper_objective
        self.order = order
        self.loss_scale = loss_scale
        self.device = device
        self._held_iter: Optional[Iterator] = None
        method.set_schemes({m: SEARCH for m in range(len(MAP_NAMES))})

    @property
    def searching(self) -> bool:
        return not self.weighting.finished

    def restore(self, state: dict) -> None:
        super().restore(state)
        if self.weighting.finished:  # the search ended before the kill
            self.method.set_schemes(self.weighting.chosen)
            self.weighting.begin_step(self.method.term_names(self.ctx), self.ctx)

    def begin_epoch(self, epoch: int, epoch_seed: int, n: int, batches_of: EpochBatches) -> List[List[int]]:
        if self.searching and epoch >= self.search_epochs:
            self._finish()
        if not self.searching:
            self._held_iter = None
            return batches_of(n, 0, epoch)
        lower = [[self.lower[i] for i in b] for b in batches_of(len(self.lower), 0, epoch)]
        held = [[self.held_out[i] for i in b] for b in batches_of(len(self.held_out), HELD_OUT_SALT, epoch)]
        self._held_iter = _cycle(self.make_loader, held, mix_seed(epoch_seed, HELD_OUT_SALT))
        return lower

    def after_backward(self, student: DeepLabV3, batch: tuple, lr: float) -> None:
        """One upper-level step: the hypergradient of the held-out loss with respect to the scheme
        logits and map weights (finite differences on this batch's terms), then Adam."""
        if self._held_iter is None:
            return
        images, labels, t_out, bctx = batch
        v_images, v_labels = (x.to(self.device, non_blocking=True) for x in next(self._held_iter))
        upper_loss = self.upper_objective(student, v_images, v_labels)

        def terms_fn():  # float32 even under --amp: finite differences of bf16 losses are noise
            return self.method.terms(images, labels, student(images), t_out, bctx)

        params = [p for p in student.parameters() if p.requires_grad]
        train_grads = None
        if self.order == 2:
            inv = 1.0 / self.loss_scale()
            train_grads = [None if p.grad is None else p.grad * inv for p in params]
        search = self.weighting.search
        diag = search.hypergradient(
            params,
            terms_fn,
            upper_loss,
            xi=lr,
            train_grads=train_grads,
            buffers_of=student,
        )
        search.step()
        self.weighting.record(diag)

    def end(self) -> None:
        if self.searching:  # every epoch was a search epoch
            self._finish()

    def _finish(self) -> None:
        """Fix the argmax scheme of every map and the learnt map weights for the rest of the step."""
        chosen = self.weighting.finish()
        self.method.set_schemes(chosen)
        self.weighting.begin_step(self.method.term_names(self.ctx), self.ctx)
        w = self.weighting.search.weights()
        self.log(
            "search done; schemes " + ", ".join(f"{MAP_NAMES[m]} {chosen[m]} (w {w[m]:.2f})" for m in sorted(chosen))
        )


def _cycle(make_loader: MakeLoader, batches: List[List[int]], seed: int) -> Iterator:
    """Endless iterator over the held-out batches (a fresh loader per pass, each seeded alike)."""
    while True:
        empty = True
        for item in make_loader(batches, seed):
            empty = False
            yield item
        if empty:
            raise RunError("the search's held-out split yields no batch")
