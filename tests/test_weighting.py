"""lskd.weighting: fixed weights, RGE (docs/MATHEMATICS.md §4.1, the released rule) and GradNorm against hand
computations on small problems; positivity and renormalisation; resume; the per-term layers."""

from __future__ import annotations

import math

import pytest
import torch

from lskd.models import DeepLabV3
from lskd.weighting import RGE, FixedWeights, GradNorm, build_weighting, deeplab_layers, term_layer

NAMES = ["ce", "mcd", "unkd", "pod0", "pod1", "md2", "md3", "md4", "md5"]


def test_released_term_layers():
    """docs/MATHEMATICS.md §4.1: ASPP output norm for terms 0, 1, 2, 7, 8; stages 1, 2, 3 for terms 3, 4, 5 (group B);
    stage 4 for term 6 (md3, the stage-4 map), kept in group A (the release's W3 = mod5)."""
    got = {n: term_layer(n) for n in NAMES}
    assert got == {
        "ce": ("aspp", "A"),
        "mcd": ("aspp", "A"),
        "unkd": ("aspp", "A"),
        "pod0": ("stage1", "B"),
        "pod1": ("stage2", "B"),
        "md2": ("stage3", "B"),
        "md3": ("stage4", "A"),
        "md4": ("aspp", "A"),
        "md5": ("aspp", "A"),
    }
    assert term_layer("mcd0") == ("stage1", "B") and term_layer("pod5") == ("aspp", "A")
    assert term_layer("pod3") == term_layer("mcd3") == ("stage4", "A")
    with pytest.raises(ValueError, match="'foo'"):
        term_layer("foo")


def test_deeplab_layers_are_the_first_parameters():
    model = DeepLabV3("tiny", [3, 1])
    layers = deeplab_layers(model)
    assert set(layers) == {"stage1", "stage2", "stage3", "stage4", "aspp"}
    assert layers["stage1"] is model.backbone.layer1[0].conv1.weight
    assert layers["aspp"] is model.aspp.project[1].weight
    with pytest.raises(ValueError, match="layers="):
        deeplab_layers(torch.nn.Linear(2, 2))


