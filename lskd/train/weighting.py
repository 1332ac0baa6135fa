"""Weighting of the named loss terms: ``total = sum_i w_i * term_i``, in ONE place.

A method returns named, unweighted terms (each already times its base factor, SPEC 3); the
trainer hands them to a :class:`Weighting` and back-propagates the total it returns. The
interface is built so that dynamic schemes (RGE / GradNorm, SPEC 3.1) can be added later
without touching the trainer:

* ``begin_step(names, ctx)`` once per step with the step's term names;
* ``total(terms) -> Tensor`` per batch (the only place where weights multiply terms);
* ``after_backward(model, terms)`` per batch, after ``total.backward()`` and before the optimiser
  step (a dynamic scheme updates its weights' gradients here);
* ``end_epoch(epoch, last_terms)`` after each epoch (e.g. renormalisation, L(0));
* ``parameters()`` = learnable weights to give the optimiser (none for fixed weights);
* ``weights() -> {name: float}`` for the logs; ``state_dict`` / ``load_state_dict`` for resuming.

:class:`FixedWeights` is the only scheme for now: ``w_i`` from a ``{name: weight}`` mapping,
1 for every name not in it.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

__all__ = ["Weighting", "FixedWeights", "build_weighting"]


class Weighting:
    """Base class; see the module docstring for the protocol."""

    name = "weighting"

    def begin_step(self, names: Iterable[str], ctx: object = None) -> None:
        """Called once at the start of every step with the term names the method returns."""

    def weight(self, name: str) -> float:
        """The current weight of term ``name``."""
        raise NotImplementedError

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i * term_i`` over the terms (float32 accumulation)."""
        if not terms:
            raise ValueError("weighting: no loss term to sum")
        total: Optional[torch.Tensor] = None
        for name, value in terms.items():
            w = self.weight(name)
            part = value.float() * w
            total = part if total is None else total + part
        return total

    def after_backward(self, model: nn.Module, terms: Mapping[str, torch.Tensor]) -> None:
        """Hook after ``total.backward()`` (dynamic schemes set their weights' gradients here)."""

    def end_epoch(self, epoch: int, last_terms: Optional[Mapping[str, float]] = None) -> None:
        """Hook after every epoch."""

    def parameters(self) -> List[nn.Parameter]:
        """Learnable weights for the optimiser (none by default)."""
        return []

    def weights(self, names: Optional[Iterable[str]] = None) -> Dict[str, float]:
        """``{name: weight}`` for ``names`` (default: every name seen by :meth:`begin_step`)."""
        raise NotImplementedError

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

    def begin_step(self, names: Iterable[str], ctx: object = None) -> None:
        self._names = list(names)

    def weight(self, name: str) -> float:
        return self._weights.get(name, self.default)

    def weights(self, names: Optional[Iterable[str]] = None) -> Dict[str, float]:
        names = list(names) if names is not None else self._names
        return {n: self.weight(n) for n in names}

    def state_dict(self) -> dict:
        return {"weights": dict(self._weights), "default": self.default}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._weights = {str(k): float(v) for k, v in state.get("weights", {}).items()}
            self.default = float(state.get("default", self.default))


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
            out[k.strip()] = float(v)
        except ValueError as e:
            raise ValueError(f"term weight {item!r}: {v!r} is not a number") from e
    return out


def build_weighting(name: str = "fixed", weights: Optional[Mapping[str, float]] = None) -> Weighting:
    """A weighting scheme by name (``"fixed"`` for now)."""
    if name == "fixed":
        return FixedWeights(weights)
    raise ValueError(f"unknown weighting {name!r}; available: 'fixed'")
