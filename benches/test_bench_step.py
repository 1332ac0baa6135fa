"""One whole training iteration (forward, backward, optimiser step; synchronised on a GPU) per
method, in one process, on the same batch and from the same weights (pytest-benchmark):

=============  ===========================================================================
a-finetune     (a) the student alone: fine-tuning, CE
b-mib          (b) plus one teacher pass: MiB (the package's method)
b-plop         (b) plus one teacher pass: PLOP with the package's ops
plop-eager     PLOP with its POD terms in eager PyTorch (the reference POD)
c-floor        (c) the student's CE plus the one 3N teacher pass LSKD's masks need: LSKD's floor
d-lskd         (d) LSKD with the package's ops, fixed weights
e-lskd-rge     (e) LSKD with the package's ops, :class:`lskd.weighting.RGE`
f-released     (f) LSKD as released: eager terms, per-image torch.quantile masks (host
               synchronisations), four N teacher passes, RGE's one autograd.grad per term
=============  ===========================================================================

(c), (f) and PLOP eager are benches/released_step.py's methods; every variant runs through the
trainer's own iteration (:func:`lskd.train.iteration.train_iteration`, the optimiser of
:class:`lskd.train.step.StepTrainer`), so (b), (d), (e) are the real code path. The step is step 2
of task 2-1: the teacher knows background + 3 classes (O = 4), the student adds 1 class. The
weights are random (the cost of a step does not depend on them); the labels have one square of
the new class per image with a 255 border, the rest background.

extra_info: ``ms_per_iter`` (median over the rounds, warm-up rounds left out), ``x_floor`` and
``x_released`` (ms over (c)'s and (f)'s of the same dtype; filled in as they finish), ``peak_MB``
(torch.cuda.max_memory_allocated over the rounds: models, optimiser state, activations) and
``base_MB`` (allocated before the first round). On the CPU both are None: torch's CPU allocator
keeps no peak and the process's RSS high-water mark covers every earlier variant.

Sizes (env): LSKD_STEP_BENCH_BACKBONE (resnet101 on a GPU, tiny on the CPU), LSKD_STEP_BENCH_SIZE
(crop, 512 / 64), LSKD_STEP_BENCH_BATCH (12 / 16), LSKD_STEP_BENCH_STRIDE (output stride, 16 / 8),
LSKD_STEP_BENCH_DTYPE (comma list of "bfloat16" (autocast) and "float32"; both on a GPU, float32 on
the CPU), LSKD_STEP_BENCH_MEMORY_FORMAT (the trainer's --memory-format, channels_last),
LSKD_STEP_BENCH_ROUNDS (5 / 3), LSKD_STEP_BENCH_WARMUP (2 / 1), LSKD_STEP_BENCH_THREADS (CPU threads
while timing; 0 = torch's default on a GPU, 1 on the CPU). The CPU defaults are the
demo's shapes; benches/gpu_check.sh's stepbench stage runs the GPU ones (ResNet-50 at 256 when its
budget is short).

    pytest benches/test_bench_step.py --benchmark-only --benchmark-json=step.json
    python benches/summarize.py step.json
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import lskd_workload as wl  # noqa: E402
from released_step import EagerPLOP, LSKDFloor, ReleasedLSKD  # noqa: E402

from lskd.methods import LSKD, PLOP, Finetune, Method, MiB, StepContext  # noqa: E402
from lskd.models import DeepLabV3  # noqa: E402
from lskd.train import TrainConfig  # noqa: E402
from lskd.train.iteration import FiniteWatch, train_iteration  # noqa: E402
from lskd.train.phases import TrainingPhase  # noqa: E402
from lskd.train.step import StepTrainer  # noqa: E402
from lskd.weighting import RGE, FixedWeights, Weighting  # noqa: E402

GPU = wl.on_gpu()
BACKBONE = os.environ.get("LSKD_STEP_BENCH_BACKBONE", "resnet101" if GPU else "tiny")
SIZE = int(os.environ.get("LSKD_STEP_BENCH_SIZE", "512" if GPU else "64"))
BATCH = int(os.environ.get("LSKD_STEP_BENCH_BATCH", "12" if GPU else "16"))
STRIDE = int(os.environ.get("LSKD_STEP_BENCH_STRIDE", "16" if GPU else "8"))
DTYPES = os.environ.get("LSKD_STEP_BENCH_DTYPE", "bfloat16,float32" if GPU else "float32").split(",")
ROUNDS = int(os.environ.get("LSKD_STEP_BENCH_ROUNDS", "5" if GPU else "3"))  # 3: `make bench` stays short
WARMUP = int(os.environ.get("LSKD_STEP_BENCH_WARMUP", "2" if GPU else "1"))
# CPU threads of the timed rounds (0: torch's default). One by default on the CPU: the demo's tiny
# ops gain little from a second thread, and on a loaded 2-core machine two OpenMP threads stall for
# seconds (measured: 117 s for this file with two threads at load 7, 12 s with one).
THREADS = int(os.environ.get("LSKD_STEP_BENCH_THREADS", "0" if GPU else "1"))
MEMORY_FORMAT = os.environ.get("LSKD_STEP_BENCH_MEMORY_FORMAT", "channels_last")  # TrainConfig.memory_format
AMP = {"bfloat16": "bf16", "float32": "none"}  # TrainConfig.amp of each benchmarked dtype
AMP_DTYPE = {"bfloat16": torch.bfloat16, "float32": None}  # the trainer's autocast dtype (None: off)
#: The teacher's classifiers after step 1 of task 2-1 (O = 4 with the background); one new class.
TEACHER_CLASSES, NEW_CLASSES = (3, 1), 1
LR = 0.001  # the later steps' learning rate (TrainConfig.lr_next)
FLOOR, RELEASED = "c-floor", "f-released"
MEMORY_NOTE_CPU = "no peak on the CPU: torch's CPU allocator keeps none, the RSS high-water mark spans every variant"


@dataclass(frozen=True)
class Variant:
    label: str  # the summary table's row
    method: Callable[[], Method]
    weighting: Callable[[], Weighting]


VARIANTS: Dict[str, Variant] = {
    "a-finetune": Variant("(a) student alone (fine-tuning, CE)", Finetune, FixedWeights),
    "b-mib": Variant("(b) + one teacher pass: MiB", MiB, FixedWeights),
    "b-plop": Variant("(b) + one teacher pass: PLOP, package ops", PLOP, FixedWeights),
    "plop-eager": Variant("PLOP, eager POD (reference)", EagerPLOP, FixedWeights),
    FLOOR: Variant("(c) CE + one 3N teacher pass: LSKD's floor", LSKDFloor, FixedWeights),
    "d-lskd": Variant("(d) LSKD, package ops, fixed weights", LSKD, FixedWeights),
    "e-lskd-rge": Variant("(e) LSKD, package ops, RGE", LSKD, RGE),
    RELEASED: Variant("(f) LSKD as released (eager terms, per-image masks, RGE)", ReleasedLSKD, RGE),
}

#: ``{dtype: {variant: extra_info}}`` of the benchmarks run so far in this process; the dicts are
#: the benchmarks' own, so ratios filled in later reach the JSON (written at the session's end).
RESULTS: Dict[str, Dict[str, dict]] = {}


def make_batch(n: int, size: int, new_label: int, device: torch.device, seed: int = 0):
    """``(images [n, 3, size, size] float32, labels [n, size, size] int64)``: per image one square of
    the new class (``new_label``, half the side) with a 2-pixel 255 border, background 0 elsewhere;
    the images are unit Gaussian noise plus 1 on the square (a visible object for the pseudo-labels)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, size, size, dtype=torch.int64)
    side = max(size // 2, 6)
    for i in range(n):
        y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
        labels[i, y : y + side, x : x + side] = 255
        labels[i, y + 2 : y + side - 2, x + 2 : x + side - 2] = new_label
    images = torch.randn(n, 3, size, size, generator=g) + (labels == new_label)[:, None].float()
    return images.to(device), labels.to(device)


@torch.no_grad()
def sharpen(teacher: DeepLabV3, images: torch.Tensor, std: float = 4.0) -> None:
    """Scale the classifiers of a randomly initialised teacher so that its logits on ``images
    [n, 3, H, W]`` have standard deviation ``std``: a random network's logits are nearly uniform
    (normalised entropy ~1 everywhere), so the entropy rule would accept no pseudo-label and PLOP /
    LSKD's CE would be multiplied by 0; a trained teacher is confident on part of the pixels."""
    factor = std / teacher(images).logits.float().std().clamp(min=1e-6)
    for classifier in teacher.classifiers:
        classifier.weight.mul_(factor)
        classifier.bias.mul_(factor)


def build_workload(backbone: str, size: int, batch: int, stride: int) -> SimpleNamespace:
    """The frozen teacher (``backbone``, output ``stride``), the student it starts every variant from
    (a copy plus a balanced new classifier, MiB's initialisation as in a step), the batch of ``batch``
    ``size`` x ``size`` images and the step's context, on the bench device."""
    dev = wl.device()
    torch.manual_seed(0)
    old = sum(TEACHER_CLASSES)
    images, labels = make_batch(batch, size, old, dev)
    fmt = torch.channels_last if MEMORY_FORMAT == "channels_last" else torch.contiguous_format
    teacher = DeepLabV3(backbone, list(TEACHER_CLASSES), output_stride=stride).freeze().to(dev, memory_format=fmt)
    sharpen(teacher, images[:2])
    student = copy.deepcopy(teacher).unfreeze()
    student.add_step(NEW_CLASSES, balanced=True)
    student.to(memory_format=fmt)
    ctx = StepContext(step=len(TEACHER_CLASSES), old_classes=old, new_classes=NEW_CLASSES)
    return SimpleNamespace(
        teacher=teacher,
        student=student.train(),
        images=images,
        labels=labels,
        ctx=ctx,
        shape=dict(backbone=backbone, output_stride=stride, batch_size=batch, crop=size),
    )


@pytest.fixture(scope="module")
def workload():
    return build_workload(BACKBONE, SIZE, BATCH, STRIDE)


def make_step(key: str, work, dtype: str) -> SimpleNamespace:
    """What :func:`train_iteration` reads of a :class:`StepTrainer`, built as its set-up does: the
    variant's method (thresholds prepared on the batch) and weighting in a TrainingPhase, a fresh
    copy of the student, the step's SGD (StepTrainer._optimizer itself), no loss scaling."""
    variant, dev = VARIANTS[key], wl.device()
    method, weighting = variant.method(), variant.weighting()
    cfg = TrainConfig(
        dataset="folder",
        data_root="-",
        task="2-1",
        method=method.name,
        out="-",
        amp=AMP[dtype],
        weighting=weighting.name,
        lr_next=LR,
        memory_format=MEMORY_FORMAT,
        **work.shape,
    )
    phase = TrainingPhase(weighting, method, work.ctx, log=lambda msg: None)
    phase.start(WARMUP + ROUNDS)
    step = SimpleNamespace(
        cfg=cfg,
        device=dev,
        run=SimpleNamespace(method=method, amp_dtype=AMP_DTYPE[dtype]),
        phase=phase,
        ctx=work.ctx,
        teacher=work.teacher,
        student=copy.deepcopy(work.student),
        base_lr=LR,
        scaler=torch.amp.GradScaler(dev.type, enabled=False),
        finite_watch=FiniteWatch(),
    )
    step.optimizer = StepTrainer._optimizer(step)
    if method.needs_prepare_step:  # PLOP / LSKD entropy thresholds, once per step, outside the timing
        method.prepare_step(work.teacher, [(work.images, work.labels)], work.ctx)
    return step


def memory_base() -> Optional[float]:
    """MiB allocated on the GPU now, its peak counter reset (None on the CPU)."""
    if not GPU:
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def fill_ratios(runs: Dict[str, dict]) -> None:
    """``x_floor`` / ``x_released`` of every run: its ms over (c)'s / (f)'s (None until they ran)."""
    for e in runs.values():
        for name, ref in (("x_floor", FLOOR), ("x_released", RELEASED)):
            e[name] = e["ms_per_iter"] / runs[ref]["ms_per_iter"] if ref in runs else None


def measure(benchmark, step: SimpleNamespace, work, where: str) -> Tuple[list, Optional[float], Optional[float]]:
    """Run the step's iteration under ``benchmark.pedantic``; ``(seconds of each timed round,
    MiB allocated before them, peak MiB during them)`` (the MiB None on the CPU). The step and its
    student go out of scope on return."""
    student, images, labels = step.student, work.images, work.labels
    times = []

    def iteration() -> None:
        t0 = time.perf_counter()
        train_iteration(step, student, student, images, labels, 1.0, LR, where)
        wl.sync()  # the GPU's work is part of the iteration
        times.append(time.perf_counter() - t0)

    base = memory_base()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS or threads)
    try:
        benchmark.pedantic(iteration, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    finally:
        torch.set_num_threads(threads)  # the other benchmarks of the session keep theirs
    peak = torch.cuda.max_memory_allocated() / 2**20 if GPU else None
    return times[-ROUNDS:], base, peak  # warm-up rounds first (one call in all with --benchmark-disable)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step(benchmark, device_info, workload, dtype, variant):
    timed, base, peak = measure(benchmark, make_step(variant, workload, dtype), workload, f"step bench {variant}")
    benchmark.extra_info.update(device_info)
    benchmark.extra_info.update(
        kind="step",
        variant=variant,
        label=VARIANTS[variant].label,
        dtype=dtype,
        backbone=BACKBONE,
        size=SIZE,
        batch=BATCH,
        output_stride=STRIDE,
        memory_format=MEMORY_FORMAT,
        rounds=len(timed),
        threads=THREADS or torch.get_num_threads(),
        ms_per_iter=1e3 * statistics.median(timed),
        ms_min=1e3 * min(timed),
        peak_MB=peak,
        base_MB=base,
        memory_note=None if GPU else MEMORY_NOTE_CPU,
    )
    RESULTS.setdefault(dtype, {})[variant] = benchmark.extra_info
    fill_ratios(RESULTS[dtype])
    memory_base()  # frees this variant's student and optimiser state before the next one
