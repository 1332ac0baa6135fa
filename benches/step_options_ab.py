"""A/B of the trainer's speed options on benches/test_bench_step.py's iterations, rounds interleaved.

    python benches/step_options_ab.py OPTIONS [VARIANTS]

OPTIONS: a comma list of settings, each a '-'-joined set of: ``base`` (contiguous, float32),
``cl`` (channels-last: --memory-format channels_last), ``bf16`` (--amp bf16), ``compile``
(--compile both), ``inf`` (the teacher's passes under torch.inference_mode), ``refout``
(lskd.ce_unkd on its reference backend: the output-level losses on upsampled logits, as
without the fused op). VARIANTS: the step bench's keys (default ``c-floor,d-lskd``).

Every setting's step is built once; each round then runs one iteration of every (variant,
setting) in turn, so slow drifts of a shared machine hit all of them alike. Prints the median
and minimum ms per iteration and each variant's ratio to (c) of the same setting. Env:
AB_ROUNDS (10), AB_THREADS (1), and the step bench's LSKD_STEP_BENCH_* sizes; the models start
contiguous (``cl`` converts them).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("LSKD_STEP_BENCH_MEMORY_FORMAT", "contiguous")
sys.path.insert(0, os.path.dirname(__file__))

import test_bench_step as tb  # noqa: E402
import torch  # noqa: E402

import lskd.ops  # noqa: E402
from lskd.train.iteration import train_iteration  # noqa: E402

FUSED = lskd.ops.ce_unkd


@contextlib.contextmanager
def output_losses(setting: str):
    """With ``refout``, every lskd.ce_unkd call of the methods runs on the reference backend."""
    if "refout" in setting:
        lskd.ops.ce_unkd = lambda *a, **k: FUSED(*a, **{**k, "backend": "reference"})
    try:
        yield
    finally:
        lskd.ops.ce_unkd = FUSED


def build(work, key: str, setting: str):
    """The step of variant ``key`` under ``setting``; ``(step, the module trained)``."""
    step = tb.make_step(key, work, "bfloat16" if "bf16" in setting else "float32")
    if "cl" in setting:
        step.cfg.memory_format = "channels_last"
        step.teacher = copy.deepcopy(work.teacher).to(memory_format=torch.channels_last)
        step.student = step.student.to(memory_format=torch.channels_last)
        step.optimizer = tb.StepTrainer._optimizer(step)
    if "inf" in setting:
        method, plain = step.run.method, step.run.method.teacher_forward

        def teacher_forward(*args, **kwargs):
            with torch.inference_mode():
                return plain(*args, **kwargs)

        method.teacher_forward = teacher_forward
    net = step.student
    if "compile" in setting:
        step.teacher, net = torch.compile(step.teacher), torch.compile(step.student)
    return step, net


def main() -> None:
    settings = sys.argv[1].split(",")
    variants = sys.argv[2].split(",") if len(sys.argv) > 2 else [tb.FLOOR, "d-lskd"]
    rounds = int(os.environ.get("AB_ROUNDS", "10"))
    torch.set_num_threads(int(os.environ.get("AB_THREADS", "1")))
    work = tb.build_workload(tb.BACKBONE, tb.SIZE, tb.BATCH, tb.STRIDE)
    runs = {(k, s): (*build(work, k, s), []) for k in variants for s in settings}

    def one(step, net, setting: str) -> float:
        with output_losses(setting):
            t0 = time.perf_counter()
            train_iteration(step, net, step.student, work.images, work.labels, 1.0, tb.LR, "a/b")
            tb.wl.sync()
            return time.perf_counter() - t0

    for r in range(rounds + 1):  # round 0: warm-up (and compilation)
        for (key, setting), (step, net, times) in runs.items():
            dt = one(step, net, setting)
            if r:
                times.append(dt)
    medians = {}
    for (key, setting), (_, _, times) in runs.items():
        medians[key, setting] = 1e3 * statistics.median(times)
        print(f"{key:12s} {setting:14s} median {medians[key, setting]:7.1f} ms  min {1e3 * min(times):7.1f}")
    for setting in settings:
        if (tb.FLOOR, setting) in medians:
            floor = medians[tb.FLOOR, setting]
            ratios = [f"{k} {medians[k, setting] / floor:.2f}x" for k in variants if k != tb.FLOOR]
            print(f"{setting}: over (c) " + ", ".join(ratios))


if __name__ == "__main__":
    main()
