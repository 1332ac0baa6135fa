"""CISS methods: named terms, hand-computed UNCE/UNKD, PLOP pseudo-labels, LSKD masks, training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lskd.methods import (
    LSKD,
    METHODS,
    PLOP,
    RELEASED_SCHEMES,
    Finetune,
    MiB,
    StepContext,
    build_method,
    collapse_new_into_background,
    erase_images,
    histogram_median,
    normalized_entropy,
    pseudo_label,
    teacher_triplet,
    unbiased_cross_entropy,
    unbiased_kd,
)
from lskd.methods.plop import EntropyPseudoLabeler, released_histogram_threshold
from lskd.models import DeepLabV3

OLD, NEW, SIZE = 3, 2, 64
LSKD_NAMES = ["ce", "mcd", "unkd", "pod0", "pod1", "md2", "md3", "md4", "md5"]
NAMES = {
    "finetune": ["ce"],
    "joint": ["ce"],
    "mib": ["unce", "unkd"],
    "plop": ["ce", "pod0", "pod1", "pod2", "pod3", "pod4", "pod5"],
    "lskd": LSKD_NAMES,
}
DISTILL = {"pod0", "pod1", "pod2", "pod3", "pod4", "pod5", "md2", "md3", "md4", "md5", "mcd"}


def _batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, SIZE, SIZE, generator=g)
    labels = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    labels[:, 8:30, 10:40] = OLD  # new class 3
    labels[:, 36:60, 20:50] = OLD + 1  # new class 4
    labels[:, :, :3] = 255
    return images, labels


def _teacher(seed: int = 0) -> DeepLabV3:
    torch.manual_seed(seed)
    teacher = DeepLabV3("tiny", [OLD])
    with torch.no_grad():  # calibrate BN running statistics like a trained model
        for i in range(3):
            teacher(_batch(4, 100 + i)[0])
    return teacher.freeze()


def _student(teacher: DeepLabV3) -> DeepLabV3:
    student = copy.deepcopy(teacher)
    student._frozen = False
    student.requires_grad_(True).train()
    student.add_step(NEW)
    return student


CTX = StepContext(step=1, old_classes=OLD, new_classes=NEW)


def _run(method, teacher, student, images, labels, ctx=CTX):
    t_out, bctx = method.teacher_forward(teacher, images, labels, ctx)
    return method.terms(images, labels, student(images), t_out, bctx)


@pytest.fixture(scope="module")
def nets():
    teacher = _teacher()
    return teacher, _student(teacher)


# -- interface ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_terms_named_finite_differentiable(nets, name):
    teacher, student = nets
    method = build_method(name)
    images, labels = _batch()
    method.prepare_step(teacher, [(images, labels)], CTX)
    student.zero_grad(set_to_none=True)
    terms = _run(method, teacher, student, images, labels)
    assert list(terms) == NAMES[name] == method.term_names(CTX)
    for k, v in terms.items():
        assert v.dim() == 0 and torch.isfinite(v), k
        assert v.requires_grad, k
    sum(terms.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert method.needs_teacher == (name not in ("finetune", "joint"))
    assert method.teacher_passes == {"lskd": 3, "finetune": 0, "joint": 0}.get(name, 1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step0_is_plain_ce(nets, name):
    _, student = nets
    images, labels = _batch()
    ctx0 = StepContext(step=0, old_classes=0, new_classes=OLD + NEW)
    method = build_method(name)
    t_out, bctx = method.teacher_forward(None, images, labels, ctx0)
    assert t_out is None
    terms = method.terms(images, labels, student(images), None, bctx)
    assert list(terms) == ["ce"] == method.term_names(ctx0)
    want = Finetune().terms(images, labels, student(images), None, ctx0)["ce"]
    torch.testing.assert_close(terms["ce"], want)


def test_build_method_errors():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("icarl")
    assert build_method("joint").name == "joint"
    with pytest.raises(ValueError, match="scheme"):
        LSKD(schemes={0: "pod", 1: "fancy"})


@pytest.mark.parametrize("name", ["plop", "lskd"])
def test_distillation_terms_zero_at_teacher_equals_student(name):
    teacher = _teacher(1)
    student = _student(teacher).eval()
    with torch.no_grad():  # new classes output 0 so that bg + sum(new) == teacher bg; undo MiB's bg shift
        student.classifiers[1].weight.zero_()
        student.classifiers[1].bias.zero_()
        student.classifiers[0].bias.copy_(teacher.classifiers[0].bias)
    method = build_method(name)
    images, labels = _batch(seed=3)
    method.prepare_step(teacher, [(images, labels)], CTX)
    terms = _run(method, teacher, student, images, labels)
    checked = [k for k in terms if k in DISTILL]
    assert len(checked) == (6 if name == "plop" else 7)
    for k in checked:
        assert float(terms[k].detach()) <= 1e-6, (k, float(terms[k].detach()))
    sum(terms[k] for k in checked).backward()  # gradient at d == 0 is 0, not NaN
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


# -- MiB ------------------------------------------------------------------------------------


def test_unce_hand_computed():
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [0.3, 0.1, -0.4, 2.0], [5.0, 1.0, 1.0, 1.0]])
    logits = z.t().reshape(1, 4, 1, 4)  # K = 4, pixels = rows of z
    labels = torch.tensor([[[0, 1, 3, 255]]])
    old = 2

    def lse(v):
        return math.log(sum(math.exp(a) for a in v))

    want = [
        -(lse(z[0, :2].tolist()) - lse(z[0].tolist())),  # label 0 -> bg or old
        -(lse(z[1, :2].tolist()) - lse(z[1].tolist())),  # label 1 < O -> bg or old
        -(z[2, 3].item() - lse(z[2].tolist())),  # label 3, new
    ]
    got = unbiased_cross_entropy(logits, labels, old)
    assert math.isclose(float(got), sum(want) / 4, rel_tol=1e-5)  # as released: / all 4 pixels
    got = unbiased_cross_entropy(logits, labels, old, mean_over="valid")
    assert math.isclose(float(got), sum(want) / 3, rel_tol=1e-5)


def test_unce_averages_over_all_pixels_as_released():
    """MiB/PLOP/LSKD's release: nll_loss(reduction='none') gives 0 at ignored pixels, then .mean()
    over ALL N*H*W pixels (LSKD train.py:46, 52-53, 400, 412; utils/loss.py:166)."""
    # N = 2 images of 1 x 3 pixels, K = 3 (O = 2: bg + one old class, one new class 2)
    z = torch.tensor(
        [[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [3.0, 3.0, 3.0]], [[2.0, -1.0, 0.0], [0.5, 0.5, 0.5], [-2.0, 4.0, 1.0]]]
    )  # [N, pixels, K]
    logits = z.permute(0, 2, 1).reshape(2, 3, 1, 3)
    labels = torch.tensor([[[0, 255, 2]], [[255, 1, 255]]])

    def nll(v: torch.Tensor, y: int) -> float:
        lse = math.log(sum(math.exp(a) for a in v.tolist()))
        top = math.log(math.exp(v[0]) + math.exp(v[1])) if y < 2 else v[2].item()  # bg = bg OR old
        return lse - top

    # valid pixels: (0, 0) label 0, (0, 2) label 2, (1, 1) label 1 -> bg; the three 255 count as 0
    total = nll(z[0, 0], 0) + nll(z[0, 2], 2) + nll(z[1, 1], 1)
    assert float(unbiased_cross_entropy(logits, labels, 2)) == pytest.approx(total / 6, rel=1e-6)
    assert float(unbiased_cross_entropy(logits, labels, 2, mean_over="valid")) == pytest.approx(total / 3, rel=1e-6)
    assert float(unbiased_cross_entropy(logits, torch.full_like(labels, 255), 2)) == 0.0
    with pytest.raises(ValueError, match="mean_over"):
        unbiased_cross_entropy(logits, labels, 2, mean_over="pixels")
    assert MiB().mean_over == "all" and MiB(mean_over="valid").mean_over == "valid"


def test_unkd_hand_computed():
    s = torch.tensor([[0.5, 1.0, -0.3], [2.0, -1.0, 0.7]])  # pixels x K=3
    t = torch.tensor([[1.0, 0.0], [-0.5, 0.4]])  # pixels x O=2
    student = s.t().reshape(1, 3, 1, 2)
    teacher = t.t().reshape(1, 2, 1, 2)
    total = 0.0
    for i in range(2):
        lse = math.log(sum(math.exp(v) for v in s[i].tolist()))
        p = torch.softmax(t[i], 0).tolist()
        log_bg = math.log(math.exp(s[i, 0]) + math.exp(s[i, 2])) - lse
        log_1 = s[i, 1].item() - lse
        total += (p[0] * log_bg + p[1] * log_1) / 2
    got = unbiased_kd(student, teacher)
    assert math.isclose(float(got), -total / 2, rel_tol=1e-5)
    assert torch.isclose(unbiased_kd(student, teacher, mask=torch.zeros(1, 1, 2)), torch.tensor(0.0))


def test_mib_terms_use_factor(nets):
    teacher, student = nets
    images, labels = _batch()
    a = _run(MiB(kd_factor=1.0), teacher, student.eval(), images, labels)
    b = _run(MiB(), teacher, student.eval(), images, labels)
    student.train()
    torch.testing.assert_close(b["unkd"], 10 * a["unkd"])


# -- PLOP -----------------------------------------------------------------------------------


def test_pseudo_labels_hand_made():
    # O = 3; 4 pixels in a row: confident class 1, confident class 2 but above its threshold,
    # uncertain (uniform) pixel, and a new-class pixel; plus one ignored pixel.
    big = 20.0
    pix = [[0.0, big, 0.0], [0.0, 0.0, 8.0], [0.0, 0.0, 0.0], [big, 0.0, 0.0], [0.0, big, 0.0]]
    logits = torch.tensor(pix).t().reshape(1, 3, 1, 5)
    labels = torch.tensor([[[0, 0, 0, 4, 255]]])
    ent = normalized_entropy(logits)[0, 0]
    assert ent[2] == pytest.approx(1.0, abs=1e-6) and ent[0] < 1e-6
    thresholds = torch.tensor([0.5, 0.5, float(ent[1]) / 2])  # class 2 pixel is not confident enough
    targets, factor = pseudo_label(labels, logits, thresholds, old_classes=3)
    assert targets.tolist() == [[[1, 255, 255, 4, 255]]]
    assert factor.tolist() == pytest.approx([1 / 3], rel=1e-5)  # 1 accepted of 3 background pixels


def test_histogram_median():
    hist = torch.tensor([[0, 4, 4, 0], [0, 0, 0, 0], [2, 0, 0, 2], [1, 0, 0, 0]])
    med = histogram_median(hist)
    assert med.tolist() == pytest.approx([0.5, 0.0, 0.25, 0.125])


def test_released_histogram_threshold_hand_made():
    """The release's find_median adds the bin INDEX to its running sum (not the bin's count)."""
    hist = torch.tensor(
        [
            [3, 1, 2, 4],  # total 10, half 5; running sums (indices) 0, 0, 1, 3 -> breaks at bin 3
            # (5 <= 3 + 4): 0.75 + (5 - 3) / 4 * 0.25 = 0.875; exact median 0.625
            [5, 5, 5, 0],  # half 7.5 never <= sum + count -> loop ends at bin 3 (count 0), running sum
            # 0+1+2+3 = 6: 0.75 + (7.5 - 6) / 0 * 0.25 = inf (every pixel accepted); median 0.375
            [0, 0, 0, 1],  # half 0.5 < running sum from bin 2 on -> ends with sum 6: 0.75 + (0.5 - 6) / 1 * 0.25
            # = -0.625 (below any floor); median 0.875
            [4, 0, 0, 0],  # half 2 <= 0 + 4 at bin 0: 0 + 2 / 4 * 0.25 = 0.125 = the median
            [0, 0, 0, 0],  # no count: 0
        ]
    )
    got = released_histogram_threshold(hist)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert got.tolist() == [0.875, math.inf, -0.625, 0.125, 0.0]
    assert histogram_median(hist).tolist() == pytest.approx([0.625, 0.375, 0.875, 0.125, 0.0])
    # 100 bins (the release's count): 28/100*100 == 28.000000000000004 is added at bin 28, and at
    # i = 29 the release reads bin int(0.29 * 100) = 28 again. Counts: 10 in bin 28, 810 in bin 99;
    # half = 410. Bins 0..27 are empty (sums 0..351 + 0 < 410); at bin 28: 410 <= 378 + 10? no;
    # at i = 29: 410 >= 406 and 410 <= 406 + hist[28] = 416 -> 0.29 + (410 - 406) / 10 * 0.01 = 0.294.
    h = torch.zeros(1, 100, dtype=torch.long)
    h[0, 28], h[0, 99] = 10, 810
    assert released_histogram_threshold(h).item() == pytest.approx(0.294, abs=1e-6)
    assert histogram_median(h).item() == pytest.approx(0.99 + 400 / 810 * 0.01, abs=1e-6)


def _released_walk(row: torch.Tensor) -> float:
    """The released find_median walk on one histogram row, one bin at a time, with its dtypes
    (Python float running sum, int64 counts, float32 half)."""
    bins, total = row.numel(), row.sum()
    if total <= 0:
        return 0.0
    half, run = total / 2, 0.0
    for i in range(bins):
        border = i / bins
        b = int(border * bins)
        if half >= run and half <= run + row[b]:
            break
        run += border * bins
    return float(border + ((half - run) / row[b]) * (1 / bins))


def test_released_histogram_threshold_equals_the_released_walk():
    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        bins = (4, 20, 100, 1000)[trial % 4]
        hist = torch.randint(0, 50, (3, bins), generator=g)
        if trial % 3 == 1:  # sparse, large counts (most rows run to the end)
            hist = hist * (torch.rand(3, bins, generator=g) < 0.1) * 2000
        elif trial % 3 == 2:  # a few heavy bins (most rows stop early)
            hist = (hist >= 47) * torch.randint(1, 10**7, (3, bins), generator=g)
        got = released_histogram_threshold(hist).tolist()
        want = [_released_walk(row) for row in hist]
        assert got == pytest.approx(want, rel=0, abs=0, nan_ok=True), (trial, got, want)


def test_pseudo_threshold_option(nets):
    teacher, _ = nets
    data = [_batch(2, seed=s) for s in range(2)]
    released = EntropyPseudoLabeler(pseudo_threshold="released")
    assert released.bins == 100  # the release's entropy histogram
    released.prepare(teacher, data, OLD)
    want = released_histogram_threshold(released.histogram).clamp(min=0.001)
    torch.testing.assert_close(released.thresholds, want, equal_nan=True)
    median = EntropyPseudoLabeler()
    assert median.bins == 1000 and median.pseudo_threshold == "median"
    assert PLOP(pseudo_threshold="released").labeler.pseudo_threshold == "released"
    assert PLOP().labeler.pseudo_threshold == "median"
    with pytest.raises(ValueError, match="pseudo_threshold"):
        EntropyPseudoLabeler(pseudo_threshold="mean")


def test_statistics_hooks_default():
    for method in (Finetune(), MiB()):
        assert method.reset_statistics() is None and method.step_statistics() == {}


def test_plop_step_statistics(nets):
    """pseudo_accepted = accepted / eligible background pixels over the step; adaptive_factor =
    mean over images of PLOP's per-image factor; reset_statistics clears them."""
    teacher, student = nets
    method = PLOP()
    assert method.step_statistics() == {}
    data = [_batch(2, seed=s) for s in range(3)]
    method.prepare_step(teacher, data, CTX)  # median thresholds: about half of each class accepted
    method.reset_statistics()
    accepted = eligible = 0
    factors = []
    with torch.no_grad():
        for images, labels in data:
            terms = _run(method, teacher, student, images, labels)
            assert torch.isfinite(terms["ce"])
            targets, factor = pseudo_label(labels, teacher(images).logits, method.thresholds, OLD)
            bg = labels < OLD  # label 0 of the step's labels (pixels eligible for pseudo-labels)
            accepted += int((bg & (targets != 255)).sum())
            eligible += int(bg.sum())
            factors += factor.tolist()
    stats = method.step_statistics()
    assert set(stats) == {"pseudo_accepted", "adaptive_factor"}
    assert 0 < accepted < eligible
    assert stats["pseudo_accepted"] == pytest.approx(accepted / eligible, rel=1e-6)
    assert stats["adaptive_factor"] == pytest.approx(sum(factors) / len(factors), rel=1e-6)
    assert all(0.0 <= v <= 1.0 for v in stats.values())
    method.reset_statistics()
    assert method.step_statistics() == {}


