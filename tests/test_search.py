"""Tests of lskd.search (bi-level scheme search): hypergradient vs exact autograd, restoration of
parameters and buffers, a planted-answer search, errors, checkpoints and the DDP average.

Everything runs on the CPU in float64 on tiny networks (the whole file takes a few seconds)."""

from __future__ import annotations

import copy
import io
import math
import multiprocessing as mp
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lskd.search import SchemeSearch, basic_term_names, candidate_terms
from lskd.terms import SCHEME_KINDS, SCHEMES, map_term, mcd_name

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors only: one intra-op thread avoids OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _msq(a: Tensor) -> Tensor:
    """Mean over samples of the squared L2 norm over the rest: ``[N, ...] -> []``."""
    return (a.reshape(a.shape[0], -1) ** 2).sum(1).mean()


# -- toy problems ------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    """``x [N, 4] -> (f0 [N, 3], f1 [N, 3])``: a tanh MLP with two heads; ``spare`` is used by the
    training terms only (so the validation gradient has no entry for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head0 = nn.Linear(6, 3)
        self.head1 = nn.Linear(6, 3)
        self.spare = nn.Parameter(torch.randn(3))
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        h = torch.tanh(self.fc(x))
        return self.head0(h), torch.tanh(self.head1(h))


def two_layer_problem(seed: int):
    """(model, terms_fn, val_fn, candidate functions) with terms pod/md/mcd on maps 0 and 1 and an
    unsearched ``ce``; every term a different smooth function of the outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g, dtype=DT)
    xv = torch.randn(16, 4, generator=g, dtype=DT)
    t = {k: torch.randn(3, generator=g, dtype=DT) for k in ("a", "b", "c", "d", "e", "v")}
    torch.manual_seed(seed)
    model = TwoLayer().to(DT)

    def terms() -> Dict[str, Tensor]:
        f0, f1 = model(x)
        return {
            "ce": _msq(f0 + f1 - t["e"]),
            "pod0": _msq(f0 - t["a"]),
            "md0": ((f0 - t["b"]) ** 4).mean() + (model.spare**2).sum(),
            "mcd0": _msq(torch.sin(f0) - t["c"] * f0),
            "pod1": _msq(f1 * t["d"] - 1.0) + (model.frozen * model.spare).sum(),
            "md1": _msq(f1 - 0.5 * f0),
            "mcd1": (f1.exp() * t["a"]).mean(),
        }

    def val() -> Tensor:
        f0, f1 = model(xv)
        return _msq(f0 - t["v"]) + _msq(f1 + 0.5 * t["v"])

    return model, terms, val


def set_random_alpha(search: SchemeSearch, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        search.beta.copy_(torch.randn(search.beta.shape, generator=g, dtype=DT))
        search.w.copy_(torch.rand(search.w.shape, generator=g, dtype=DT) + 0.5)


def exact_products(search: SchemeSearch, params: List[Tensor], v, terms: Callable) -> Tensor:
    """``D [L, S]``: ``<grad L_{l,s}, v>`` by autograd, one candidate at a time (independent of lskd.search)."""
    D = torch.zeros(len(search.maps), len(search.schemes), dtype=DT)
    for i, l in enumerate(search.maps):
        for j, s in enumerate(search.schemes):
            names = [map_term(kind, l) for kind in SCHEME_KINDS[s]]
            if not names:
                continue
            tr = terms()
            loss = sum(tr[n] for n in names)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            D[i, j] = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None and vi is not None)
    return D


def manual_alpha_grad(beta: Tensor, w: Tensor, D: Tensor, xi: float) -> Tuple[Tensor, Tensor]:
    """``d/dalpha (-xi sum c D)`` with the softmax Jacobian written out:
    ``dc_{l,s}/dbeta_{l,j} = w_l p_s (delta_sj - p_j)``, ``dc_{l,s}/dw_l = p_s``."""
    p, w = torch.softmax(beta.detach(), -1), w.detach()
    L, S = p.shape
    gb = torch.zeros(L, S, dtype=DT)
    gw = torch.zeros(L, dtype=DT)
    for l in range(L):
        for j in range(S):
            gb[l, j] = -xi * sum(D[l, s] * w[l] * p[l, s] * (float(s == j) - p[l, j]) for s in range(S))
        gw[l] = -xi * sum(p[l, s] * D[l, s] for s in range(S))
    return gb, gw


def trainable(model: nn.Module) -> List[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


# -- 1. first-order update vs a manual computation ------------------------------------------
@pytest.mark.parametrize("eps_scale, rtol", [(1e-2, 2e-3), (1e-5, 1e-7)])
def test_first_order_matches_manual(eps_scale, rtol):
    model, terms, val = two_layer_problem(1)
    search = SchemeSearch(maps=(0, 1), eps_scale=eps_scale, dtype=DT)
    set_random_alpha(search, 2)
    params = trainable(model)
    xi = 0.3

    v = torch.autograd.grad(val(), params, allow_unused=True)
    assert v[params.index(model.spare)] is None  # unused by L_val -> v = 0
    D = exact_products(search, params, v, terms)
    gb, gw = manual_alpha_grad(search.beta, search.w, D, xi)

    calls = {"terms": 0, "val": 0}

    def terms_fn():
        assert not torch.is_grad_enabled()
        calls["terms"] += 1
        return terms()

    def val_fn():
        assert torch.is_grad_enabled()
        calls["val"] += 1
        return val()

    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in params:
            p.grad = torch.full_like(p, 7.0)
    diag = search.hypergradient(model.parameters(), terms_fn, val_fn, xi=xi)
    assert calls == {"terms": 2, "val": 1}
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for p in params:  # the network's .grad is left alone
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    v_norm = math.sqrt(sum(float((x**2).sum()) for x in v if x is not None))
    assert diag["v_norm"] == pytest.approx(v_norm, rel=1e-12)
    assert diag["eps"] == pytest.approx(eps_scale / v_norm, rel=1e-12)
    assert diag["val_loss"] == pytest.approx(float(val().detach()), rel=1e-12)
    c = search.coefficients().detach()
    assert diag["objective"] == pytest.approx(float(-xi * (c * D).sum()), rel=rtol * 10, abs=1e-9)
    scale = float(gb.abs().max())
    torch.testing.assert_close(search.beta.grad, gb, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(search.w.grad, gw, rtol=rtol, atol=rtol * float(gw.abs().max()))

    # one Adam step + clamp/renormalise, by hand
    beta0, w0 = search.beta.detach().clone(), search.w.detach().clone()
    search.step()
    lr, (b1, b2), wd, aeps = 3e-3, (0.5, 0.999), 1e-3, 1e-8
    expected = []
    for x0, g in ((beta0, search.beta.grad), (w0, search.w.grad)):
        g = g + wd * x0
        m, s = (1 - b1) * g, (1 - b2) * g * g
        m_hat, s_hat = m / (1 - b1), s / (1 - b2)
        expected.append(x0 - lr * m_hat / (s_hat.sqrt() + aeps))
    w_exp = expected[1].clamp(min=1e-3)
    w_exp = w_exp * 2 / w_exp.sum()
    torch.testing.assert_close(search.beta.detach(), expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(search.w.detach(), w_exp, rtol=1e-12, atol=1e-14)
    assert float(search.w.detach().sum()) == pytest.approx(2.0, abs=1e-12)


def test_term_weights_and_train_loss():
    search = SchemeSearch(maps=(2, 4), dtype=DT)
    set_random_alpha(search, 5)
    p = torch.softmax(search.beta.detach(), -1)
    w = search.w.detach()
    tw = search.term_weights()
    assert set(tw) == {"pod2", "md2", "mcd2", "pod4", "md4", "mcd"}
    for i, l in enumerate((2, 4)):
        assert tw[f"pod{l}"] == pytest.approx(float(w[i] * p[i, 0]))
        assert tw[f"md{l}"] == pytest.approx(float(w[i] * (p[i, 1] + p[i, 2])))
        assert tw[mcd_name(l)] == pytest.approx(float(w[i] * p[i, 2]))
    x = torch.randn(6, dtype=DT, requires_grad=True)
    names = ["pod2", "md2", "mcd2", "pod4", "md4", "mcd"]
    terms = {n: x[k] ** 2 for k, n in enumerate(names)}
    terms["ce"] = x.sum()
    loss = search.train_loss(terms)
    expected = x.sum() + sum(tw[n] * x[k] ** 2 for k, n in enumerate(names))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    loss.backward()
    assert search.beta.grad is None and search.w.grad is None  # weights are detached
    # a search without md+mcd: the MCD names get weight 0
    s2 = SchemeSearch(maps=(4,), schemes=("pod", "md", "none"))
    assert s2.term_weights()["mcd"] == 0.0
    assert candidate_terms(4, "md+mcd") == ("md4", "mcd") and candidate_terms(3, "none") == ()
    assert basic_term_names(0) == ("pod0", "md0", "mcd0") and mcd_name(4) == "mcd"


# -- 2. finite differences vs the exact Hessian-vector product; second order; buffers ----------
class ConvBN(nn.Module):
    """``x [N, 2, 6, 6] -> (m1 [N, 3, 6, 6], m4 [N, 2, 6, 6])`` with a BatchNorm (train mode) in between."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        m1 = torch.tanh(self.bn(self.conv1(x)))
        return m1, self.conv2(m1)


def conv_problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 6, 6, generator=g, dtype=DT)
    xv = torch.randn(4, 2, 6, 6, generator=g, dtype=DT)
    t1 = torch.randn(3, 6, 6, generator=g, dtype=DT)
    t4 = torch.randn(2, 6, 6, generator=g, dtype=DT)
    torch.manual_seed(seed)
    model = ConvBN().to(DT).train()

    def terms_of(net: nn.Module) -> Callable[[], Dict[str, Tensor]]:
        def terms() -> Dict[str, Tensor]:
            m1, m4 = net(x)
            return {
                "ce": _msq(m4.mean((2, 3))),
                "pod1": _msq(m1.mean(1) - t1.mean(0)),
                "md1": _msq(m1 - t1),
                "mcd1": _msq(m1.pow(2).mean((2, 3)) - 0.3),
                "pod4": _msq(m4.sum(1) - t4[0]),
                "md4": _msq(torch.sigmoid(m4) - torch.sigmoid(t4)),
                "mcd": _msq(m4.flatten(2) @ m4.flatten(2).transpose(1, 2) / 36.0 - 0.1),
            }

        return terms

    def val_of(net: nn.Module) -> Callable[[], Tensor]:
        return lambda: _msq(net(xv)[1] - t4)

    return model, terms_of, val_of


