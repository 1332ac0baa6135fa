"""``lskd demo``: every method on a multi-step task of the synthetic benchmark, on a CPU.

What it does (``run_demo``):

1. writes the synthetic dataset (:func:`lskd.data.make_synthetic`) to ``OUT/data`` once (kept
   while its settings match);
2. trains step 0 ONCE (``OUT/base``; step 0 is the same for every incremental method) and starts
   finetune, MiB, PLOP, LSKD, LSKD with RGE weights (``lskd+rge``) and LSKD with the bi-level
   scheme search (``lskd+search``) from its checkpoint (``--init-from``), each in ``OUT/<method>``;
3. trains joint (one step with every class, the upper bound) in ``OUT/joint``;
4. prints the old/new/all mIoU table of the last step and writes ``OUT/summary.md``,
   ``OUT/summary.json`` (``{"methods": {name: the train summary}, "settings": ..., ...}``) and
   ``OUT/comparison.png`` (mIoU old / new / all per step and method).

Settings (``PRESETS``; tiny DeepLabV3 at output stride 8 -- 8x8 logits on 64x64 images):

* full: 6 classes, task 3-1 (step 0 = background + 3 classes, then 3 single-class steps), 600
  training / 200 validation images; step 0 and joint 40 epochs at lr 0.1, the later steps 25
  epochs at lr 0.03 (the papers' lr/10 with so few iterations does not learn the new classes:
  finetune then stays at ~0 new-class IoU); lskd+search searches during the first 4 of the 25
  epochs (Adam lr 0.02: with ~5 iterations per epoch the default 1 epoch at 3e-3 would leave
  the scheme logits at their initial values). 432 s on 2 quiet CPU cores in all.
* quick: the same protocol with 240 / 96 images, 20 and 10 epochs, 2 search epochs (CI).

The runs of a previous demo in ``OUT`` are replaced (the dataset is kept).
"""
from __future__ import annotations

import json

import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .train import report
from .train.trainer import TrainConfig, train

__all__ = ["PRESETS", "DEMO_METHODS", "run_demo", "format_comparison", "plot_comparison"]

DEMO_METHODS: List[str] = ["joint", "finetune", "mib", "plop", "lskd", "lskd+rge", "lskd+search"]
INCREMENTAL = ["finetune", "mib", "plop", "lskd", "lskd+rge", "lskd+search"]
#: Demo entries that are LSKD with the dynamic weights (SPEC 3.1) or the bi-level search (SPEC 3.2):
#: the ``lskd train`` settings they add.
VARIANTS: Dict[str, dict] = {
    "lskd+rge": dict(method="lskd", weighting="rge"),
    "lskd+search": dict(method="lskd", search="bilevel", search_epochs=1),
}

PRESETS: Dict[str, dict] = {
    "full": dict(
        data=dict(classes=6, images=600, val_images=200, size=64, max_objects=3),
        task="3-1",
        train=dict(backbone="tiny", output_stride=8, epochs=40, epochs_next=25, batch_size=32, crop=64, lr=0.1, lr_next=0.03),
        variants={"lskd+search": dict(search_epochs=4, search_lr=0.02)},
    ),
    "quick": dict(
        data=dict(classes=6, images=240, val_images=96, size=64, max_objects=3),
        task="3-1",
        train=dict(backbone="tiny", output_stride=8, epochs=20, epochs_next=10, batch_size=32, crop=64, lr=0.1, lr_next=0.03),
        variants={"lskd+search": dict(search_epochs=2, search_lr=0.02)},
    ),
}


def _dataset(root: Path, data: dict, seed: int, quiet: bool) -> Path:
    """The synthetic dataset in ``root`` (built unless one with the same settings is there)."""
    from .data import make_synthetic
    from .data.synthetic import GENERATOR_VERSION

    meta = root / "synthetic.json"
    if meta.is_file():
        try:
            saved = json.loads(meta.read_text())
            same = all(saved.get(k) == v for k, v in data.items()) and saved.get("seed") == seed
            if same and saved.get("generator_version") == GENERATOR_VERSION:
                return root
        except ValueError:
            pass
    t0 = time.time()
    make_synthetic(root, seed=seed, **data)
    if not quiet:
        print(f"demo: wrote the synthetic dataset to {root} ({time.time() - t0:.1f}s)", flush=True)
    return root