def test_plop_thresholds_match_exact_median(nets):
    teacher, _ = nets
    method = PLOP(bins=1000)
    data = [_batch(2, seed=s) for s in range(2)]
    method.prepare_step(teacher, data, CTX)
    with torch.no_grad():
        ents, preds = [], []
        for images, labels in data:
            logits = torch.nn.functional.interpolate(teacher(images).logits, size=labels.shape[-2:], mode="bilinear")
            bg = labels < OLD
            ents.append(normalized_entropy(logits)[bg])
            preds.append(logits.argmax(1)[bg])
        ent, pred = torch.cat(ents), torch.cat(preds)
    for c in range(OLD):
        if (pred == c).sum() < 50:
            continue
        exact = ent[pred == c].quantile(0.5)
        assert abs(float(method.thresholds[c]) - max(float(exact), 0.001)) < 2e-3, c


def test_plop_needs_prepare(nets):
    teacher, student = nets
    images, labels = _batch()
    with pytest.raises(RuntimeError, match="prepare_step"):
        _run(PLOP(), teacher, student, images, labels)


def test_plop_pod_factors(nets):
    teacher, student = nets
    images, labels = _batch()
    student.eval()
    plain = PLOP(pod_schedule=False, average_over_maps=False)
    full = PLOP()
    for m in (plain, full):
        m.prepare_step(teacher, [(images, labels)], CTX)
    a = _run(plain, teacher, student, images, labels)
    b = _run(full, teacher, student, images, labels)
    student.train()
    scale = math.sqrt((OLD + NEW) / NEW) / 6
    for i in range(6):
        torch.testing.assert_close(b[f"pod{i}"], a[f"pod{i}"] * scale)


