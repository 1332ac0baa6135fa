"""Training layer: metrics against hand-computed confusion matrices, batching, weighting,
checkpoints, one short end-to-end run of every method, the shared step 0, and a 2-process DDP run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lskd.data import eval_lut, make_synthetic, parse_task
from lskd.train import (
    CheckpointMismatch,
    FixedWeights,
    RunError,
    TrainConfig,
    atomic_save,
    confusion_matrix,
    epoch_batches,
    evaluate_run,
    iou_per_class,
    load_checkpoint,
    mean_iou,
    parse_weights,
    reduce_confusion,
    rng_state,
    set_rng_state,
    step_metrics,
    train,
)
from lskd.train.checkpoint import check_identity
from lskd.train.config import FREE_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"dataset", "task", "method", "steps"}
STEP_KEYS = {"step", "classes", "miou_old", "miou_new", "miou_all", "iou"}


# -- metrics ------------------------------------------------------------------------------------


def test_confusion_matrix_hand_computed():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    want = torch.tensor([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert torch.equal(cm, want)
    iou = iou_per_class(cm)
    # IoU_c = tp / (row + col - tp): 0 -> 1/(2+3-1), 1 -> 2/(3+3-2), 2 -> 1/(2+1-1)
    torch.testing.assert_close(iou, torch.tensor([0.25, 0.5, 0.5], dtype=torch.float64))
    assert math.isclose(mean_iou(iou, [0, 1, 2]), (0.25 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]), 3)


def test_step_metrics_old_new_all_and_undefined_classes():
    """Task 2-1 on 5 ids: after step 1 the class of step 2 is ignored (eval_lut); class 2 has no
    ground truth and no prediction -> undefined, left out of the means."""
    task = parse_task("2-1", 5)
    assert task.steps == [[0, 1, 2], [3], [4]]
    raw = torch.tensor([[0, 0, 1, 1, 3, 3, 4, 4]])
    labels = eval_lut(task, 1)[raw]
    assert labels.tolist() == [[0, 0, 1, 1, 3, 3, 255, 255]]
    pred = torch.tensor([[0, 3, 1, 1, 3, 0, 3, 1]])
    cm = confusion_matrix(pred, labels, 5)
    m = step_metrics(cm, 1, task.steps[0], task.classes_until(1), ["bg", "a", "b", "c", "d"], task.steps[1])
    # bg: tp 1, row 2, col 2 -> 1/3; a: tp 2, row 2, col 2 -> 1; b: undefined; c: tp 1, row 2, col 2 -> 1/3
    assert m.iou["b"] is None
    assert math.isclose(m.iou["bg"], 100 / 3) and math.isclose(m.iou["a"], 100.0) and math.isclose(m.iou["c"], 100 / 3)
    assert math.isclose(m.miou_old, 100 * (1 / 3 + 1) / 2)
    assert math.isclose(m.miou_new, 100 / 3)
    assert math.isclose(m.miou_all, 100 * (1 / 3 + 1 + 1 / 3) / 3)
    assert m.classes == ["c"] and set(m.iou) == {"bg", "a", "b", "c"}
    d = m.to_dict()
    assert set(d) == STEP_KEYS
    m0 = step_metrics(cm, 0, task.steps[0], task.classes_until(0), ["bg", "a", "b", "c", "d"], task.steps[0])
    assert m0.miou_new is None and m0.miou_old == m0.miou_all
    assert reduce_confusion(cm) is cm  # no process group: unchanged


# -- batching, weighting, checkpoints ---------------------------------------------------------


def test_epoch_batches_seeded_and_sharded():
    a = epoch_batches(10, 3, seed=1, step=1, epoch=2)
    assert a == epoch_batches(10, 3, seed=1, step=1, epoch=2)
    assert a != epoch_batches(10, 3, seed=1, step=1, epoch=3)
    assert [len(b) for b in a] == [3, 3, 3]  # the incomplete last batch is dropped
    assert epoch_batches(2, 8, 0, 0, 0) != [] and len(epoch_batches(2, 8, 0, 0, 0)[0]) == 2  # the only batch is kept
    shards = [epoch_batches(11, 2, 0, 0, 0, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == 12 and set(flat) == set(range(11))  # 11 padded to 12 by wrapping, as DistributedSampler


def test_fixed_weights_total_in_one_place():
    terms = {"ce": torch.tensor(2.0), "unkd": torch.tensor(3.0), "pod0": torch.tensor(5.0)}
    w = FixedWeights({"unkd": 0.5})
    w.begin_step(list(terms))
    assert w.weights() == {"ce": 1.0, "unkd": 0.5, "pod0": 1.0}
    assert float(w.total(terms)) == pytest.approx(2 + 1.5 + 5)
    w2 = FixedWeights()
    w2.load_state_dict(w.state_dict())
    assert w2.weight("unkd") == 0.5
    assert parse_weights("unkd=0.5, pod0=2") == {"unkd": 0.5, "pod0": 2.0}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_weights("unkd")


def test_checkpoint_atomic_and_rng(tmp_path):
    path = tmp_path / "c" / "x.pt"
    atomic_save({"identity": {"task": "2-1"}, "model": {"w": torch.ones(2)}}, path)
    assert load_checkpoint(path)["model"]["w"].sum() == 2
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(tmp_path / "bad.pt")
    state = rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    with pytest.raises(CheckpointMismatch, match="task: checkpoint has '2-1', this run has '15-1'"):
        check_identity({"task": "2-1"}, {"task": "15-1"}, ["task"], path)


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """4 object classes, 24 training and 8 validation images of 32x32."""
    root = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic(root, classes=4, images=24, val_images=8, size=32, seed=3)
    return root


def _cfg(data: Path, out: Path, method: str, **kw) -> TrainConfig:
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


@pytest.mark.parametrize("method", ["finetune", "mib", "plop", "lskd", "joint"])
def test_end_to_end_each_method(synth, tmp_path, method):
    out = tmp_path / method
    s = train(_cfg(synth, out, method))
    assert SUMMARY_KEYS <= set(s) and s["method"] == method and s["task"] == "2-1"
    steps = s["steps"]
    if method == "joint":
        assert [e["step"] for e in steps] == [2] and s["offline"]
        assert set(steps[0]["iou"]) == set(s["class_names"])
    else:
        assert [e["step"] for e in steps] == [0, 1, 2]
        assert [len(e["iou"]) for e in steps] == [3, 4, 5]
        assert steps[0]["miou_new"] is None and steps[1]["miou_new"] is not None
        assert steps[1]["classes"] == [s["class_names"][3]]
    for e in steps:
        assert STEP_KEYS <= set(e)
        for v in [e["miou_old"], e["miou_all"], *e["iou"].values()]:
            assert v is None or 0.0 <= v <= 100.0
        assert all(math.isfinite(x) for x in e["losses"].values()) and e["losses"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(s))
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,class_id,class,group,iou"
    assert len(rows) - 1 == sum(len(e["iou"]) for e in steps)
    assert (out / "miou.png").stat().st_size > 1000
    assert not list((out / "checkpoints").glob("*-last.pt"))  # epoch checkpoints removed once the step is done
    if method == "mib":  # lskd eval: the same numbers from the checkpoints
        again = evaluate_run(str(out), quiet=True, device="cpu")
        assert [e["iou"] for e in again["steps"]] == [e["iou"] for e in steps]
        assert (out / "eval" / "summary.json").is_file()


def test_shared_step0_and_init_from(synth, tmp_path):
    base = train(_cfg(synth, tmp_path / "base", "finetune", step=0))
    assert [e["step"] for e in base["steps"]] == [0]
    ckpt = tmp_path / "base" / "checkpoints" / "step0.pt"
    s = train(_cfg(synth, tmp_path / "plop", "plop", init_from=str(ckpt)))
    assert [e["step"] for e in s["steps"]] == [0, 1, 2]
    assert s["steps"][0] == base["steps"][0]
    # step 0 of a run from scratch is the same whatever the method
    full = train(_cfg(synth, tmp_path / "mib", "mib", step=0))
    assert full["steps"][0]["iou"] == base["steps"][0]["iou"]
    # --step 1 in the same folder continues from its step 0
    s1 = train(_cfg(synth, tmp_path / "mib", "mib", step=1))
    assert [e["step"] for e in s1["steps"]] == [0, 1]
    # a checkpoint of another task, or of a later step of another method
    with pytest.raises(RunError, match="steps"):
        train(_cfg(synth, tmp_path / "other", "plop", task="1-1", init_from=str(ckpt)))
    assert not (tmp_path / "other" / "summary.json").exists()
    with pytest.raises(RunError, match="only step 0 is shared"):
        train(_cfg(synth, tmp_path / "other2", "plop", init_from=str(tmp_path / "mib" / "checkpoints" / "step1.pt")))
    # an existing run is not overwritten without --resume; --resume with another method is refused
    with pytest.raises(RunError, match="--resume"):
        train(_cfg(synth, tmp_path / "plop", "plop"))
    with pytest.raises(CheckpointMismatch, match="method"):
        train(_cfg(synth, tmp_path / "plop", "lskd", resume=True))
    # resuming a finished run changes nothing
    again = train(_cfg(synth, tmp_path / "plop", "plop", resume=True))
    assert again["steps"] == s["steps"]


def test_ddp_two_processes_gloo(synth, tmp_path):
    """torchrun with 2 CPU ranks (gloo): the run completes with the same summary keys as one
    process with the same global batch. BatchNorm is synchronised over the ranks
    (DistBatchNorm2d; its equality with one process is tested in test_models). Training
    numbers are not compared: each rank draws its augmentation (random resized crops, flips)
    from its own seed, so the ranks see other crops than one process does. Evaluation is
    compared exactly: the 2-rank evaluation of the 1-process checkpoints (confusion matrices
    summed over the ranks) equals the 1-process one."""
    single = train(_cfg(synth, tmp_path / "single", "mib"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lskd"]
    args = [
        "train",
        "--dataset",
        "folder",
        "--data-root",
        str(synth),
        "--task",
        "2-1",
        "--method",
        "mib",
        "--out",
        str(tmp_path / "ddp"),
        "--backbone",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--crop",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    r = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert set(ddp) == set(single)
    assert [set(e) for e in ddp["steps"]] == [set(e) for e in single["steps"]]
    assert [list(e["iou"]) for e in ddp["steps"]] == [list(e["iou"]) for e in single["steps"]]
    r = subprocess.run(
        launcher
        + [
            "eval",
            "--out",
            str(tmp_path / "single"),
            "--device",
            "cpu",
            "--report-dir",
            str(tmp_path / "ev2"),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ev2 = json.loads((tmp_path / "ev2" / "summary.json").read_text())
    assert [e["iou"] for e in ev2["steps"]] == [e["iou"] for e in single["steps"]]


DYNAMIC = {
    "rge": dict(weighting="rge"),
    "gradnorm": dict(weighting="gradnorm"),
    "search-order1": dict(search="bilevel", search_epochs=1),
    "search-order2": dict(search="bilevel", search_epochs=1, search_order=2),
}


@pytest.mark.parametrize("variant", list(DYNAMIC))
def test_end_to_end_dynamic_weights_and_search(synth, tmp_path, variant):
    """--weighting rge/gradnorm and --search bilevel (orders 1 and 2) complete a short run; each
    step reports its final weights and schemes; the weight traces and weights.png are written."""
    from lskd.methods import MAP_NAMES, RELEASED_SCHEMES, SCHEMES

    out = tmp_path / variant
    s = train(_cfg(synth, out, "lskd", epochs=2, batch_size=4, **DYNAMIC[variant]))
    steps = s["steps"]
    assert [e["step"] for e in steps] == [0, 1, 2]
    assert steps[0]["weights"] == {"ce": 1.0} and steps[0]["schemes"] == {}
    for e in steps[1:]:
        assert set(e["schemes"]) == set(MAP_NAMES) and set(e["schemes"].values()) <= set(SCHEMES)
        assert set(e["weights"]) == set(e["losses"])  # the terms trained after the search
        assert all(w > 0 for w in e["weights"].values())
        if variant.startswith("search"):
            # the weight of a chosen scheme's terms is its map's learnt weight (the others 1)
            assert e["weights"]["ce"] == 1.0 and e["weights"]["unkd"] == 1.0
        else:
            assert e["schemes"] == {MAP_NAMES[m]: sc for m, sc in RELEASED_SCHEMES.items()}
            assert sum(e["weights"].values()) == pytest.approx(len(e["weights"]), rel=1e-5)  # renormalised
        trace = json.loads((out / "weights" / f"step{e['step']}.json").read_text())["trace"]
        assert trace and ("probabilities" in trace[0]) == variant.startswith("search")
    assert (out / "weights.png").stat().st_size > 1000
    assert not (out / "weights" / "step0.json").exists()


@pytest.mark.parametrize(
    "variant", [["--weighting", "rge"], ["--search", "bilevel", "--search-order", "2"]], ids=["rge", "search"]
)
def test_ddp_two_processes_gloo_dynamic(synth, tmp_path, variant):
    """torchrun with 2 CPU ranks: RGE (weight gradients averaged over the ranks) and the search
    (scheme-logit and map-weight gradients averaged, SyncBN-free forwards on the plain module)
    complete, and the summary reports weights and schemes as one process does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lskd"]
    args = [
        "train",
        "--dataset",
        "folder",
        "--data-root",
        str(synth),
        "--task",
        "2-2",
        "--method",
        "lskd",
        "--out",
        str(tmp_path / "ddp"),
        "--backbone",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--crop",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
        *variant,
    ]
    r = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    for e in ddp["steps"][1:]:
        assert e["weights"] and e["schemes"] and set(e["weights"]) == set(e["losses"])
    assert json.loads((tmp_path / "ddp" / "weights" / "step1.json").read_text())["trace"]


