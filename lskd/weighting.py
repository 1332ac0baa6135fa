"""Weighting of the named loss terms: ``total = sum_i w_i * term_i``, in ONE place (docs/MATHEMATICS.md §3.1, §4).

A method returns named, unweighted terms (each already times its base factor); a
:class:`Weighting` turns them into the total that is back-propagated. Three schemes:

* :class:`FixedWeights`: constant ``w_i`` (1 unless given);
* :class:`RGE`: LSKD's regularised gradient equilibrium (docs/MATHEMATICS.md §4.1), the released rule;
* :class:`GradNorm`: plain GradNorm (Chen et al., ICML 2018): L2 norms, alpha = 1.5.

Protocol (the trainer's loop, and a user's own loop)::

    weighting.begin_step(names, new_classes=n_new, old_classes=n_old)   # once per step
    for batch in data:
        terms = {...}                                   # name -> scalar tensor (graph alive)
        total = weighting.total(terms)                  # sum_i w_i * term_i (w detached)
        weighting.update(model, terms)                  # dynamic schemes: set w.grad (graph still alive)
        total.backward(); optimizer.step()              # ``optimizer`` holds weighting.parameters() ...
        weighting.after_step()                          # ... or the scheme's own (``lr=``); clamp / renormalise
    weighting.end_epoch(epoch, mean_terms)              # per-epoch renormalisation, L(0)

``update`` must run while the graph of ``terms`` is alive (before ``total.backward()``, or after it
with ``retain_graph=True``). The weights are initialised to 1 at every ``begin_step``.

Per-term gradients (RGE and GradNorm). Term i acts on one small parameter tensor W_i, the first
parameter of the layer that produces its map (:func:`lskd.terms.term_layer`, docs/MATHEMATICS.md §4.1).
``dL_i/dW_i`` comes from one ``torch.autograd.grad(L_i, W_i, retain_graph=True)``
per term: autograd runs only the part of the graph between the term and W_i (the head for the
ASPP terms, one backbone stage for the others), never the whole network, and nothing is
accumulated into ``.grad``. The overhead (about +10 % per iteration on the CPU) is measured by
benches/test_bench_training.py; results in benches/results/cpu-2026-11-26.md.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ._dist import average_over_ranks_
from .terms import LAYERS, LOGITS_MAP, parse_term, term_layer

__all__ = [
    "Weighting",
    "FixedWeights",
    "RGE",
    "GradNorm",
    "WEIGHTINGS",
    "build_weighting",
    "parse_weights",
    "term_layer",
    "deeplab_layers",
]


class Weighting:
    """Base class; see the module docstring for the protocol."""

    name = "weighting"

    def begin_step(
        self,
        names: Iterable[str],
        ctx: object = None,
        new_classes: Optional[int] = None,
        old_classes: Optional[int] = None,
    ) -> None:
        """Called once at the start of every step with the term names the method returns.

        ``ctx`` may be a :class:`lskd.methods.StepContext` (its ``new_classes`` / ``old_classes``
        are used when the keyword arguments are not given)."""

    def weight(self, name: str) -> float:
        """The current weight of term ``name``."""
        raise NotImplementedError

    def term_factors(self, terms: Mapping[str, torch.Tensor]) -> Mapping[str, object]:
        """The factor of each term in :meth:`total`: a float, or a 0-dim tensor on the terms'
        device (no host synchronisation); a name left out counts 1."""
        return {name: self.weight(name) for name in terms}

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i * term_i`` over the terms (float32 accumulation; w_i never receive gradients here)."""
        if not terms:
            raise ValueError("weighting: no loss term to sum")
        factors = self.term_factors(terms)
        total: Optional[torch.Tensor] = None
        for name, value in terms.items():
            f = factors.get(name)
            part = value.float() if f is None else value.float() * f
            total = part if total is None else total + part
        return total

    def update(self, model: Optional[nn.Module], terms: Mapping[str, torch.Tensor], loss_scale: float = 1.0) -> None:
        """Per batch, while the graph of ``terms`` is alive: dynamic schemes set their weights' ``.grad``.

        ``loss_scale``: the factor the terms' gradients would carry (a GradScaler's scale under
        fp16), divided out of the per-term gradients."""

    def after_step(self) -> None:
        """Per batch, after the optimiser step (own optimiser step, clamping, renormalisation)."""

    def end_epoch(self, epoch: int, last_terms: Optional[Mapping[str, float]] = None) -> None:
        """Hook after every epoch (``epoch`` counts from 0 within the step)."""

    def parameters(self) -> List[nn.Parameter]:
        """Learnable weights for the caller's optimiser (none for fixed weights, or when the scheme
        steps its own optimiser)."""
        return []

    _names: Sequence[str] = ()  # the names given to begin_step (set by the subclasses)
    #: Record the weights every this many updates (0: never; schemes without a trace ignore it).
    trace_every: int = 0
    #: The recorded entries (for the plots); schemes that record replace it by a list.
    trace: Sequence[dict] = ()

    def weights(self, names: Optional[Iterable[str]] = None) -> Dict[str, float]:
        """``{name: weight}`` for ``names`` (default: every name given to :meth:`begin_step`)."""
        names = list(names) if names is not None else list(self._names)
        return {n: self.weight(n) for n in names}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedWeights(Weighting):
    """Constant weights: ``w[name]`` from ``weights`` (default ``default`` = 1 for the others).

    Args:
        weights: per term name, its weight (e.g. ``{"unkd": 0.5}``).
        default: the weight of the names not in ``weights``.
    """

    name = "fixed"

    def __init__(self, weights: Optional[Mapping[str, float]] = None, default: float = 1.0) -> None:
        self._weights: Dict[str, float] = {str(k): float(v) for k, v in (weights or {}).items()}
        self.default = float(default)
        self._names: List[str] = []

    def begin_step(
        self,
        names: Iterable[str],
        ctx: object = None,
        new_classes: Optional[int] = None,
        old_classes: Optional[int] = None,
    ) -> None:
        self._names = list(names)

    def weight(self, name: str) -> float:
        return self._weights.get(name, self.default)

    def state_dict(self) -> dict:
        return {"weights": dict(self._weights), "default": self.default}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._weights = {str(k): float(v) for k, v in state.get("weights", {}).items()}
            self.default = float(state.get("default", self.default))


