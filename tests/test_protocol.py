"""The training protocol's options: the student's BatchNorm in steps > 0 (--bn), the pseudo-label
threshold rule (--pseudo-threshold), and what each step reports (pseudo-label statistics, the
BatchNorm gap at the first batch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lskd.data import make_synthetic
from lskd.models import DeepLabV3
from lskd.train import RunError, TrainConfig, train
from lskd.train.trainer import Trainer


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("protocol") / "data"
    make_synthetic(root, classes=4, images=24, val_images=8, size=32, seed=3)
    return root


def _cfg(data: Path, out: Path, method: str = "plop", **kw) -> TrainConfig:
    base = dict(
        dataset="folder",
        data_root=str(data),
        task="2-1",
        method=method,
        out=str(out),
        backbone="tiny",
        epochs=1,
        batch_size=8,
        crop=32,
        workers=0,
        quiet=True,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_freeze_batchnorm_keeps_running_statistics():
    torch.manual_seed(0)
    model = DeepLabV3("tiny", [3])
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.freeze_batchnorm().train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns) and all(not p.requires_grad for m in bns for p in m.parameters())
    assert model.backbone.training  # the rest trains
    model(torch.randn(2, 3, 32, 32))
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_frozen_steps_keep_the_teachers_statistics(synth, tmp_path):
    """--bn frozen: in step 1 the student's running statistics stay those of step 0's model."""
    from lskd.train import load_checkpoint

    out = tmp_path / "frozen"
    train(_cfg(synth, out, bn="frozen", step=0))
    train(_cfg(synth, out, bn="frozen", step=1))
    s0 = load_checkpoint(out / "checkpoints" / "step0.pt")["model"]
    s1 = load_checkpoint(out / "checkpoints" / "step1.pt")["model"]
    stats = [k for k in s0 if "running_mean" in k or "running_var" in k or (k.endswith(".weight") and "bn" in k)]
    assert stats and all(torch.equal(s0[k], s1[k]) for k in stats)
    with pytest.raises(RunError, match="--bn"):
        train(_cfg(synth, out, bn="train", step=2))  # a run keeps its BatchNorm mode


def test_bn_frozen_with_rge_trains(synth, tmp_path):
    """--bn frozen with RGE: the head terms' layer (the ASPP BatchNorm weight) does not train, so
    RGE takes the gradients at the projection conv feeding it (the release fails here)."""
    from lskd.weighting import deeplab_layers

    out = tmp_path / "frozen-rge"
    s = train(_cfg(synth, out, method="lskd", bn="frozen", weighting="rge", step=None, epochs=1))
    assert s["steps"][-1]["weights"] and len(set(s["steps"][-1]["weights"].values())) > 1  # RGE moved them
    model = DeepLabV3("tiny", [3]).freeze_batchnorm()
    layers = deeplab_layers(model)
    assert layers["aspp"] is model.aspp.project[0].weight and all(t.requires_grad for t in layers.values())
    trained_bn = DeepLabV3("tiny", [3])
    assert deeplab_layers(trained_bn)["aspp"] is trained_bn.aspp.project[1].weight  # as released


def test_bad_protocol_options_are_refused(synth, tmp_path):
    with pytest.raises(RunError, match="--bn"):
        _cfg(synth, tmp_path, bn="eval")
    with pytest.raises(RunError, match="--pseudo-threshold"):
        _cfg(synth, tmp_path, pseudo_threshold="mean")


@pytest.mark.parametrize("method", ["plop", "lskd"])
def test_pseudo_threshold_reaches_the_method(synth, tmp_path, method):
    trainer = Trainer(_cfg(synth, tmp_path / method, method=method, pseudo_threshold="released"))
    assert trainer.method.labeler.pseudo_threshold == "released"


def test_steps_report_pseudo_labels_and_bn_gap(synth, tmp_path):
    out = tmp_path / "lskd"
    s = train(_cfg(synth, out, method="lskd", epochs=2))
    assert "pseudo_labels" not in s["steps"][0] and "bn_gap" not in s["steps"][0]
    history = json.loads((out / "history.json").read_text())
    for e in s["steps"][1:]:
        stats = e["pseudo_labels"]
        assert 0.0 <= stats["pseudo_accepted"] <= 1.0 and 0.0 <= stats["adaptive_factor"] <= 1.0
        epochs = [h["pseudo_labels"] for h in history if h["step"] == e["step"]]
        assert len(epochs) == 2
        assert stats["pseudo_accepted"] == pytest.approx(sum(p["pseudo_accepted"] for p in epochs) / 2)
        gap = e["bn_gap"]
        assert set(gap) == {"train", "eval"} and set(gap["train"]) == set(e["losses"])
        # the student starts as the teacher: in eval mode the feature terms of the maps are exactly 0
        assert all(v == 0.0 for k, v in gap["eval"].items() if k.startswith("pod"))
        assert any(v > 0.0 for k, v in gap["train"].items() if k.startswith(("pod", "md")))
    log = (out / "train.log").read_text()
    assert "student BatchNorm train/eval" in log and "pseudo_accepted" in log


def test_aggregate_seeds_mean_and_sample_std():
    from lskd.demo import aggregate_seeds

    def summary(old, new):
        return {
            "steps": [
                {"step": 0, "miou_old": 50.0, "miou_new": None, "miou_all": 50.0},
                {"step": 1, "miou_old": old, "miou_new": new, "miou_all": (old + new) / 2},
            ]
        }

    agg = aggregate_seeds(
        {0: {"mib": summary(10.0, 20.0)}, 1: {"mib": summary(14.0, 20.0)}, 2: {"mib": summary(12.0, 26.0)}}
    )
    last = agg["mib"][-1]
    assert last["step"] == 1 and last["miou_old"] == {"mean": 12.0, "std": 2.0, "n": 3}
    assert last["miou_new"]["mean"] == 22.0 and last["miou_new"]["std"] == pytest.approx(12.0**0.5)
    assert agg["mib"][0]["miou_new"] is None and agg["mib"][0]["miou_old"]["std"] == 0.0
    # a seed without a method: that method's statistics cover the seeds that ran it
    partial = aggregate_seeds(
        {0: {"mib": summary(10.0, 20.0), "plop": summary(30.0, 2.0)}, 1: {"mib": summary(14.0, 20.0)}}
    )
    assert partial["plop"][-1]["miou_old"] == {"mean": 30.0, "std": 0.0, "n": 1}
    assert partial["mib"][-1]["miou_old"]["n"] == 2


def test_demo_with_seeds(tmp_path, monkeypatch):
    """`lskd demo --seeds 2` on a tiny preset: every method per seed, mean ± std in summary.json and
    summary.md, the seeds' runs in OUT/seed<k>."""
    import lskd.demo as demo
    from lskd.cli import main

    tiny = dict(
        data=dict(classes=4, images=24, val_images=8, size=32, max_objects=2),
        task="2-1",
        train=dict(
            backbone="tiny", output_stride=8, epochs=1, epochs_next=1, batch_size=8, crop=32, lr=0.1, lr_next=0.01
        ),
    )
    monkeypatch.setitem(demo.PRESETS, "quick", tiny)
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--quick",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--seeds",
                "2",
                "--seed",
                "4",
                "--methods",
                "joint,finetune,mib",
                "--bn",
                "frozen",
                "--quiet",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["settings"]["bn"] == "frozen"
    assert json.loads((out / "seed4" / "mib" / "config.json").read_text())["config"]["bn"] == "frozen"
    learnt = s["learnt_class_iou"]
    assert set(learnt) == {"joint", "finetune", "mib"} and set(learnt["mib"]) == {"1", "2"}
    assert learnt["finetune"]["1"]["n"] == 2
    assert set(s["seeds"]) == {"4", "5"} and s["settings"]["seeds"] == [4, 5]
    assert s["seeds"]["4"]["mib"]["steps"] != s["seeds"]["5"]["mib"]["steps"]
    assert s["aggregate"]["mib"][-1]["miou_old"]["n"] == 2
    assert (out / "seed4" / "mib" / "summary.json").is_file() and (out / "seed5" / "base").is_dir()
    assert "±" in (out / "summary.md").read_text()