def test_search_split_checked_before_training(synth, tmp_path):
    """A held-out split that leaves too few training images fails before step 0 is trained,
    naming the step, the counts and the option; nothing claims success."""
    out = tmp_path / "tiny-split"
    with pytest.raises(RunError, match=r"step \d+ has \d+ training images.*--search-split 0.9"):
        train(_cfg(synth, out, "lskd", batch_size=4, search="bilevel", search_split=0.9))
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(synth, tmp_path, amp):
    """--amp bf16 / fp16 (GradScaler) on the CPU: finite losses, a complete summary."""
    s = train(_cfg(synth, tmp_path / amp, "lskd", amp=amp, step=None))
    assert [e["step"] for e in s["steps"]] == [0, 1, 2]
    assert all(math.isfinite(v) for e in s["steps"] for v in e["losses"].values())


def test_memory_format_changes_rounding_only(synth, tmp_path):
    """--memory-format contiguous and channels_last (the default) train the same run up to float
    rounding: the same losses to 1e-4 relative, the same summary keys; either may resume the other."""
    runs = {}
    for fmt in ("contiguous", "channels_last"):
        runs[fmt] = train(_cfg(synth, tmp_path / fmt, "lskd", memory_format=fmt))
    a, b = runs["contiguous"]["steps"], runs["channels_last"]["steps"]
    for x, y in zip(a, b):
        assert x["losses"].keys() == y["losses"].keys()
        for k in x["losses"]:
            assert x["losses"][k] == pytest.approx(y["losses"][k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert "memory_format" in FREE_SETTINGS and "compile" in FREE_SETTINGS


@pytest.mark.compile
def test_compiled_teacher_and_student_train(synth, tmp_path):
    """--compile both (fixed weights): the step runs through torch.compile with the package's ops in
    the graph, finite losses, the same losses as without compile up to float rounding."""
    plain = train(_cfg(synth, tmp_path / "plain", "lskd"))
    compiled = train(_cfg(synth, tmp_path / "compiled", "lskd", compile="both"))
    for x, y in zip(plain["steps"], compiled["steps"]):
        for k in x["losses"]:
            assert y["losses"][k] == pytest.approx(x["losses"][k], rel=1e-3, abs=1e-5), (x["step"], k)


@pytest.mark.parametrize("kw", [dict(weighting="rge"), dict(search="bilevel")])
def test_compiled_student_refuses_per_term_gradients(synth, tmp_path, kw):
    with pytest.raises(RunError, match="--compile both needs --weighting fixed and no --search"):
        _cfg(synth, tmp_path / "x", "lskd", compile="both", **kw)
    _cfg(synth, tmp_path / "y", "lskd", compile="teacher", **kw)  # the teacher alone is fine


@pytest.mark.parametrize("name,value", [("memory_format", "nhwc"), ("compile", "all")])
def test_speed_options_checked(synth, tmp_path, name, value):
    with pytest.raises(RunError, match=f"--{name.replace('_', '-')} must be one of"):
        _cfg(synth, tmp_path / "x", "lskd", **{name: value})


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_gpu_training_runs(synth, tmp_path, amp):
    """LSKD through all steps on the GPU, in float32 and under CUDA autocast (bf16; fp16 with a
    GradScaler): finite losses, a complete summary, and `lskd eval` on the GPU reproducing the
    evaluation of every step."""
    s = train(_cfg(synth, tmp_path / amp, "lskd", amp=amp, device="cuda"))
    assert [e["step"] for e in s["steps"]] == [0, 1, 2]
    assert all(math.isfinite(v) for e in s["steps"] for v in e["losses"].values())
    again = evaluate_run(str(tmp_path / amp), quiet=True, device="cuda")
    # cuDNN may pick other convolution algorithms in a new process: a few pixels may differ.
    for e, f in zip(again["steps"], s["steps"]):
        assert list(e["iou"]) == list(f["iou"])
        assert [x for x in e["iou"].values()] == pytest.approx([x for x in f["iou"].values()], abs=0.5)
