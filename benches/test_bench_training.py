"""Cost per training iteration of the dynamic weights (RGE, GradNorm) and of the bi-level
search against fixed weights, on whole LSKD steps (pytest-benchmark, one round each).

Every variant trains step 1 of task 2-2 of a synthetic dataset from the same step-0 checkpoint
with ``lskd train`` settings (``init_from``), so that the measured time is the real loop:
teacher passes, MD masks, fused losses, the weighting's per-term gradients, the search's
held-out forward/backward and finite-difference forwards, the optimiser. extra_info holds the
seconds per iteration from the run's history (the first epoch is a warm-up and left out, except
for the search, whose first epoch IS the search: its iterations are reported apart).

Sizes (env): LSKD_TRAIN_BENCH_BACKBONE (tiny on the CPU, resnet50 on a GPU),
LSKD_TRAIN_BENCH_SIZE (64 / 256), LSKD_TRAIN_BENCH_BATCH (16 / 12), LSKD_TRAIN_BENCH_IMAGES (192).

    pytest benches/test_bench_training.py --benchmark-only --benchmark-json=train.json
    python benches/summarize.py train.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import lskd_workload as wl  # noqa: E402

GPU = wl.on_gpu()
BACKBONE = os.environ.get("LSKD_TRAIN_BENCH_BACKBONE", "resnet50" if GPU else "tiny")
SIZE = int(os.environ.get("LSKD_TRAIN_BENCH_SIZE", "256" if GPU else "64"))
BATCH = int(os.environ.get("LSKD_TRAIN_BENCH_BATCH", "12" if GPU else "16"))
IMAGES = int(os.environ.get("LSKD_TRAIN_BENCH_IMAGES", "192"))
EPOCHS = 3

VARIANTS = {
    "fixed": {},
    "rge": dict(weighting="rge"),
    "gradnorm": dict(weighting="gradnorm"),
    "search-order1": dict(search="bilevel", search_epochs=2),
    "search-order2": dict(search="bilevel", search_epochs=2, search_order=2),
}


def _config(data, out, **kw):
    from lskd.train import TrainConfig

    base = dict(
        dataset="folder",
        data_root=str(data),
        task="2-2",
        method="lskd",
        out=str(out),
        backbone=BACKBONE,
        output_stride=16 if GPU else 8,
        epochs=1,
        epochs_next=EPOCHS,
        batch_size=BATCH,
        crop=SIZE,
        eval_size=SIZE,
        workers=2 if GPU else 0,
        quiet=True,
        device=str(wl.device()),
        lr=0.01,
        lr_next=0.01,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    from lskd.data import make_synthetic
    from lskd.train import train

    root = tmp_path_factory.mktemp("train_bench")
    make_synthetic(root / "data", classes=4, images=IMAGES, val_images=8, size=SIZE, seed=0)
    train(_config(root / "data", root / "base", method="finetune", step=0))
    return root, root / "base" / "checkpoints" / "step0.pt"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_iteration(benchmark, device_info, step0, variant):
    from lskd.train import train

    root, ckpt = step0
    out = root / f"{variant}-{time.time_ns()}"
    cfg = _config(root / "data", out, init_from=str(ckpt), **VARIANTS[variant])
    benchmark.pedantic(lambda: train(cfg), rounds=1, iterations=1)
    history = [h for h in json.loads((out / "history.json").read_text()) if h["step"] == 1]
    searched = VARIANTS[variant].get("search_epochs", 0)
    per_iter = lambda hs: sum(h["time_s"] for h in hs) / max(1, sum(h["iterations"] for h in hs))  # noqa: E731
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(
        kind="training",
        variant=variant,
        backbone=BACKBONE,
        size=SIZE,
        batch=BATCH,
        iterations=sum(h["iterations"] for h in history),
        s_per_iter=per_iter(history[max(1, searched) :]),
        s_per_iter_search=per_iter(history[1:searched]) if searched > 1 else None,
    )