def test_learnt_class_iou_reads_each_step_right_after_it():
    """The IoU of step t's classes: right after step t for an incremental method (not at the last
    step), after the one offline step for joint; mean and sample std over the seeds."""
    from lskd.demo import learnt_class_iou

    def inc(a, b):
        return {
            "steps": [
                {"step": 0, "classes": ["bg", "x"], "iou": {"bg": 90.0, "x": 80.0}},
                {"step": 1, "classes": ["y"], "iou": {"bg": 85.0, "x": 60.0, "y": a}},
                {"step": 2, "classes": ["z"], "iou": {"bg": 85.0, "x": 50.0, "y": 0.0, "z": b}},
            ]
        }

    joint = {"offline": True, "steps": [{"step": 0, "classes": [], "iou": {"bg": 90.0, "x": 80, "y": 70.0, "z": 50.0}}]}
    runs = {0: {"joint": joint, "finetune": inc(40.0, 20.0)}, 1: {"joint": joint, "finetune": inc(50.0, 30.0)}}
    t = learnt_class_iou(runs)
    assert t["finetune"][1]["mean"] == 45.0 and t["finetune"][2]["mean"] == 25.0
    assert t["finetune"][1]["std"] == pytest.approx(50.0**0.5)
    assert t["joint"][1] == {"mean": 70.0, "std": 0.0, "n": 2} and t["joint"][2]["mean"] == 50.0


def test_demo_quick_and_full_exclude_each_other(tmp_path):
    from lskd.demo import run_demo

    with pytest.raises(ValueError, match="--quick and --full"):
        run_demo(out=str(tmp_path), quick=True, full=True)
    with pytest.raises(ValueError, match="--bn"):
        run_demo(out=str(tmp_path), bn="eval")