class Toy:
    """One parameter tensor per layer key; term i = k_i * ||W_i - c_i||^2 + 0.5 on its own RGE layer."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.layers = {
            k: torch.randn(n, generator=g, dtype=torch.float64).requires_grad_(True)
            for k, n in [("aspp", 5), ("stage1", 3), ("stage2", 4), ("stage3", 2), ("stage4", 3)]
        }
        self.k = {n: 0.2 + torch.rand((), generator=g, dtype=torch.float64).item() for n in NAMES}
        self.c = {n: torch.randn(self.layers[self.key(n)].shape, generator=g, dtype=torch.float64) for n in NAMES}

    @staticmethod
    def key(name: str) -> str:
        return term_layer(name)[0]

    def terms(self, shift: float = 0.0):
        return {n: self.k[n] * ((self.layers[self.key(n)] - self.c[n] - shift) ** 2).sum() + 0.5 for n in NAMES}

    def grad(self, name: str, shift: float = 0.0) -> torch.Tensor:
        """d term / d W of the term's RGE layer, by hand."""
        return 2 * self.k[name] * (self.layers[self.key(name)].detach() - self.c[name] - shift)


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def test_rge_update_equals_hand_computed_step():
    toy = Toy(0)
    rge = RGE(layers=toy.layers)
    rge.begin_step(NAMES, new_classes=2, old_classes=5)
    w = torch.tensor([1.3, 0.7, 1.1, 0.9, 1.0, 1.4, 0.6, 1.2, 0.8])
    with torch.no_grad():
        rge.w.copy_(w)
    # epoch 0: L(0) follows the current batch, so r = 1
    rge.update(None, toy.terms(shift=0.3))
    assert torch.equal(
        rge.loss0, torch.tensor([float(v.detach()) for v in toy.terms(shift=0.3).values()], dtype=torch.float64)
    )
    rge.end_epoch(0)  # renormalises: sum w = 9, and L(0) is frozen from now on
    w = rge.w.detach().double().clone()
    assert float(w.sum()) == pytest.approx(9.0, rel=1e-6)
    loss0 = [float(v.detach()) for v in toy.terms(shift=0.3).values()]
    terms = toy.terms()
    rge.update(None, terms)
    # by hand
    L = [float(terms[n].detach()) for n in NAMES]
    g = [float(toy.grad(n).mean()) for n in NAMES]
    G = [w[i].item() * g[i] for i in range(9)]
    rel = [L[i] / loss0[i] for i in range(9)]
    A, B = [0, 1, 2, 6, 7, 8], [3, 4, 5]
    want = [0.0] * 9
    for grp in (A, B):
        mean_rel = sum(rel[j] for j in grp) / len(grp)
        mean_G = sum(G[j] for j in grp) / len(grp)
        for i in grp:
            target = mean_G * (rel[i] / mean_rel) ** 10
            want[i] += 10 * _sign(G[i] - target) * g[i]
    tie = 2 / 5
    s = _sign(w[0].item() - tie * w[2].item())
    want[0] += 5e-4 * s
    want[2] -= 5e-4 * s * tie
    for a, b in [(3, 4), (4, 5), (5, 6), (6, 7)]:  # pod0 < pod1 < md2 < md3 < md4
        if 1.25 * w[a].item() - w[b].item() > 0:
            want[a] += 1e-4 * 1.25
            want[b] -= 1e-4
    assert g[6] != 0.0  # md3 acts on stage 4's first parameter (group A), where it has a gradient
    torch.testing.assert_close(rge.w.grad.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    # L(0) stays frozen after epoch 0
    assert rge.loss0.tolist() == pytest.approx(loss0)


def test_rge_weights_positive_and_renormalised():
    toy = Toy(1)
    rge = RGE(layers=toy.layers, lr=50.0)  # a huge step: clamping keeps the weights positive
    rge.begin_step(NAMES, new_classes=1, old_classes=4)
    for epoch in range(3):
        for i in range(4):
            rge.update(None, toy.terms(shift=0.1 * i))
            rge.after_step()
            assert bool((rge.w > 0).all())
        rge.end_epoch(epoch)
        assert float(rge.w.detach().sum()) == pytest.approx(len(NAMES), rel=1e-6)
    assert len(rge.trace) == 12 and set(rge.trace[0]["weights"]) == set(NAMES)


def test_rge_state_round_trip_and_errors():
    toy = Toy(2)
    a = RGE(layers=toy.layers, lr=0.1)
    a.begin_step(NAMES, new_classes=1, old_classes=3)
    a.update(None, toy.terms())
    a.after_step()
    a.end_epoch(0)
    b = RGE(layers=toy.layers, lr=0.1)
    b.begin_step(NAMES, new_classes=1, old_classes=3)
    b.load_state_dict(a.state_dict())
    for x in (a, b):
        x.update(None, toy.terms(shift=0.2))
        x.after_step()
    assert torch.equal(a.w, b.w) and torch.equal(a.loss0, b.loss0)
    with pytest.raises(KeyError, match="'nope'"):
        a.weight("nope")
    with pytest.raises(KeyError, match="not announced"):
        a.total({"nope": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="'md5' is missing"):
        a.update(None, {k: v for k, v in toy.terms().items() if k != "md5"})
    with pytest.raises(ValueError, match="unknown weighting"):
        build_weighting("magic")
    with pytest.raises(ValueError, match="cannot be combined"):
        build_weighting("rge", {"ce": 2.0})


def test_gradnorm_against_its_formula():
    toy = Toy(3)
    gn = GradNorm(layers=toy.layers, lr=0.05)
    gn.begin_step(NAMES)
    first = toy.terms(shift=0.5)
    gn.update(None, first)  # L(0) = the first batch of the step
    gn.after_step()
    w = gn.w.detach().double().clone()
    terms = toy.terms()
    gn.update(None, terms)
    loss0 = [float(first[n].detach()) for n in NAMES]
    L = [float(terms[n].detach()) for n in NAMES]
    norms = [float(toy.grad(n).norm()) for n in NAMES]
    G = [w[i].item() * norms[i] for i in range(9)]
    rel = [L[i] / loss0[i] for i in range(9)]
    mean_rel = sum(rel) / 9
    target = [sum(G) / 9 * (r / mean_rel) ** 1.5 for r in rel]
    want = torch.tensor([_sign(G[i] - target[i]) * norms[i] for i in range(9)], dtype=torch.float64)
    torch.testing.assert_close(gn.w.grad.double(), want, rtol=1e-5, atol=1e-9)
    gn.after_step()  # own SGD step, clamp, renormalise to T every step
    stepped = (w - 0.05 * want).clamp(min=1e-3)
    torch.testing.assert_close(gn.w.detach().double(), stepped * 9 / stepped.sum(), rtol=1e-5, atol=1e-7)


def test_total_is_the_weighted_sum():
    toy = Toy(4)
    rge = RGE(layers=toy.layers)
    rge.begin_step(NAMES)
    with torch.no_grad():
        rge.w.copy_(torch.arange(1, 10, dtype=torch.float32))
    terms = toy.terms()
    total = rge.total(terms)
    assert float(total.detach()) == pytest.approx(
        sum((i + 1) * float(terms[n].detach()) for i, n in enumerate(NAMES)), rel=1e-5
    )
    total.backward()
    assert rge.w.grad is None  # weights never get gradients from the total
    f = FixedWeights({"unkd": 0.5})
    f.begin_step(NAMES)
    assert f.weights()["unkd"] == 0.5 and f.weights()["ce"] == 1.0


def _lskd_batch_terms():
    """A tiny lskd DeepLabV3 student (step 1: O = 3, one new class) and LSKD's nine terms on one batch."""
    from lskd.methods import LSKD, StepContext

    torch.manual_seed(0)
    teacher = DeepLabV3("tiny", [3]).freeze()
    student = DeepLabV3("tiny", [3])
    student.load_state_dict(teacher.state_dict())
    student.add_step(1)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 32, 32))
    method = LSKD()
    ctx = StepContext(step=1, old_classes=3, new_classes=1)
    method.labeler.thresholds = torch.full((3,), 1.01)  # every background pixel pseudo-labelled
    t_out, bctx = method.teacher_forward(teacher, images, labels, ctx)
    terms = method.terms(images, labels, student(images), t_out, bctx)
    return student, terms, ctx