def test_collapse_new_into_background():
    x = torch.randn(2, 5, 3, 3)
    y = collapse_new_into_background(x, 3)
    torch.testing.assert_close(y[:, 0], x[:, 0] + x[:, 3] + x[:, 4])
    torch.testing.assert_close(y[:, 1:], x[:, 1:3])


# -- LSKD -----------------------------------------------------------------------------------


def test_erase_images():
    images, labels = _batch()
    bg, new = erase_images(images, labels, OLD)
    old_px = (labels < OLD)[:, None].expand_as(images)
    new_px = ((labels >= OLD) & (labels != 255))[:, None].expand_as(images)
    assert (bg[old_px] == 0).all() and torch.equal(bg[~old_px], images[~old_px])
    assert (new[new_px] == 0).all() and torch.equal(new[~new_px], images[~new_px])
    ignored = (labels == 255)[:, None].expand_as(images)
    assert torch.equal(bg[ignored], images[ignored]) and torch.equal(new[ignored], images[ignored])


def test_lskd_masks_one_3n_pass_equal_three_passes(nets):
    teacher, _ = nets
    images, labels = _batch(3, seed=5)
    method = LSKD()
    fused = teacher_triplet(teacher, images, labels, OLD, fused=True)
    separate = teacher_triplet(teacher, images, labels, OLD, fused=False)
    for a, b in zip(fused, separate):
        for ma, mb in zip(a.maps, b.maps):
            torch.testing.assert_close(ma, mb, atol=1e-5, rtol=1e-5)
    assert method.masked_maps() == [2, 3, 4, 5]
    for m in method.masked_maps():
        sa, ca = method.masks(m, fused[0], fused[1:], labels, OLD)
        sb, cb = method.masks(m, separate[0], separate[1:], labels, OLD)
        assert torch.equal(sa, sb), m
        assert (ca is None) == (cb is None) == (m == 5)
        if ca is not None:
            assert torch.equal(ca, cb), m
        assert sa.dtype == torch.bool and sa.shape == (3, 1, *fused[0].maps[m].shape[-2:])
    # teacher_forward hands the erased outputs on (erased by the pseudo-labels: thresholds first)
    method.prepare_step(teacher, [(images, labels)], CTX)
    t_out, bctx = method.teacher_forward(teacher, images, labels, CTX)
    assert bctx.teacher_erased is not None and CTX.teacher_erased is None
    torch.testing.assert_close(t_out.logits, fused[0].logits, atol=1e-5, rtol=1e-5)