def exact_mixed_product(search: SchemeSearch, model: nn.Module, terms: Callable, v: List[Tensor]):
    """``nabla^2_{alpha,theta} L_train(theta, alpha) v`` by double backward (beta part, w part)."""
    params = trainable(model)
    with torch.enable_grad():
        c = search.coefficients()
        tr = terms()
        loss = tr["ce"]
        for i, l in enumerate(search.maps):
            for j, s in enumerate(search.schemes):
                for n in candidate_terms(l, s):
                    loss = loss + c[i, j] * tr[n]
        g = torch.autograd.grad(loss, params, create_graph=True)
        gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
        return torch.autograd.grad(gv, [search.beta, search.w])


def state_of(model: nn.Module) -> List[Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def assert_bitwise(model: nn.Module, saved: List[Tensor]) -> None:
    now = list(model.parameters()) + list(model.buffers())
    assert len(now) == len(saved)
    for a, b in zip(now, saved):
        assert torch.equal(a, b)


def test_fd_matches_exact_hvp_first_order():
    model, terms_of, val_of = conv_problem(3)
    search = SchemeSearch(maps=(1, 4), eps_scale=1e-4, dtype=DT)
    set_random_alpha(search, 4)
    xi = 0.05
    ref = copy.deepcopy(model)
    v = torch.autograd.grad(val_of(ref)(), trainable(ref))
    hb, hw = exact_mixed_product(search, ref, terms_of(ref), v)

    saved = state_of(model)
    search.hypergradient(model.parameters(), terms_of(model), val_of(model), xi=xi, buffers_of=model)
    assert_bitwise(model, saved)  # parameters and BatchNorm running statistics
    torch.testing.assert_close(search.beta.grad, -xi * hb, rtol=1e-4, atol=1e-4 * float(hb.abs().max()) * xi)
    torch.testing.assert_close(search.w.grad, -xi * hw, rtol=1e-4, atol=1e-4 * float(hw.abs().max()) * xi)

    # the D matrix itself vs one backward per candidate, and the public FD function
    params = trainable(model)
    D_fd = search.finite_difference_products(params, list(v), terms_of(model), buffers_of=model)
    assert_bitwise(model, saved)
    D_ex = exact_products(search, trainable(ref), v, terms_of(ref))
    torch.testing.assert_close(D_fd, D_ex, rtol=1e-4, atol=1e-6 * float(D_ex.abs().max()))
    torch.testing.assert_close(search.exact_products(trainable(ref), v, terms_of(ref)), D_ex)


def test_second_order_virtual_step_and_restore():
    model, terms_of, val_of = conv_problem(5)
    search = SchemeSearch(maps=(1, 4), order=2, eps_scale=1e-4, dtype=DT)
    set_random_alpha(search, 6)
    xi = 0.2
    # the trainer's backward of L_train (detached weights) -> .grad = g_train
    search.train_loss(terms_of(model)()).backward()
    params = trainable(model)
    g_train = [p.grad.detach().clone() for p in params]

    # expected: v' = grad L_val(theta - xi g) on a copy, mixed product at theta
    virt = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(trainable(virt), g_train):
            p.add_(g, alpha=-xi)
    v2 = torch.autograd.grad(val_of(virt)(), trainable(virt))
    at_theta = copy.deepcopy(model)
    hb, hw = exact_mixed_product(search, at_theta, terms_of(at_theta), v2)

    seen: List[Tensor] = []
    val = val_of(model)

    def val_fn() -> Tensor:
        seen.append(model.conv1.weight.detach().clone())
        return val()

    saved = state_of(model)
    diag = search.hypergradient(
        model.parameters(),
        terms_of(model),
        val_fn,
        xi=xi,
        train_grads=[p.grad for p in model.parameters()],
        buffers_of=model,
    )
    assert len(seen) == 1 and torch.equal(seen[0], saved[0].add(g_train[0], alpha=-xi))  # evaluated at theta'
    assert_bitwise(model, saved)
    for p, g in zip(params, g_train):
        assert torch.equal(p.grad, g)
    assert diag["val_loss"] == pytest.approx(float(val_of(virt)().detach()), rel=1e-12)
    torch.testing.assert_close(search.beta.grad, -xi * hb, rtol=1e-4, atol=1e-4 * float(hb.abs().max()) * xi)
    torch.testing.assert_close(search.w.grad, -xi * hw, rtol=1e-4, atol=1e-4 * float(hw.abs().max()) * xi)
    gb, gw = search.beta.grad.clone(), search.w.grad.clone()

    # g_train computed by the module from terms_fn (train_loss) or from a closure: same result
    search.hypergradient(model.parameters(), terms_of(model), val_of(model), xi=xi, buffers_of=model)
    torch.testing.assert_close(search.beta.grad, gb, rtol=1e-10, atol=1e-14)
    assert_bitwise(model, saved)
    search.hypergradient(
        model.parameters(),
        terms_of(model),
        val_of(model),
        xi=xi,
        buffers_of=model,
        train_loss_fn=lambda: search.train_loss(terms_of(model)()),
    )
    torch.testing.assert_close(search.w.grad, gw, rtol=1e-10, atol=1e-14)
    assert_bitwise(model, saved)


def test_fd_passes_share_rng_and_zero_direction():
    model, terms, val = two_layer_problem(7)
    search = SchemeSearch(maps=(0, 1), dtype=DT)

    def noisy_terms() -> Dict[str, Tensor]:
        out = dict(terms())
        out["pod0"] = out["pod0"] + torch.rand((), dtype=DT)  # dropout-like randomness
        return out

    ref = copy.deepcopy(model)
    v = torch.autograd.grad(val(), trainable(model), allow_unused=True)
    torch.manual_seed(11)
    search.hypergradient(model.parameters(), noisy_terms, val, xi=0.1)
    after = torch.rand(3)
    torch.manual_seed(11)
    assert torch.equal(after, torch.rand(3))  # the FD passes do not advance the global RNG
    # the noise cancels only when both passes draw the same numbers (else it is O(1) / (2 eps))
    D = search.finite_difference_products(trainable(model), list(v), noisy_terms)
    D_plain = search.finite_difference_products(trainable(model), list(v), terms)
    torch.testing.assert_close(D, D_plain, rtol=1e-9, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))

    # ||v|| = 0 (validation loss independent of theta): D = 0, grads 0, eps reported 0
    const = torch.tensor(1.5, dtype=DT, requires_grad=True)
    diag = search.hypergradient(model.parameters(), terms, lambda: const * 2, xi=0.1)
    assert diag["v_norm"] == 0.0 and diag["eps"] == 0.0
    assert torch.equal(search.beta.grad, torch.zeros_like(search.beta))
    assert torch.equal(search.w.grad, torch.zeros_like(search.w))
    diag = search.hypergradient(model.parameters(), terms, lambda: torch.tensor(0.5, dtype=DT), xi=0.1)
    assert diag["v_norm"] == 0.0 and diag["val_loss"] == 0.5
    assert torch.equal(search.beta.grad, torch.zeros_like(search.beta))