def test_rge_md3_acts_on_the_first_parameter_of_stage4():
    """md3 (L6, the stage-4 map's term): RGE's layer is stage 4's first parameter (group A), and its
    gradient statistic is non-zero (on the ASPP norm, after stage 4, it would be exactly 0)."""
    student, terms, ctx = _lskd_batch_terms()
    rge = RGE()
    rge.begin_step(list(terms), ctx)
    assert rge.layer_of("md3") == ("stage4", "A")
    assert deeplab_layers(student)["stage4"] is next(student.backbone.layer4.parameters())
    i = NAMES.index("md3")
    assert i in [grp for grp in rge.groups() if 0 in grp][0]  # same group as ce (A)
    grad = rge.term_gradients(student, terms)[i]
    assert grad is not None and grad.shape == next(student.backbone.layer4.parameters()).shape
    rge.update(student, terms)
    g = rge.trace[-1]["g"][i]  # g_i = mean(dL_i/dW_i); G_i = w_i g_i with w_i = 1 here
    assert g != 0.0 and g == pytest.approx(float(grad.double().mean()))


def test_rge_on_deeplab_terms_of_a_real_batch():
    """Per-term gradients on the real model: every term reaches its layer; the update is finite."""
    student, terms, ctx = _lskd_batch_terms()
    assert list(terms) == NAMES and float(terms["ce"].detach()) > 0
    rge = RGE()
    rge.begin_step(list(terms), ctx)
    grads = rge.term_gradients(student, terms)
    assert all(g is not None and float(g.abs().sum()) > 0.0 for g in grads)
    rge.update(student, terms)
    assert rge.w.grad is not None and bool(torch.isfinite(rge.w.grad).all())
    assert all(p.grad is None for p in student.parameters())  # nothing accumulated into the network
    assert math.isfinite(float(rge.total(terms).detach()))