def format_comparison(summaries: Dict[str, dict]) -> str:
    """Table of the last step of every method: mIoU old / new / all."""
    lines = [f"{'method':<12} {'step':>4} {'old':>6} {'new':>6} {'all':>6}"]
    for name, s in summaries.items():
        e = s["steps"][-1]
        lines.append(
            f"{name:<12} {e['step']:>4} {report.format_number(e['miou_old'])} "
            f"{report.format_number(e['miou_new'])} {report.format_number(e['miou_all'])}"
        )
    return "\n".join(lines)


def _steps_table_md(summaries: Dict[str, dict]) -> str:
    steps = sorted({e["step"] for s in summaries.values() for e in s["steps"]})
    head = "| method | " + " | ".join(f"step {t} (old/new/all)" for t in steps) + " |"
    sep = "|---|" + "---|" * len(steps)
    rows = [head, sep]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for name, s in summaries.items():
        by = {e["step"]: e for e in s["steps"]}
        cells = []
        for t in steps:
            e = by.get(t)
            cells.append("" if e is None else f"{f(e['miou_old'])} / {f(e['miou_new'])} / {f(e['miou_all'])}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _schemes_and_weights_md(summaries: Dict[str, dict]) -> List[str]:
    """Per LSKD entry and step > 0: the scheme of every map and the final weight of every term."""
    rows = []
    for name, s in summaries.items():
        for e in s["steps"]:
            if e.get("schemes"):
                schemes = ", ".join(f"{m} {sc}" for m, sc in e["schemes"].items())
                weights = ", ".join(f"{t} {w:.2f}" for t, w in e.get("weights", {}).items())
                rows.append(f"| {name} | {e['step']} | {schemes} | {weights} |")
    if not rows:
        return []
    return [
        "## LSKD: scheme per map and final weight per term",
        "",
        "Released assignment: stage1 pod, stage2 pod, stage3 md, stage4 md, aspp md+mcd, logits md (masked pod). "
        "lskd+rge learns the weights (RGE); lskd+search chooses the schemes and map weights on held-out data.",
        "",
        "| method | step | schemes | weights |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def plot_comparison(path: Path, summaries: Dict[str, dict], title: str = "") -> Optional[Path]:
    """``comparison.png``: three panels (old, new, all mIoU) against the step, one line per method;
    joint (one offline step) is a dashed horizontal line."""
    plt = report.pyplot()
    if plt is None:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=100, sharey=True)
    steps = sorted({e["step"] for s in summaries.values() for e in s["steps"] if not s.get("offline")})
    for ax, (key, label) in zip(axes, [("miou_old", "old classes"), ("miou_new", "new classes"), ("miou_all", "all classes")]):
        for name, s in summaries.items():
            pts = [(e["step"], e[key]) for e in s["steps"] if e.get(key) is not None]
            if not pts:
                continue
            if s.get("offline"):
                ax.axhline(pts[-1][1], linestyle="--", color="black", alpha=0.6, label=f"{name} (upper bound)")
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.set_title(f"mIoU, {label}")
        ax.set_xlabel("step")
        if steps:
            ax.set_xticks(steps)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    axes[-1].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return report.save_figure(fig, path)


def run_demo(
    out: Optional[str] = None,
    quick: bool = False,
    device: str = "auto",
    workers: Optional[int] = None,
    seed: int = 0,
    methods: Optional[Sequence[str]] = None,
    quiet: bool = False,
) -> dict:
    """Run the demo (module docstring); returns the ``summary.json`` content."""
    t_start = time.time()
    preset_name = "quick" if quick else "full"
    preset = PRESETS[preset_name]
    out_p = Path(out) if out else Path("runs") / ("demo-quick" if quick else "demo")
    methods = list(methods) if methods else list(DEMO_METHODS)
    bad = [m for m in methods if m not in DEMO_METHODS]
    if bad:
        raise ValueError(f"demo: unknown method(s) {bad}; choose among {DEMO_METHODS}")
    if workers is None:
        workers = 2 if (device != "cpu" and torch.cuda.is_available()) else 0
    out_p.mkdir(parents=True, exist_ok=True)
    data_root = _dataset(out_p / "data", preset["data"], seed, quiet)
    for name in ["base", *DEMO_METHODS]:  # replace the runs of a previous demo
        if (out_p / name).exists():
            shutil.rmtree(out_p / name)

    common = dict(
        dataset="folder",
        data_root=str(data_root),
        task=preset["task"],
        device=device,
        workers=workers,
        seed=seed,
        quiet=True,
        **preset["train"],
    )
    timings: Dict[str, float] = {}
    summaries: Dict[str, dict] = {}

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    say(f"demo ({preset_name}): task {preset['task']} on {data_root}, methods {methods}, output {out_p}")
    incremental = [m for m in methods if m in INCREMENTAL]
    base_ckpt = None
    if incremental:
        t0 = time.time()
        s = train(TrainConfig(method="finetune", out=str(out_p / "base"), step=0, **common))
        timings["step 0 (shared)"] = time.time() - t0
        base_ckpt = out_p / "base" / "checkpoints" / "step0.pt"
        e = s["steps"][0]
        say(f"  step 0 (shared by {', '.join(incremental)}): mIoU {e['miou_all']:.1f}  [{timings['step 0 (shared)']:.0f}s]")
    for m in methods:
        t0 = time.time()
        if m == "joint":
            s = train(TrainConfig(method="joint", out=str(out_p / "joint"), **common))
        else:
            run = dict(common, method=m)
            run.update(VARIANTS.get(m, {}))
            run.update(preset.get("variants", {}).get(m, {}))
            s = train(TrainConfig(out=str(out_p / m), init_from=str(base_ckpt), **run))
            s["method"] = m
        timings[m] = time.time() - t0
        summaries[m] = s
        e = s["steps"][-1]
        say(
            f"  {m:<11} last step {e['step']}: old {report.format_number(e['miou_old']).strip()} "
            f"new {report.format_number(e['miou_new']).strip()} all {report.format_number(e['miou_all']).strip()}"
            f"  [{timings[m]:.0f}s]"
        )
    total = time.time() - t_start
    table = format_comparison(summaries)
    any_s = next(iter(summaries.values()))
    settings = {
        "preset": preset_name,
        "task": preset["task"],
        "dataset": {"root": str(data_root), **preset["data"], "seed": seed},
        "train": preset["train"],
        "device": device,
        "class_names": any_s.get("class_names"),
    }
    result = {"methods": summaries, "settings": settings, "time_s": round(total, 1), "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    report.write_json(out_p / "summary.json", result)
    title = f"lskd demo: synthetic {preset['data']['classes']} classes, task {preset['task']}, tiny DeepLabV3"
    plot_comparison(out_p / "comparison.png", summaries, title)
    md = [
        f"# lskd demo ({preset_name})",
        "",
        f"Synthetic benchmark ({preset['data']['classes']} classes, {preset['data']['images']} training / "
        f"{preset['data']['val_images']} validation images of {preset['data']['size']}x{preset['data']['size']}), "
        f"task {preset['task']} (overlapped), {preset['train']['backbone']} DeepLabV3 (output stride {preset['train'].get('output_stride', 16)}), "
        f"{preset['train']['epochs']} epochs at step 0 (lr {preset['train']['lr']}), "
        f"{preset['train']['epochs_next']} per later step (lr {preset['train']['lr_next']}), batch {preset['train']['batch_size']}. "
        f"Step 0 is trained once and shared by the incremental methods; joint trains all classes in one step.",
        "",
        f"Total time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).",
        "",
        "## mIoU (%) after the last step",
        "",
        "| method | old | new | all |",
        "|---|---|---|---|",
    ]
    for name, s in summaries.items():
        e = s["steps"][-1]
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        md.append(f"| {name} | {f(e['miou_old'])} | {f(e['miou_new'])} | {f(e['miou_all'])} |")
    md += ["", "## mIoU (%) per step (old / new / all)", "", _steps_table_md(summaries), "", "![comparison](comparison.png)", ""]
    md += _schemes_and_weights_md(summaries)
    report.write_text_atomic(out_p / "summary.md", "\n".join(md))
    print(f"\nmIoU (%) after the last step of task {preset['task']} ({total:.0f}s in all):")
    print(table)
    print(f"\nwrote {out_p / 'summary.md'}, {out_p / 'summary.json'} and {out_p / 'comparison.png'}", flush=True)
    return result