def test_lskd_run_teacher_path(nets):
    teacher, student = nets
    images, labels = _batch()
    method = LSKD()
    method.prepare_step(teacher, [(images, labels)], CTX)
    student.eval()
    a = _run(method, teacher, student, images, labels)
    with torch.no_grad():
        t_out = teacher(images)
        b = method.terms(images, labels, student(images), t_out, CTX.replace(run_teacher=teacher))
    student.train()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="erased"):
        method.terms(images, labels, student(images), t_out, CTX)


def test_lskd_schemes_are_data(nets):
    teacher, student = nets
    images, labels = _batch()
    assert RELEASED_SCHEMES == {0: "pod", 1: "pod", 2: "md", 3: "md", 4: "md+mcd", 5: "md"}
    method = LSKD(schemes={0: "md+mcd", 1: "none", 2: "pod", 3: "md", 4: "none", 5: "pod"})
    method.prepare_step(teacher, [(images, labels)], CTX)
    terms = _run(method, teacher, student, images, labels)
    assert list(terms) == ["ce", "mcd0", "unkd", "md0", "pod2", "md3", "pod5"] == method.term_names(CTX)
    assert all(torch.isfinite(v) for v in terms.values())
    only_pod = LSKD(schemes={i: "pod" for i in range(6)})
    t_out, bctx = only_pod.teacher_forward(teacher, images, labels, CTX)
    assert bctx.teacher_erased is None  # no masks needed: one teacher pass