# -- 3. planted answer ---------------------------------------------------------------------------
def planted_run(seed: int, iters: int, order: int) -> SchemeSearch:
    """Map 0: ``md0`` pulls head 0 toward the validation target y0, ``pod0`` toward -y0 and
    ``mcd0`` toward 0 (so md+mcd pulls half-way). Map 1: ``pod1`` is the good one. The network
    is trained on the mixture (detached weights); the search must find md on 0 and pod on 1."""
    g = torch.Generator().manual_seed(seed)
    A0 = torch.randn(2, 4, generator=g, dtype=DT)
    A1 = torch.randn(2, 4, generator=g, dtype=DT)
    x = torch.randn(32, 4, generator=g, dtype=DT)
    xv = torch.randn(32, 4, generator=g, dtype=DT)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT)

    def terms() -> Dict[str, Tensor]:
        f = net(x)
        f0, f1, y0, y1 = f[:, :2], f[:, 2:], x @ A0.T, x @ A1.T
        return {
            "md0": _msq(f0 - y0),
            "pod0": _msq(f0 + y0),
            "mcd0": _msq(f0),
            "pod1": _msq(f1 - y1),
            "md1": _msq(f1 + y1),
            "mcd1": _msq(f1),
        }

    def val() -> Tensor:
        f = net(xv)
        return _msq(f[:, :2] - xv @ A0.T) + _msq(f[:, 2:] - xv @ A1.T)

    search = SchemeSearch(maps=(0, 1), order=order, lr=0.05, dtype=DT)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(iters):
        opt.zero_grad()
        search.train_loss(terms()).backward()
        search.hypergradient(net.parameters(), terms, val, xi=0.1, train_grads=[p.grad for p in net.parameters()])
        search.step()
        opt.step()
    return search


