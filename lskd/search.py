r"""Bi-level search of LSKD's per-map distillation schemes and weights (the mathematical core).

Search space
============
LSKD distils the maps ``l`` in ``maps`` (a subset of 0..5) with one scheme each out of
:data:`lskd.terms.SCHEMES` = ``("pod", "md", "md+mcd", "none")``. In terms of the
*basic* named loss terms of a training batch (:mod:`lskd.terms`: ``pod{l}``, ``md{l}`` and the
MCD term :func:`lskd.terms.mcd_name` ``(l)``, which is ``"mcd"`` on map 4 for compatibility
with the released code and ``"mcd{l}"`` elsewhere) the candidate losses are::

    L_{l,pod} = pod{l}      L_{l,md} = md{l}      L_{l,md+mcd} = md{l} + mcd_name(l)      L_{l,none} = 0

Architecture parameters alpha = (beta, w): scheme logits ``beta`` ``[L, S]`` (init 0, i.e.
uniform) and positive map weights ``w`` ``[L]`` (init 1); ``p_l = softmax(beta_l)`` and the
mixture coefficient of candidate ``k = (l, s)`` is ``c_{l,s} = w_l * p_{l,s}``. The lower-level
(training) objective of the network weights theta is::

    L_train(theta, alpha) = U(theta) + sum_l w_l sum_s p_{l,s} L_{l,s}(theta) = U(theta) + sum_k c_k L_k(theta)

with ``U`` the terms that are not searched (``ce``, ``unkd``, distillation of maps outside
``maps``; weight 1). On the basic names this is weight(``pod{l}``) = ``w_l p_pod``,
weight(``md{l}``) = ``w_l (p_md + p_md+mcd)``, weight(``mcd_name(l)``) = ``w_l p_md+mcd``
(:meth:`SchemeSearch.term_weights`). The network is trained on it with the weights
DETACHED (:meth:`SchemeSearch.train_loss`): its backward never reaches alpha.

Hypergradient
=============
The upper level minimises a validation loss ``L_val(theta)`` (CE + UNKD on held-out data)
after the network's training step. ``L_val`` does not depend on alpha directly, so
``grad_alpha L_val(theta, alpha) = 0`` identically: DARTS' literal first-order rule (xi = 0)
gives no signal at all here, and alpha only acts through the weights. One virtual SGD step
``theta'(alpha) = theta - xi g(alpha)``, ``g(alpha) = grad_theta L_train(theta, alpha)``, gives
by the chain rule::

    d L_val(theta'(alpha)) / d alpha = -xi (d g / d alpha)^T v',      v' = grad L_val(theta')
                                     = -xi nabla^2_{alpha,theta} L_train(theta, alpha) v'
                                     = -xi sum_k (d c_k / d alpha) D_k,  D_k = < grad_theta L_k(theta), v' >

(``U`` does not depend on alpha and drops out; ``D_none = 0``). This is the alpha-gradient of
``-xi sum_k c_k(alpha) D_k`` with the ``D_k`` held constant, which is what is put into
``beta.grad`` / ``w.grad`` (autograd through the softmax and ``w``; explicitly
``dc_{l,s}/dbeta_{l,j} = w_l p_{l,s} (delta_sj - p_{l,j})`` and ``dc_{l,s}/dw_l = p_{l,s}``).

All ``D_k`` are obtained at once by central finite differences along ``v`` (as DARTS does for
its second-order term), which costs two extra forward passes of the training batch under
``no_grad`` and no backward::

    eps = eps_scale / ||v||          (||v||: global L2 norm over all parameter tensors)
    D_k = (L_k(theta + eps v) - L_k(theta - eps v)) / (2 eps)

(Taylor: the error is ``eps^2 / 6`` times the third directional derivative, i.e. relative
``O(eps_scale^2)``; in float32 add about ``ulp(L_k) / (2 eps)`` of rounding.)

with ``D = 0`` when ``||v|| = 0``. Two orders:

* ``order=1`` ("first order in xi", the default): ``v = grad L_val(theta)`` at the current
  weights, no virtual step. Since ``theta' = theta + O(xi)``, ``v' = v + O(xi)`` and the
  hypergradient above is ``-xi nabla^2_{alpha,theta} L_train v + O(xi^2)``: this keeps its
  leading term in xi. Equivalently it is the exact alpha-gradient of the first-order Taylor
  model of the unrolled loss, ``L_val(theta) - xi < g(alpha), grad L_val(theta) >``.
  "First order" therefore means first order in xi, NOT DARTS' xi = 0 rule (which is the
  zeroth-order term here and identically zero); it costs one validation forward/backward and
  two training forwards.
* ``order=2`` (DARTS' second-order rule): the virtual step ``theta' = theta - xi g_train`` is
  taken (``g_train`` supplied by the caller, typically the ``.grad`` its backward just
  produced, or computed from a closure), ``v = grad L_val(theta')``, theta is restored and the
  finite differences are taken at ``theta +- eps v``. DARTS' direct term
  ``grad_alpha L_val(theta')`` is zero here.

Upper step: Adam over ``[beta, w]`` (lr 3e-3, betas (0.5, 0.999), weight decay 1e-3 as
DARTS); afterwards ``w`` is clamped to ``>= w_min`` and rescaled so that ``sum(w) = L``
(beta is left as is). Under torch.distributed the alpha gradients are averaged over the
ranks before the Adam step, like DDP's gradients.

Exactness rules of :meth:`SchemeSearch.hypergradient`: every perturbed parameter is
restored by copying a saved copy back (bitwise, never by subtracting); the buffers of
``buffers_of`` (BatchNorm running statistics) are snapshotted before and copied back after
each closure call; the two finite-difference passes see the same random numbers (the RNG is
forked, so dropout masks agree and the global RNG is not advanced by them).

Use in a trainer (one iteration; ``net`` the plain student, not its DDP wrapper)::

    terms = terms_of(train_batch)                  # {"ce", "unkd", "pod0", "md0", "mcd0", ...}
    search.train_loss(terms).backward()            # weights detached: no grad reaches alpha
    search.hypergradient(net.parameters(), lambda: terms_of(train_batch),
                         lambda: val_loss(val_batch), xi=net_lr, buffers_of=net,
                         train_grads=[p.grad for p in net.parameters()])   # order 2 only
    search.step()                                  # all-reduce (DDP), Adam, clamp + rescale w
    net_optimizer.step()
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import terms
from ._dist import average_over_ranks_
from .terms import NUM_MAPS, SCHEMES, mcd_name
from .weighting import Weighting

__all__ = [
    "NUM_MAPS",
    "mcd_name",
    "candidate_terms",
    "basic_term_names",
    "SchemeSearch",
    "SearchWeighting",
]

TermsFn = Callable[[], Mapping[str, Tensor]]
LossFn = Callable[[], Tensor]


def _check_map(l: Any) -> int:
    if isinstance(l, bool):
        raise ValueError(f"SchemeSearch: map index {l!r} is not an integer in 0..{NUM_MAPS - 1}")
    try:
        li = operator.index(l)
    except TypeError:
        raise ValueError(f"SchemeSearch: map index {l!r} is not an integer in 0..{NUM_MAPS - 1}") from None
    if not 0 <= li < NUM_MAPS:
        raise ValueError(f"SchemeSearch: map index {li} outside 0..{NUM_MAPS - 1}")
    return li


def _check_scheme(s: Any) -> str:
    if s not in SCHEMES:
        raise ValueError(f"SchemeSearch: unknown scheme {s!r}; expected one of {SCHEMES}")
    return s


def candidate_terms(l: int, scheme: str) -> Tuple[str, ...]:
    """Basic term names whose sum is the candidate loss ``L_{l,scheme}`` (``()`` for ``"none"``;
    :func:`lskd.terms.scheme_terms`, with the map and scheme checked)."""
    return terms.scheme_terms(_check_map(l), _check_scheme(scheme))


def basic_term_names(l: int) -> Tuple[str, str, str]:
    """The three basic term names of map ``l``: ``(pod{l}, md{l}, mcd_name(l))`` (:func:`lskd.terms.basic_term_names`,
    with the map checked)."""
    return terms.basic_term_names(_check_map(l))


def _as_scalar(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"SchemeSearch: term {name!r} is a {type(value).__name__}, expected a scalar tensor")
    if value.numel() != 1:
        raise ValueError(f"SchemeSearch: term {name!r} has shape {tuple(value.shape)}, expected a scalar")
    return value.reshape(())


class SchemeSearch(nn.Module):
    """Architecture parameters and upper-level optimiser of the scheme search (module doc).

    Args:
        maps: searched map indices (subset of 0..5, no repeats; stored sorted). Row ``i`` of
            ``beta``/``w`` belongs to ``self.maps[i]``.
        schemes: candidate schemes (subset of :data:`SCHEMES`, no repeats; stored in SCHEMES
            order). Column ``j`` of ``beta`` belongs to ``self.schemes[j]``.
        order: 1 (first order in xi, default) or 2 (DARTS second order with a virtual step).
        lr, betas, weight_decay: Adam of the architecture parameters (DARTS' values).
        eps_scale: finite-difference step ``eps = eps_scale / ||v||`` (0.01 as DARTS).
        w_min: lower clamp of ``w`` before it is rescaled to ``sum(w) = L`` (``0 < w_min <= 1``).
        dtype, device: of ``beta`` and ``w`` (put them on the model's device, required for NCCL).
        process_group: torch.distributed group for the gradient average (None: the default group).

    Attributes:
        beta: ``nn.Parameter [L, S]``, scheme logits. w: ``nn.Parameter [L]``, map weights.
        optimizer: ``torch.optim.Adam`` over ``[beta, w]``.
    """

    def __init__(
        self,
        maps: Iterable[int] = range(NUM_MAPS),
        schemes: Sequence[str] = SCHEMES,
        order: int = 1,
        lr: float = 3e-3,
        betas: Tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 1e-3,
        eps_scale: float = 0.01,
        w_min: float = 1e-3,
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        process_group: Optional[Any] = None,
    ) -> None:
        super().__init__()
        if isinstance(maps, (str, bytes)):
            raise ValueError(f"SchemeSearch: maps must be integers, got {maps!r}")
        map_list = [_check_map(m) for m in maps]
        if not map_list:
            raise ValueError("SchemeSearch: no map to search")
        if len(set(map_list)) != len(map_list):
            raise ValueError(f"SchemeSearch: repeated map index in {map_list}")
        if isinstance(schemes, str):
            raise ValueError(f"SchemeSearch: schemes must be a sequence of names, got the string {schemes!r}")
        scheme_list = [_check_scheme(s) for s in schemes]
        if not scheme_list:
            raise ValueError("SchemeSearch: no candidate scheme")
        if len(set(scheme_list)) != len(scheme_list):
            raise ValueError(f"SchemeSearch: repeated scheme in {scheme_list}")
        if isinstance(order, bool) or order not in (1, 2):
            raise ValueError(f"SchemeSearch: order must be 1 or 2, got {order!r}")
        if not (math.isfinite(eps_scale) and eps_scale > 0):
            raise ValueError(f"SchemeSearch: eps_scale must be positive, got {eps_scale}")
        if not (0 < w_min <= 1):
            raise ValueError(f"SchemeSearch: w_min must be in (0, 1] (sum(w) = L must stay reachable), got {w_min}")
        if not dtype.is_floating_point:
            raise ValueError(f"SchemeSearch: dtype must be a floating type, got {dtype}")

        self.maps: Tuple[int, ...] = tuple(sorted(map_list))
        self.schemes: Tuple[str, ...] = tuple(sorted(scheme_list, key=SCHEMES.index))
        self.order = int(order)
        self.eps_scale = float(eps_scale)
        self.w_min = float(w_min)
        self.process_group = process_group
        L, S = len(self.maps), len(self.schemes)
        self.beta = nn.Parameter(torch.zeros(L, S, dtype=dtype, device=device))
        self.w = nn.Parameter(torch.ones(L, dtype=dtype, device=device))
        self.optimizer = torch.optim.Adam([self.beta, self.w], lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        # basic term name -> [(row, column)] of the candidates whose loss contains it
        self._term_slots: Dict[str, List[Tuple[int, int]]] = {}
        for i, l in enumerate(self.maps):
            for name in basic_term_names(l):
                self._term_slots[name] = []
            for j, s in enumerate(self.schemes):
                for name in candidate_terms(l, s):
                    self._term_slots[name].append((i, j))

    def extra_repr(self) -> str:
        return f"maps={self.maps}, schemes={self.schemes}, order={self.order}, eps_scale={self.eps_scale}"

    @property
    def num_maps(self) -> int:
        """L, the number of searched maps."""
        return len(self.maps)

    # -- mixture ----------------------------------------------------------------------
    def probabilities(self) -> Tensor:
        """``softmax(beta, -1)`` ``[L, S]`` (differentiable; ``.detach()`` it for reporting)."""
        return torch.softmax(self.beta, dim=-1)

    def coefficients(self) -> Tensor:
        """Mixture coefficients ``c = w[:, None] * p`` ``[L, S]``, differentiable in beta and w."""
        return self.w[:, None] * self.probabilities()

    def term_weight_tensors(self) -> Dict[str, Tensor]:
        """Detached 0-dim weight per basic term name of every searched map (``pod{l}``, ``md{l}``,
        :func:`lskd.terms.mcd_name` ``(l)``); 0 for a name no candidate uses. On the alpha device (no sync)."""
        c = self.coefficients().detach()
        out: Dict[str, Tensor] = {}
        for name, slots in self._term_slots.items():
            wt = c.new_zeros(())
            for i, j in slots:
                wt = wt + c[i, j]
            out[name] = wt
        return out

    def term_weights(self) -> Dict[str, float]:
        """As :meth:`term_weight_tensors`, as Python floats."""
        return {k: float(v) for k, v in self.term_weight_tensors().items()}

    def train_loss(self, terms: Mapping[str, Tensor]) -> Tensor:
        """Lower-level objective with DETACHED weights, a scalar: ``sum_name weight(name) * terms[name]``,
        where the basic names of searched maps get :meth:`term_weights` and every other term
        (``ce``, ``unkd``, maps not searched) weight 1. Every name a candidate uses must be in
        ``terms`` (KeyError otherwise). Its backward never reaches beta or w."""
        weights = self.term_weight_tensors()
        self._check_terms(terms)
        total: Optional[Tensor] = None
        for name, value in terms.items():
            value = _as_scalar(name, value)
            if name in weights:
                value = value * weights[name].to(device=value.device, dtype=value.dtype)
            total = value if total is None else total + value
        if total is None:
            raise ValueError("SchemeSearch.train_loss: no term")
        return total

    # -- candidates -----------------------------------------------------------------
    def _check_terms(self, terms: Mapping[str, Tensor]) -> None:
        if not isinstance(terms, Mapping):
            raise TypeError(f"SchemeSearch: terms_fn must return a mapping name -> tensor, got {type(terms).__name__}")
        for i, l in enumerate(self.maps):
            for s in self.schemes:
                for name in candidate_terms(l, s):
                    if name not in terms:
                        raise KeyError(
                            f"SchemeSearch: the terms lack {name!r}, needed by candidate (map {l}, {s!r}); "
                            f"got {sorted(terms)}"
                        )

    def candidate_losses(self, terms: Mapping[str, Tensor]) -> Dict[Tuple[int, str], Tensor]:
        """``(map, scheme) -> L_{map,scheme}`` (scalar tensors) from the basic named ``terms``;
        ``"none"`` -> 0. A basic term that a candidate needs and ``terms`` lacks raises KeyError."""
        self._check_terms(terms)
        ref = next((v for v in terms.values() if isinstance(v, Tensor)), self.beta)
        out: Dict[Tuple[int, str], Tensor] = {}
        for l in self.maps:
            for s in self.schemes:
                names = candidate_terms(l, s)
                if not names:
                    out[(l, s)] = ref.new_zeros(()).detach()
                    continue
                value = _as_scalar(names[0], terms[names[0]])
                for name in names[1:]:
                    value = value + _as_scalar(name, terms[name])
                out[(l, s)] = value
        return out

    def _candidate_matrix(self, terms: Mapping[str, Tensor]) -> Tensor:
        """Candidate losses as a detached float64 ``[L, S]`` tensor on the alpha device."""
        cand = self.candidate_losses(terms)
        rows = [
            torch.stack([cand[(l, s)].detach().to(device=self.beta.device, dtype=torch.float64) for s in self.schemes])
            for l in self.maps
        ]
        return torch.stack(rows)

    # -- finite differences ------------------------------------------------------------
    def finite_difference_products(
        self,
        params: Sequence[Tensor],
        v: Sequence[Optional[Tensor]],
        terms_fn: TermsFn,
        buffers_of: Optional[nn.Module] = None,
    ) -> Tensor:
        """``D [L, S]`` (float64, alpha device): ``D_{l,s} ~= <grad_theta L_{l,s}(theta), v>`` by central
        differences at ``theta +- eps v``, ``eps = eps_scale / ||v||`` (``D = 0`` if ``||v|| = 0``).

        ``params`` and ``v`` are aligned (``v[i]`` None = 0; every listed tensor is perturbed);
        ``terms_fn()`` is called twice under no_grad with the same RNG state. Parameters and the
        buffers of ``buffers_of`` are restored bitwise afterwards (also when ``terms_fn`` raises).

        Precision: the error is ``O(eps_scale^2)`` plus about ``ulp(L_k) / (2 eps)``, so the terms
        should be computed in float32 or better (not under bf16/fp16 autocast). A term that
        detaches a student-dependent quantity is differentiated THROUGH it here (unlike autograd)."""
        params = list(params)
        v = list(v)
        if len(v) != len(params):
            raise ValueError(f"SchemeSearch: {len(v)} directions for {len(params)} parameters")
        restore = _Snapshot(params, buffers_of)
        try:
            D, _, _ = self._fd_products(params, v, terms_fn, restore)
        finally:
            restore()
        return D

    def _fd_products(
        self, params: List[Tensor], v: List[Optional[Tensor]], terms_fn: TermsFn, restore: "_Snapshot"
    ) -> Tuple[Tensor, float, float]:
        for p, vi in zip(params, v):
            if vi is not None and vi.shape != p.shape:
                raise ValueError(f"SchemeSearch: direction of shape {tuple(vi.shape)} for a parameter {tuple(p.shape)}")
        sq = [torch.linalg.vector_norm(vi, dtype=torch.float64) ** 2 for vi in v if vi is not None]
        v_norm = math.sqrt(float(sum(s.to(sq[0].device) for s in sq))) if sq else 0.0
        if not math.isfinite(v_norm):
            raise FloatingPointError(f"SchemeSearch: the validation gradient has a non-finite norm ({v_norm})")
        D = torch.zeros(self.num_maps, len(self.schemes), dtype=torch.float64, device=self.beta.device)
        if v_norm == 0.0:
            return D, 0.0, 0.0
        eps = self.eps_scale / v_norm
        cuda = sorted(
            {
                torch.cuda.current_device() if p.device.index is None else p.device.index
                for p in params
                if p.device.type == "cuda"
            }
        )

        def losses_at(step: float) -> Tensor:
            with torch.no_grad():
                for p, vi in zip(params, v):
                    if vi is not None:
                        p.add_(vi.to(p.dtype), alpha=step)
                with torch.random.fork_rng(devices=cuda, device_type="cuda" if cuda else None):
                    terms = terms_fn()
                out = self._candidate_matrix(terms)
            restore()
            return out

        plus = losses_at(eps)
        minus = losses_at(-eps)
        D = (plus - minus) / (2.0 * eps)
        if not bool(torch.isfinite(D).all()):
            bad = [(self.maps[i], self.schemes[j]) for i, j in (~torch.isfinite(D)).nonzero().tolist()]
            raise FloatingPointError(f"SchemeSearch: non-finite candidate losses at theta +- eps v for {bad}")
        return D, v_norm, eps

    def exact_products(self, params: Sequence[Tensor], v: Sequence[Optional[Tensor]], terms_fn: TermsFn) -> Tensor:
        """Reference for tests/debugging: ``D [L, S]`` exactly, ``<grad L_{l,s}, v>`` by one backward per
        candidate (expensive). Does not restore buffers (call it on a copy if that matters)."""
        params = list(params)
        with torch.enable_grad():
            cand = self.candidate_losses(terms_fn())
        D = torch.zeros(self.num_maps, len(self.schemes), dtype=torch.float64, device=self.beta.device)
        for i, l in enumerate(self.maps):
            for j, s in enumerate(self.schemes):
                loss = cand[(l, s)]
                if not loss.requires_grad:
                    continue
                grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
                acc = torch.zeros((), dtype=torch.float64, device=self.beta.device)
                for g, vi in zip(grads, v):
                    if g is not None and vi is not None:
                        acc = acc + (g.double() * vi.double()).sum().to(acc.device)
                D[i, j] = acc
        return D

    # -- hypergradient ------------------------------------------------------------------
    def hypergradient(
        self,
        params: Iterable[Tensor],
        terms_fn: TermsFn,
        val_loss_fn: LossFn,
        xi: float,
        train_grads: Optional[Sequence[Optional[Tensor]]] = None,
        buffers_of: Optional[nn.Module] = None,
        train_loss_fn: Optional[LossFn] = None,
    ) -> Dict[str, float]:
        """Set ``beta.grad`` / ``w.grad`` (overwritten) to ``d/dalpha [-xi sum_k c_k(alpha) D_k]`` (module doc).

        Args:
            params: the network parameters theta (e.g. ``model.parameters()``); those with
                ``requires_grad=False`` are neither differentiated nor perturbed; repeats are dropped.
            terms_fn: ``() -> {name: scalar tensor}``, the basic terms of the TRAINING batch at the
                current parameter values (called under no_grad for the finite differences).
            val_loss_fn: ``() -> scalar tensor``, the validation loss at the current parameter
                values (called with grad enabled; must be finite). Parameters it does not use get v = 0.
            xi: virtual step size (>= 0), usually the network's learning rate.
            train_grads: order 2 only: ``g_train`` aligned with ``params`` (None entries = 0), e.g.
                ``[p.grad for p in params]`` right after the trainer's backward of L_train. When
                omitted, g_train = grad of ``train_loss_fn()`` or, without it, of
                ``self.train_loss(terms_fn())``.
            buffers_of: module whose buffers (BatchNorm statistics) are snapshotted and restored.
            train_loss_fn: order 2 only, see ``train_grads``.

        Returns diagnostics: ``val_loss`` (at theta, or at theta' for order 2), ``v_norm``, ``eps``,
        ``xi``, ``objective`` (``-xi sum c D``, the predicted change of L_val due to the searched
        terms) and ``d_abs_max``. Parameters and buffers are bitwise unchanged afterwards; the
        network's ``.grad`` fields are not touched.
        """
        xi = float(xi)
        if not math.isfinite(xi) or xi < 0:
            raise ValueError(f"SchemeSearch: xi must be a finite number >= 0, got {xi}")
        all_params = list(params)
        if train_grads is not None:
            train_grads = list(train_grads)
            if len(train_grads) != len(all_params):
                raise ValueError(f"SchemeSearch: {len(train_grads)} train_grads for {len(all_params)} parameters")
        plist: List[Tensor] = []
        glist: List[Optional[Tensor]] = []
        seen = set()
        for k, p in enumerate(all_params):
            if not isinstance(p, Tensor):
                raise TypeError(f"SchemeSearch: parameter {k} is a {type(p).__name__}")
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            plist.append(p)
            if train_grads is not None:
                g = train_grads[k]
                if g is not None and g.shape != p.shape:
                    raise ValueError(
                        f"SchemeSearch: train_grads[{k}] has shape {tuple(g.shape)}, parameter {tuple(p.shape)}"
                    )
                glist.append(g)

        restore = _Snapshot(plist, buffers_of)
        try:
            if self.order == 2:
                if train_grads is None:
                    glist = self._train_gradients(plist, terms_fn, train_loss_fn)
                    restore()
                with torch.no_grad():  # virtual step theta' = theta - xi g_train
                    for p, g in zip(plist, glist):
                        if g is not None:
                            p.add_(g.detach().to(p.dtype), alpha=-xi)
            val_loss, v = self._val_gradient(plist, val_loss_fn)
            restore()
            D, v_norm, eps = self._fd_products(plist, v, terms_fn, restore)
        finally:
            restore()

        with torch.enable_grad():
            c = self.coefficients()
            objective = -xi * (c * D.to(c.dtype)).sum()
            g_beta, g_w = torch.autograd.grad(objective, [self.beta, self.w])
        self.beta.grad = g_beta.detach()
        self.w.grad = g_w.detach()
        return {
            "val_loss": val_loss,
            "v_norm": v_norm,
            "eps": eps,
            "xi": xi,
            "objective": float(objective.detach()),
            "d_abs_max": float(D.abs().max()),
        }

    def _train_gradients(
        self, params: List[Tensor], terms_fn: TermsFn, train_loss_fn: Optional[LossFn]
    ) -> List[Optional[Tensor]]:
        with torch.enable_grad():
            loss = train_loss_fn() if train_loss_fn is not None else self.train_loss(terms_fn())
            loss = _as_scalar("train loss", loss)
            if not bool(torch.isfinite(loss.detach())):
                raise FloatingPointError(f"SchemeSearch: the training loss is not finite ({float(loss)})")
            if not loss.requires_grad:
                return [None] * len(params)
            return list(torch.autograd.grad(loss, params, allow_unused=True))

    def _val_gradient(self, params: List[Tensor], val_loss_fn: LossFn) -> Tuple[float, List[Optional[Tensor]]]:
        with torch.enable_grad():
            loss = _as_scalar("validation loss", val_loss_fn())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"SchemeSearch: the validation loss is not finite ({value})")
            if not loss.requires_grad or not params:
                return value, [None] * len(params)
            return value, list(torch.autograd.grad(loss, params, allow_unused=True))

    # -- upper step -----------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Average ``beta.grad`` and ``w.grad`` over the ranks (one all_reduce) when torch.distributed
        is initialised with more than one rank; a missing grad counts as 0. No-op otherwise."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) <= 1:
            return
        for p in (self.beta, self.w):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        average_over_ranks_([self.beta.grad, self.w.grad], self.process_group)

    def step(self) -> None:
        """Reduce the gradients over ranks, one Adam step, then ``w <- clamp(w, w_min)`` and
        ``w <- w * L / sum(w)`` (so ``sum(w) = L`` and ``w >= w_min L / sum(clamped w) > 0``)."""
        self.reduce_gradients()
        self.optimizer.step()
        self.normalize_weights_()

    @torch.no_grad()
    def normalize_weights_(self) -> None:
        """In place: clamp ``w`` to ``>= w_min``, rescale to ``sum(w) = L``."""
        self.w.clamp_(min=self.w_min)
        self.w.mul_(self.num_maps / self.w.sum())

    # -- results -------------------------------------------------------------------------
    def chosen(self) -> Dict[int, str]:
        """``{map: argmax_s beta[map, s]}`` (ties -> the first in SCHEMES order); usable as LSKD's ``schemes``."""
        rows = self.beta.detach().cpu().tolist()
        out: Dict[int, str] = {}
        for l, row in zip(self.maps, rows):
            if not all(math.isfinite(x) for x in row):
                raise FloatingPointError(f"SchemeSearch: non-finite scheme logits for map {l}: {row}")
            out[l] = self.schemes[row.index(max(row))]
        return out

    def weights(self) -> Dict[int, float]:
        """``{map: w_map}``."""
        return {l: float(x) for l, x in zip(self.maps, self.w.detach().cpu().tolist())}

    # -- checkpoints ----------------------------------------------------------------------
    def get_extra_state(self) -> Dict[str, Any]:
        """Saved with :meth:`state_dict` (next to ``beta`` and ``w``): the Adam state and the layout."""
        return {
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "maps": list(self.maps),
            "schemes": list(self.schemes),
            "order": self.order,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore the Adam state (called by :meth:`load_state_dict`); the layout must match."""
        if not isinstance(state, Mapping) or "optimizer" not in state:
            raise ValueError("SchemeSearch: the state dict has no optimizer state")
        maps, schemes = tuple(state.get("maps", ())), tuple(state.get("schemes", ()))
        if maps != self.maps or schemes != self.schemes:
            raise ValueError(
                f"SchemeSearch: checkpoint layout maps={maps} schemes={schemes} does not match "
                f"maps={self.maps} schemes={self.schemes}"
            )
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


class _Snapshot:
    """Copies of ``params`` and of every buffer of ``module``; calling it copies them back (bitwise)."""

    def __init__(self, params: Sequence[Tensor], module: Optional[nn.Module]) -> None:
        self.params = list(params)
        self.saved_params = [p.detach().clone() for p in self.params]
        self.buffers: List[Tensor] = []
        if module is not None:
            seen = set()
            for b in module.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    self.buffers.append(b)
        self.saved_buffers = [b.detach().clone() for b in self.buffers]

    def __call__(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved_params):
                p.copy_(s)
            for b, s in zip(self.buffers, self.saved_buffers):
                b.copy_(s)


class SearchWeighting(Weighting):
    """The search as the trainer's :class:`lskd.weighting.Weighting` (docs/MATHEMATICS.md §5).

    While searching, the basic terms of every map get ``w_l p_{l,s}`` summed over the
    candidates that contain them (:meth:`SchemeSearch.term_weights`) and the other terms
    (``ce``, ``unkd``) 1. :meth:`finish` fixes the argmax scheme of every map: from then on
    the terms of the chosen scheme of map l get the learnt weight w_l (and the rest 1).
    ``trace`` records, every ``trace_every`` upper steps, the map weights, the scheme
    probabilities and the hypergradient diagnostics (for the plots).
    """

    name = "search"

    def __init__(self, search: SchemeSearch, trace_every: int = 1) -> None:
        self.search = search
        self.trace_every = int(trace_every)
        self.finished = False
        self.chosen: Dict[int, str] = {}
        self._fixed: Dict[str, float] = {}
        self._names: List[str] = []
        self.updates = 0
        self.trace: List[dict] = []

    def begin_step(
        self,
        names: Iterable[str],
        ctx: object = None,
        new_classes: Optional[int] = None,
        old_classes: Optional[int] = None,
    ) -> None:
        self._names = list(names)

    def term_factors(self, terms: Mapping[str, Tensor]) -> Mapping[str, object]:
        if self.finished or not terms:
            return super().term_factors(terms)
        # the weights as device tensors: no host synchronisation per iteration
        device = next(iter(terms.values())).device
        return {name: w.to(device) for name, w in self.search.term_weight_tensors().items()}

    def weight(self, name: str) -> float:
        if self.finished:
            return self._fixed.get(name, 1.0)
        return float(self.search.term_weights().get(name, 1.0))

    def finish(self) -> Dict[int, str]:
        """Fix the argmax schemes and the map weights; returns ``{map: scheme}``."""
        self.chosen = dict(self.search.chosen())
        w = self.search.weights()
        self._fixed = {name: float(w[m]) for m, s in self.chosen.items() for name in candidate_terms(m, s)}
        self.finished = True
        return dict(self.chosen)

    def record(self, diagnostics: Optional[Mapping[str, float]] = None) -> None:
        """Append the current map weights and scheme probabilities to ``trace`` (every ``trace_every``)."""
        self.updates += 1
        if not self.trace_every or (self.updates - 1) % self.trace_every:
            return
        p = self.search.probabilities().detach().cpu()
        entry = {
            "update": self.updates,
            "weights": {str(m): float(v) for m, v in self.search.weights().items()},
            "probabilities": {
                str(m): {s: float(p[i, j]) for j, s in enumerate(self.search.schemes)}
                for i, m in enumerate(self.search.maps)
            },
        }
        if diagnostics:
            entry.update({k: float(v) for k, v in diagnostics.items()})
        self.trace.append(entry)

    def state_dict(self) -> dict:
        return {
            "search": self.search.state_dict(),
            "finished": self.finished,
            "chosen": {int(k): v for k, v in self.chosen.items()},
            "fixed": dict(self._fixed),
            "updates": self.updates,
            "trace": list(self.trace),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.search.load_state_dict(state["search"])
        self.finished = bool(state.get("finished", False))
        self.chosen = {int(k): v for k, v in state.get("chosen", {}).items()}
        self._fixed = {str(k): float(v) for k, v in state.get("fixed", {}).items()}
        self.updates = int(state.get("updates", 0))
        self.trace = list(state.get("trace", []))