def test_lskd_factors(nets):
    teacher, student = nets
    images, labels = _batch()
    student.eval()
    m = LSKD()
    m.prepare_step(teacher, [(images, labels)], CTX)
    t = _run(m, teacher, student, images, labels)
    one = LSKD(map_factors={i: 1.0 for i in range(6)}, mcd_factor=1.0, unkd_factor=1.0)
    one.labeler = m.labeler
    u = _run(one, teacher, student, images, labels)
    student.train()
    want = {
        "mcd": 0.005,
        "unkd": 10.0,
        "pod0": 0.01,
        "pod1": 0.01,
        "md2": 0.01,
        "md3": 0.01,
        "md4": 0.01,
        "md5": 0.0005,
    }
    for k, f in want.items():
        torch.testing.assert_close(t[k], f * u[k], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t["ce"], u["ce"])


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_reduces_loss(name):
    teacher = _teacher(2)
    student = _student(teacher)
    method = build_method(name)
    images, labels = _batch(seed=7)
    method.prepare_step(teacher, [(images, labels)], CTX)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        terms = _run(method, teacher, student, images, labels)
        loss = sum(terms.values())
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses


def test_logits_map_dtypes_match_under_autocast_like_mixing():
    """Under CUDA autocast the new-class sum of the collapse runs in float32 while the teacher's
    logits are bfloat16/float16: the collapse keeps the logits' dtype and the teacher map is
    brought to the student's, so the distillation ops get one dtype (found on an H100)."""
    from lskd.methods.base import collapse_new_into_background, teacher_like

    logits = torch.randn(2, 6, 4, 4, dtype=torch.bfloat16)
    collapsed = collapse_new_into_background(logits, 4)
    assert collapsed.dtype == torch.bfloat16 and collapsed.shape == (2, 4, 4, 4)
    expected = torch.cat(
        [logits[:, :1].float() + logits[:, 4:].float().sum(1, keepdim=True), logits[:, 1:4].float()], 1
    )
    torch.testing.assert_close(collapsed.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 roundings
    student = torch.randn(2, 4, 4, 4)
    teacher = torch.randn(2, 4, 4, 4, dtype=torch.float16)
    assert teacher_like(teacher, student).dtype == torch.float32
    assert teacher_like(student, student) is student
    from lskd import pod_distill

    d = pod_distill(student, teacher_like(teacher, student))
    assert torch.isfinite(d)