@pytest.mark.parametrize("seed, order", [(0, 1), (1, 1), (2, 2)])
def test_planted_scheme_is_found(seed, order):
    search = planted_run(seed, 250, order)
    assert search.chosen() == {0: "md", 1: "pod"}
    p = search.probabilities().detach()
    assert float(p[0, 1]) > 0.6 and float(p[1, 0]) > 0.6
    assert float(search.w.detach().sum()) == pytest.approx(2.0, abs=1e-12) and bool((search.w > 0).all())


# -- 4. errors, checkpoints, renormalisation ----------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="unknown scheme 'mcd'"):
        SchemeSearch(schemes=("pod", "mcd"))
    with pytest.raises(ValueError, match="repeated scheme"):
        SchemeSearch(schemes=("pod", "pod"))
    with pytest.raises(ValueError, match="outside 0..5"):
        SchemeSearch(maps=(0, 6))
    with pytest.raises(ValueError, match="outside 0..5"):
        SchemeSearch(maps=(-1,))
    with pytest.raises(ValueError, match="not an integer"):
        SchemeSearch(maps=(1.5,))
    with pytest.raises(ValueError, match="repeated map"):
        SchemeSearch(maps=(2, 2))
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        SchemeSearch(order=3)
    with pytest.raises(ValueError, match="unknown scheme"):
        candidate_terms(0, "kd")

    model, terms, val = two_layer_problem(0)
    search = SchemeSearch(maps=(0, 1), dtype=DT)
    with pytest.raises(ValueError, match="xi must be"):
        search.hypergradient(model.parameters(), terms, val, xi=-0.1)

    def missing() -> Dict[str, Tensor]:
        out = dict(terms())
        del out["mcd1"]
        return out

    with pytest.raises(KeyError, match=r"mcd1.*map 1, 'md\+mcd'"):
        search.hypergradient(model.parameters(), missing, val, xi=0.1)
    s4 = SchemeSearch(maps=(4,), dtype=DT)
    with pytest.raises(KeyError, match="'mcd'"):
        s4.candidate_losses({"pod4": torch.zeros(()), "md4": torch.zeros(()), "mcd4": torch.zeros(())})
    with pytest.raises(FloatingPointError, match="validation loss is not finite"):
        search.hypergradient(model.parameters(), terms, lambda: val() * float("nan"), xi=0.1)
    with pytest.raises(ValueError, match="train_grads"):
        SchemeSearch(maps=(0, 1), order=2, dtype=DT).hypergradient(
            model.parameters(), terms, val, 0.1, train_grads=[None]
        )
    # a failing closure still leaves the parameters as they were
    saved = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def failing() -> Dict[str, Tensor]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return terms()

    with pytest.raises(RuntimeError, match="boom"):
        search.hypergradient(model.parameters(), failing, val, xi=0.1)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
    # checkpoint of another layout
    with pytest.raises(ValueError, match="does not match"):
        SchemeSearch(maps=(0, 2)).load_state_dict(SchemeSearch(maps=(0, 1)).state_dict())