# ------------------------------------------------------------------------------ layers


def deeplab_layers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """RGE's layers (:data:`lskd.terms.LAYERS`) of a :class:`lskd.models.DeepLabV3` (or a DDP wrapper
    of one): ``{"stage1".."stage4": first parameter of the stage, "aspp": ASPP output BatchNorm weight}``
    (with frozen BatchNorm, whose weight does not train: the ASPP projection conv's weight)."""
    net = model.module if hasattr(model, "module") else model
    try:
        stages = [getattr(net.backbone, f"layer{k}") for k in range(1, 5)]
        aspp_norm = net.aspp.project[1].weight
        if not aspp_norm.requires_grad:
            # BatchNorm frozen (--bn frozen, the release's fix_bn): the release would fail here
            # (autograd.grad of a tensor without grad); the projection conv feeding that BatchNorm
            # is the nearest trainable parameter of the same layer
            aspp_norm = net.aspp.project[0].weight
    except AttributeError as e:
        raise ValueError(
            f"weighting: cannot find the layers of {type(net).__name__} (expected a DeepLabV3 with "
            f"backbone.layer1..4 and aspp.project[1]); pass layers={{'aspp': tensor, 'stage1': tensor, ...}}"
        ) from e
    *stage_keys, head_key = LAYERS
    out = {key: next(s.parameters()) for key, s in zip(stage_keys, stages)}
    out[head_key] = aspp_norm
    return out