def _synthetic_grads(search: SchemeSearch, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    search.beta.grad = torch.randn(search.beta.shape, generator=g, dtype=search.beta.dtype)
    search.w.grad = 3 * torch.randn(search.w.shape, generator=g, dtype=search.w.dtype)


def test_state_dict_resume_is_exact():
    a = SchemeSearch(maps=(0, 3, 5), lr=0.05)
    for k in range(10):
        _synthetic_grads(a, k)
        a.step()

    b = SchemeSearch(maps=(0, 3, 5), lr=0.05)
    for k in range(5):
        _synthetic_grads(b, k)
        b.step()
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    for _ in range(3):  # b goes on differently; the checkpoint is what counts
        _synthetic_grads(b, 99)
        b.step()
    c = SchemeSearch(maps=(0, 3, 5), lr=1.0)  # the checkpoint's lr wins
    c.load_state_dict(torch.load(buf, weights_only=False))
    for k in range(5, 10):
        _synthetic_grads(c, k)
        c.step()
    assert torch.equal(a.beta, c.beta) and torch.equal(a.w, c.w)
    assert a.chosen() == c.chosen() and a.weights() == c.weights()


def test_renormalisation_and_reporting():
    search = SchemeSearch(maps=(0, 1, 2, 3), lr=0.5, weight_decay=0.0)
    for k in range(20):  # big steps that push weights far below w_min
        search.beta.grad = torch.zeros_like(search.beta)
        search.w.grad = torch.tensor([50.0, -1.0, 3.0, -2.0])
        search.step()
        assert float(search.w.detach().sum()) == pytest.approx(4.0, rel=1e-6)
        assert bool((search.w > 0).all())
    assert search.weights()[0] < 0.1 and set(search.weights()) == {0, 1, 2, 3}
    # ties go to the first scheme in order; argmax otherwise
    with torch.no_grad():
        search.beta.zero_()
        search.beta[1, 2] = 1.0
        search.beta[2, 1] = search.beta[2, 3] = 0.5
    assert search.chosen() == {0: SCHEMES[0], 1: "md+mcd", 2: "md", 3: "pod"}
    torch.testing.assert_close(search.probabilities().sum(-1).detach(), torch.ones(4))
    reordered = SchemeSearch(maps=(3,), schemes=("none", "md", "pod"))
    assert reordered.schemes == ("pod", "md", "none") and reordered.chosen() == {3: "pod"}


# -- 5. DDP: architecture gradients averaged over two gloo ranks -----------------------------------
def _ddp_rank_grads(rank: int, k: int, beta_shape: torch.Size) -> Tuple[Tensor, "Tensor | None"]:
    """Rank ``rank``'s synthetic gradients at step ``k`` (rank 1 has no w.grad at step 1)."""
    g = torch.Generator().manual_seed(100 * k + rank)
    gb = torch.randn(beta_shape, generator=g, dtype=DT)
    gw = None if (k == 1 and rank == 1) else torch.randn(3, generator=g, dtype=DT)
    return gb, gw


def _ddp_worker(rank: int, init: str, out: str) -> None:
    """One rank (a forked process, so lskd is not imported again): three steps, then save beta/w."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        s = SchemeSearch(maps=(0, 2, 4), lr=0.05, dtype=DT)
        for k in range(3):
            s.beta.grad, s.w.grad = _ddp_rank_grads(rank, k, s.beta.shape)
            s.step()
        torch.save({"beta": s.beta.detach(), "w": s.w.detach()}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_average_gradients(tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the 'fork' start method (the ranks are forked to avoid re-importing lskd)")
    ctx = mp.get_context("fork")
    init = f"file://{tmp_path / 'store'}"
    outs = [str(tmp_path / f"out{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_ddp_worker, args=(r, init, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "DDP ranks timed out"
    assert [p.exitcode for p in procs] == [0, 0], f"DDP ranks failed: exit codes {[p.exitcode for p in procs]}"
    res = [torch.load(o) for o in outs]
    assert torch.equal(res[0]["beta"], res[1]["beta"]) and torch.equal(res[0]["w"], res[1]["w"])

    single = SchemeSearch(maps=(0, 2, 4), lr=0.05, dtype=DT)  # one process, averaged gradients
    for k in range(3):
        grads = [_ddp_rank_grads(r, k, single.beta.shape) for r in range(2)]
        single.beta.grad = (grads[0][0] + grads[1][0]) / 2
        single.w.grad = sum(torch.zeros(3, dtype=DT) if gw is None else gw for _, gw in grads) / 2
        single.step()
    torch.testing.assert_close(res[0]["beta"], single.beta.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res[0]["w"], single.w.detach(), rtol=1e-12, atol=1e-15)
    # and the average really mattered: rank 0's gradients alone give something else
    alone = SchemeSearch(maps=(0, 2, 4), lr=0.05, dtype=DT)
    for k in range(3):
        alone.beta.grad, alone.w.grad = _ddp_rank_grads(0, k, alone.beta.shape)
        alone.step()
    assert not torch.equal(alone.beta.detach(), res[0]["beta"])