def _per_term(grads: Sequence[Optional[torch.Tensor]], stat: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[T]`` float64 on the CPU: ``stat(grad)`` per term, 0 where the gradient is None; one
    device-to-host copy for all the terms."""
    vals = [stat(g).reshape(()) for g in grads if g is not None]
    out = torch.zeros(len(grads), dtype=torch.float64)
    if vals:
        idx = torch.tensor([i for i, g in enumerate(grads) if g is not None])
        out[idx] = torch.stack([v.to(vals[0].device) for v in vals]).cpu()
    return out


class _GradientBalance(Weighting):
    """Common machinery of RGE and GradNorm: learnable w (one per term, init 1), per-term
    gradients on small parameter tensors, L(0), a balance loss whose gradient becomes w.grad.

    Args:
        layers: ``{layer key: tensor}`` (default: :func:`deeplab_layers` of the model given to
            :meth:`update`); the keys are those of ``layer_of``.
        layer_of: term name -> (layer key, group) (default :func:`term_layer`).
        lr: when given, the scheme steps its own SGD (no momentum) on w in :meth:`after_step`;
            otherwise the caller's optimiser must hold :meth:`parameters`.
        w_min: weights are clamped to >= w_min after every optimiser step (keeps them positive).
        trace_every: record the weights every this many updates (for the plots; 0 = never).
    """

    alpha = 1.0

    def __init__(
        self,
        layers: Optional[Mapping[str, torch.Tensor]] = None,
        layer_of: Callable[[str], Tuple[str, str]] = term_layer,
        lr: Optional[float] = None,
        w_min: float = 1e-3,
        trace_every: int = 1,
    ) -> None:
        self.layers = dict(layers) if layers is not None else None
        self.layer_of = layer_of
        self.lr = lr
        self.w_min = float(w_min)
        self.trace_every = int(trace_every)
        self._names: List[str] = []
        self.w = nn.Parameter(torch.ones(0, dtype=torch.float32), requires_grad=True)
        self.new_classes = 0
        self.old_classes = 0
        self.loss0: Optional[torch.Tensor] = None  # L_i(0), float64 [T]
        self.epochs_done = 0
        self.updates = 0
        self.trace = []
        self._optimizer: Optional[torch.optim.Optimizer] = None

    # -- bookkeeping ---------------------------------------------------------------------
    def begin_step(
        self,
        names: Iterable[str],
        ctx: object = None,
        new_classes: Optional[int] = None,
        old_classes: Optional[int] = None,
    ) -> None:
        self._names = list(names)
        for n in self._names:
            self.layer_of(n)  # unknown names fail here, with the name
        self.new_classes = int(new_classes if new_classes is not None else getattr(ctx, "new_classes", 0) or 0)
        self.old_classes = int(old_classes if old_classes is not None else getattr(ctx, "old_classes", 0) or 0)
        with torch.no_grad():
            self.w = nn.Parameter(torch.ones(len(self._names), dtype=torch.float32))
        self.loss0 = None
        self.epochs_done = 0
        self.updates = 0
        self.trace = []
        self._optimizer = torch.optim.SGD([self.w], lr=self.lr) if self.lr is not None else None

    @property
    def names(self) -> List[str]:
        return list(self._names)

    def index(self, name: str) -> int:
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(f"{self.name}: unknown term {name!r}; this step's terms are {self._names}") from None

    def weight(self, name: str) -> float:
        if name not in self._names:
            raise KeyError(f"{self.name}: unknown term {name!r}; call begin_step with the step's terms {self._names}")
        return float(self.w.detach()[self._names.index(name)])

    def term_factors(self, terms: Mapping[str, torch.Tensor]) -> Mapping[str, object]:
        missing = [n for n in terms if n not in self._names]
        if missing:
            raise KeyError(f"{self.name}: terms {missing} were not announced by begin_step ({self._names})")
        w = self.w.detach().to(next(iter(terms.values())).device) if terms else self.w  # one copy, not one per term
        return {name: w[self._names.index(name)] for name in terms}

    def parameters(self) -> List[nn.Parameter]:
        return [] if self._optimizer is not None else [self.w]

    # -- per-term gradients --------------------------------------------------------------
    def term_gradients(
        self, model: Optional[nn.Module], terms: Mapping[str, torch.Tensor], loss_scale: float = 1.0
    ) -> List[Optional[torch.Tensor]]:
        """``dL_i/dW_i`` per announced term (None when W_i is not reached: a zero gradient)."""
        layers = self.layers
        if layers is None:
            if model is None:
                raise ValueError(f"{self.name}: give the model to update(), or layers= to the constructor")
            layers = deeplab_layers(model)
        grads: List[Optional[torch.Tensor]] = []
        for name in self._names:
            if name not in terms:
                raise KeyError(f"{self.name}: the term {name!r} is missing from this batch's terms {list(terms)}")
            value = terms[name]
            key, _ = self.layer_of(name)
            if key not in layers:
                raise KeyError(f"{self.name}: no layer {key!r} for the term {name!r} (layers: {sorted(layers)})")
            if not value.requires_grad:
                grads.append(None)
                continue
            (g,) = torch.autograd.grad(value * loss_scale, layers[key], retain_graph=True, allow_unused=True)
            grads.append(None if g is None else g.detach().float() / loss_scale)
        return grads

    def update(self, model: Optional[nn.Module], terms: Mapping[str, torch.Tensor], loss_scale: float = 1.0) -> None:
        """Per-term gradients -> the scheme's statistic per term -> its balance loss -> ``w.grad``."""
        if len(self._names) < 2:
            return
        grads = self.term_gradients(model, terms, loss_scale)
        stats = _per_term(grads, self.gradient_statistic)
        losses = self._losses(terms)
        self.track_loss0(losses)
        w = self.w.detach().double().requires_grad_(True)
        loss = self.balance_loss(w, stats, losses)
        (grad,) = torch.autograd.grad(loss, w)
        self._set_grad(grad)
        self._record({self.statistic_name: stats})

    # subclasses: the per-term statistic of dL_i/dW_i, the L(0) rule and the balance loss
    statistic_name = "statistic"

    def gradient_statistic(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def track_loss0(self, losses: torch.Tensor) -> None:
        raise NotImplementedError

    def balance_loss(self, w: torch.Tensor, stats: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _losses(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # one device-to-host copy for all the terms (not one synchronisation per term)
        return torch.stack([terms[n].detach().double().reshape(()) for n in self._names]).cpu()

    def _ratios(self, losses: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
        """r_i = (L_i / L_i(0)) / mean over i's group of L_j / L_j(0) (0/0 -> 1)."""
        assert self.loss0 is not None
        rel = torch.where(
            self.loss0 != 0, losses / torch.where(self.loss0 != 0, self.loss0, 1.0), torch.ones_like(losses)
        )
        r = torch.ones_like(rel)
        for idx in groups:
            if not idx:
                continue
            mean = rel[list(idx)].mean()
            r[list(idx)] = rel[list(idx)] / mean if mean != 0 else 1.0
        return r

    def groups(self) -> List[List[int]]:
        by: Dict[str, List[int]] = {}
        for i, n in enumerate(self._names):
            by.setdefault(self.layer_of(n)[1], []).append(i)
        return list(by.values())

    def _set_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach().to(self.w.dtype).clone()
        average_over_ranks_([grad])
        self.w.grad = grad

    def _record(self, extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Count an update; every ``trace_every``-th, keep device copies of the weights and of
        ``extra``'s tensors. They become numbers when :attr:`trace` is read (the epoch's end): a
        copy to the host here would stop the host every iteration."""
        self.updates += 1
        if self.trace_every and (self.updates - 1) % self.trace_every == 0:
            tensors = {k: v.detach().clone() for k, v in (extra or {}).items()}
            self._pending.append((self.updates, self.epochs_done, list(self._names), self.w.detach().clone(), tensors))

    @property
    def trace(self) -> List[dict]:
        """``[{"update", "epoch", "weights": {name: w}, <statistic>: [...]}, ...]`` (for the plots)."""
        if self._pending:
            weights = torch.stack([p[3] for p in self._pending]).tolist()  # one copy for all entries
            for (update, epoch, names, _, tensors), w in zip(self._pending, weights):
                entry = {"update": update, "epoch": epoch, "weights": dict(zip(names, w))}
                entry.update({k: v.tolist() for k, v in tensors.items()})
                self._trace.append(entry)
            self._pending = []
        return self._trace

    @trace.setter
    def trace(self, entries: List[dict]) -> None:
        self._trace: List[dict] = list(entries)
        self._pending: List[tuple] = []

    def after_step(self) -> None:
        if self._optimizer is not None and self.w.grad is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.w.clamp_(min=self.w_min)

    def _renormalise(self) -> None:
        """Scale the weights to sum to the number of terms (unchanged when they sum to <= 0), on
        the device: GradNorm does it after every step."""
        if not len(self._names):
            return
        with torch.no_grad():
            s = self.w.sum()
            self.w.mul_(torch.where(s > 0, len(self._names) / s, torch.ones_like(s)))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "names": list(self._names),
            "w": self.w.detach().clone(),
            "loss0": None if self.loss0 is None else self.loss0.clone(),
            "epochs_done": self.epochs_done,
            "updates": self.updates,
            "new_classes": self.new_classes,
            "old_classes": self.old_classes,
            "trace": list(self.trace),
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        names = list(state.get("names", []))
        if self._names and names and names != self._names:
            raise ValueError(f"{self.name}: the saved terms {names} differ from this step's {self._names}")
        self._names = names or self._names
        with torch.no_grad():
            w = state["w"].detach().float()
            if self.w.numel() == w.numel():
                self.w.copy_(w)  # keep the Parameter object (an optimiser may hold it)
            else:
                self.w = nn.Parameter(w.clone())
        self.loss0 = None if state.get("loss0") is None else state["loss0"].clone()
        self.epochs_done = int(state.get("epochs_done", 0))
        self.updates = int(state.get("updates", 0))
        self.new_classes = int(state.get("new_classes", self.new_classes))
        self.old_classes = int(state.get("old_classes", self.old_classes))
        self.trace = list(state.get("trace", []))
        if self.lr is not None:
            self._optimizer = torch.optim.SGD([self.w], lr=self.lr)
            if state.get("optimizer"):
                self._optimizer.load_state_dict(state["optimizer"])


class RGE(_GradientBalance):
    """Regularised gradient equilibrium (docs/MATHEMATICS.md §4.1), the released rule.

    Per batch (``update``), with g_i = mean(dL_i/dW_i) (a signed mean over the tensor W_i of
    :func:`term_layer`) and G_i = w_i g_i:

    * r_i = (L_i / L_i(0)) / mean_{j in group(i)} (L_j / L_j(0)), groups A (the head's terms and
      the stage-4 map's, terms 0, 1, 2, 6, 7, 8) and B (stages 1-3, terms 3, 4, 5);
    * target_i = mean_{j in group(i)} G_j * r_i ** alpha (a constant);
    * L_RGE = 10 * sum_i |G_i - target_i| + gamma * |w_ce - (|C^t| / O) * w_unkd|
      + beta * sum_k max(0, 1.25 * w_{map k} - w_{map k+1}) over the POD/MD terms of
      consecutive maps 0..4 (the depth hinge: deeper layers get >= 1.25x the weight);
    * ``w.grad = dL_RGE/dw`` (averaged over DDP ranks), stepped by the optimiser with the network.

    L(0) = the terms of the last batch of epoch 0: during epoch 0 it follows the current batch
    (so r_i = 1 there) and it is frozen from epoch 1 on. After each epoch ``w <- T w / sum(w)``
    (T = number of terms, 9 with the released assignment). Weights are clamped to >= w_min
    after every step (not in the release; keeps them positive).

    Args: alpha (10), beta (1e-4), gamma (5e-4), gain (10, the factor of the balance term),
    and those of the base (layers, layer_of, lr, w_min, trace_every).
    """

    name = "rge"

    def __init__(
        self, alpha: float = 10.0, beta: float = 1e-4, gamma: float = 5e-4, gain: float = 10.0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.alpha, self.beta, self.gamma, self.gain = float(alpha), float(beta), float(gamma), float(gain)

    def hinge_pairs(self) -> List[Tuple[int, int]]:
        """Index pairs (k, k+1) of the POD/MD terms of consecutive maps 0..4 (all but the logits map)."""
        by_map: Dict[int, int] = {}
        for i, n in enumerate(self._names):
            parsed = parse_term(n)
            if parsed is not None and parsed[0] != "mcd" and parsed[1] < LOGITS_MAP:
                by_map[parsed[1]] = i
        return [(by_map[m], by_map[m + 1]) for m in range(LOGITS_MAP - 1) if m in by_map and m + 1 in by_map]

    def balance_loss(self, w: torch.Tensor, g: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """L_RGE as a function of w ``[T]`` for per-term signed-mean gradients g ``[T]`` and
        losses ``[T]`` (float64); L(0) must be set."""
        G = w * g
        r = self._ratios(losses, self.groups())
        target = torch.zeros_like(G)
        Gd = G.detach()
        for idx in self.groups():
            target[idx] = Gd[idx].mean() * r[idx] ** self.alpha
        loss = self.gain * (G - target).abs().sum()
        if "ce" in self._names and "unkd" in self._names and self.old_classes > 0:
            tie = self.new_classes / self.old_classes
            loss = loss + self.gamma * (w[self.index("ce")] - tie * w[self.index("unkd")]).abs()
        for a, b in self.hinge_pairs():
            loss = loss + self.beta * torch.clamp(1.25 * w[a] - w[b], min=0)
        return loss

    statistic_name = "g"

    def gradient_statistic(self, grad: torch.Tensor) -> torch.Tensor:
        """g_i = the signed mean of dL_i/dW_i."""
        return grad.double().mean()

    def track_loss0(self, losses: torch.Tensor) -> None:
        """L(0) follows the current batch during epoch 0 (frozen at its last batch)."""
        if self.epochs_done == 0:
            self.loss0 = losses.clone()

    def end_epoch(self, epoch: int, last_terms: Optional[Mapping[str, float]] = None) -> None:
        self.epochs_done = epoch + 1
        if len(self._names) >= 2:
            self._renormalise()


class GradNorm(_GradientBalance):
    """GradNorm (Chen et al., 2018) on the same per-term layers as RGE.

    G_i = ||w_i dL_i/dW_i||_2; r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)) over ALL terms, L(0)
    the terms of the first batch of the step; target_i = mean_j G_j * r_i ** alpha (constant);
    L_grad = sum_i |G_i - target_i|; ``w.grad = dL_grad/dw``; after every optimiser step the
    weights are clamped to >= w_min and renormalised to sum T. Where GradNorm uses one shared
    layer, the terms here act on different layers (an early map's term has no gradient on the
    head), so each term uses its own W_i (:func:`term_layer`).
    """

    name = "gradnorm"

    def __init__(self, alpha: float = 1.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = float(alpha)

    def groups(self) -> List[List[int]]:
        return [list(range(len(self._names)))]

    def balance_loss(self, w: torch.Tensor, norms: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """L_grad as a function of w ``[T]`` for the per-term gradient norms ``||dL_i/dW_i||`` ``[T]``."""
        G = w * norms
        r = self._ratios(losses, self.groups())
        target = G.detach().mean() * r**self.alpha
        return (G - target).abs().sum()

    statistic_name = "norms"

    def gradient_statistic(self, grad: torch.Tensor) -> torch.Tensor:
        """||dL_i/dW_i||_2."""
        return grad.double().norm()

    def track_loss0(self, losses: torch.Tensor) -> None:
        """L(0) = the terms of the first batch of the step."""
        if self.loss0 is None:
            self.loss0 = losses.clone()

    def after_step(self) -> None:
        super().after_step()
        if len(self._names) >= 2:
            self._renormalise()

    def end_epoch(self, epoch: int, last_terms: Optional[Mapping[str, float]] = None) -> None:
        self.epochs_done = epoch + 1


def parse_weights(text: Optional[str]) -> Dict[str, float]:
    """``"unkd=0.5,pod0=2"`` -> ``{"unkd": 0.5, "pod0": 2.0}`` (CLI helper)."""
    out: Dict[str, float] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"term weight {item!r} is not NAME=VALUE (e.g. 'unkd=0.5,pod0=2')")
        k, v = item.split("=", 1)
        try:
            value = float(v)
        except ValueError as e:
            raise ValueError(f"term weight {item!r}: {v!r} is not a number") from e
        if not math.isfinite(value):
            raise ValueError(f"term weight {item!r} is not finite")
        out[k.strip()] = value
    return out


WEIGHTINGS = ("fixed", "rge", "gradnorm")


def build_weighting(name: str = "fixed", weights: Optional[Mapping[str, float]] = None, **kwargs) -> Weighting:
    """A weighting scheme by name: ``"fixed"`` (``weights``), ``"rge"`` or ``"gradnorm"`` (kwargs
    go to the constructor)."""
    if name == "fixed":
        return FixedWeights(weights)
    if weights:
        raise ValueError(f"fixed term weights {dict(weights)} cannot be combined with weighting {name!r}")
    if name == "rge":
        return RGE(**kwargs)
    if name == "gradnorm":
        return GradNorm(**kwargs)
    raise ValueError(f"unknown weighting {name!r}; available: {', '.join(WEIGHTINGS)}")
