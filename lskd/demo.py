"""``lskd demo``: every method on a multi-step task of the synthetic benchmark, on a CPU.

What it does (``run_demo``):

1. writes the synthetic dataset (:func:`lskd.data.make_synthetic`) to ``OUT/data`` once (kept
   while its settings match);
2. trains step 0 ONCE (``OUT/base``; step 0 is the same for every incremental method) and starts
   finetune, MiB, PLOP, LSKD as released (with its RGE weights), LSKD with fixed weights
   (``lskd-fixed``, an ablation) and LSKD with the bi-level scheme search (``lskd+search``) from
   its checkpoint (``--init-from``), each in ``OUT/<method>``;
3. trains joint (one step with every class, the upper bound) in ``OUT/joint``;
4. prints the old/new/all mIoU table of the last step and writes ``OUT/summary.md``,
   ``OUT/summary.json`` (``{"methods": {name: the train summary}, "settings": ..., ...}``) and
   ``OUT/comparison.png`` (mIoU old / new / all per step and method).

Protocol (``PRESETS``; tiny DeepLabV3 at output stride 8 -- 8x8 logits on 64x64 images), the
papers' where they say something: task 2-1 on the 6 synthetic classes (step 0 = background + 2
classes, then 4 single-class steps, overlapped), the later steps at a tenth of step 0's learning
rate, the student's BatchNorm in train mode (``--bn frozen``: the release's fix_bn; README, "The
demo's BatchNorm"):

* default: 600 training / 200 validation images; step 0 and joint 30 epochs at lr 0.1, the later
  steps 20 epochs at lr 0.01, batch 16 (about 11 iterations per epoch on the ~180 images of a
  step's class: ~220 iterations per later step, the papers' VOC 15-1 has ~500); lskd+search
  searches during the first 4 epochs (Adam lr 0.02: the default 1 epoch at 3e-3 would leave the
  scheme logits at their initial values). summary.md's "Does each method learn the new class?"
  table is the evidence that these iterations are enough: fine-tuning's IoU of each step's class
  against joint's.
* ``--full``: the default protocol with 3 seeds (mean ± sample std; ``make benchmark`` runs it with
  both BatchNorm settings).
* quick: the same protocol with 240 / 96 images, 15 and 6 epochs, 2 search epochs (CI).

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
from .train.config import BN_MODES
from .train.trainer import TrainConfig, train

__all__ = [
    "PRESETS",
    "DEMO_METHODS",
    "run_demo",
    "aggregate_seeds",
    "learnt_class_iou",
    "format_comparison",
    "format_aggregate",
    "plot_comparison",
]

DEMO_METHODS: List[str] = ["joint", "finetune", "mib", "plop", "lskd", "lskd-fixed", "lskd+search"]
INCREMENTAL = ["finetune", "mib", "plop", "lskd", "lskd-fixed", "lskd+search"]
#: The ``lskd train`` settings of the demo's LSKD entries: ``lskd`` is LSKD as released, which
#: always trains with the RGE weights; ``lskd-fixed`` is the ablation with fixed weights (all 1);
#: ``lskd+search`` learns the per-map schemes and weights with the bi-level search.
VARIANTS: Dict[str, dict] = {
    "lskd": dict(method="lskd", weighting="rge"),
    "lskd-fixed": dict(method="lskd"),
    "lskd+search": dict(method="lskd", search="bilevel", search_epochs=1),
}

#: ``lskd demo`` runs "default" with one seed, ``--full`` the same protocol with 3 seeds, ``--quick``
#: a smaller version for CI. The protocol is the papers' (module docstring); the numbers of
#: iterations are chosen so that fine-tuning learns each step's class (``_learning_md``).
PRESETS: Dict[str, dict] = {
    "default": dict(
        data=dict(classes=6, images=600, val_images=200, size=64, max_objects=3),
        task="2-1",
        train=dict(
            backbone="tiny", output_stride=8, epochs=30, epochs_next=20, batch_size=16, crop=64, lr=0.1, lr_next=0.01
        ),
        variants={"lskd+search": dict(search_epochs=4, search_lr=0.02)},
    ),
    "quick": dict(
        data=dict(classes=6, images=240, val_images=96, size=64, max_objects=3),
        task="2-1",
        train=dict(
            backbone="tiny", output_stride=8, epochs=15, epochs_next=6, batch_size=16, crop=64, lr=0.1, lr_next=0.01
        ),
        variants={"lskd+search": dict(search_epochs=2, search_lr=0.02)},
    ),
}
#: Seeds of ``lskd demo --full`` (unless ``--seeds`` says otherwise).
FULL_SEEDS = 3


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
        "lskd (as released) learns the weights (RGE); lskd-fixed keeps them at 1; lskd+search chooses the "
        "schemes and map weights on held-out data.",
        "",
        "| method | step | schemes | weights |",
        "|---|---|---|---|",
        *rows,
        "",
    ]


def _points(summary: dict, rows: Optional[List[dict]], key: str) -> List[tuple]:
    """``[(step, value, error)]`` of one method: the seeds' mean and std, or one seed's values."""
    if rows is not None:
        return [(r["step"], r[key]["mean"], r[key]["std"]) for r in rows if r.get(key)]
    return [(e["step"], e[key], 0.0) for e in summary["steps"] if e.get(key) is not None]


def plot_comparison(
    path: Path, summaries: Dict[str, dict], title: str = "", aggregate: Optional[Dict[str, List[dict]]] = None
) -> Optional[Path]:
    """``comparison.png``: three panels (old, new, all mIoU) against the step, one line per method
    (with ``aggregate``: the mean over the seeds with error bars of one standard deviation);
    joint (one offline step) is a dashed horizontal line."""
    plt = report.pyplot()
    if plt is None:  # pragma: no cover
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=100, sharey=True)
    steps = sorted({e["step"] for s in summaries.values() for e in s["steps"] if not s.get("offline")})
    for ax, (key, label) in zip(
        axes, [("miou_old", "old classes"), ("miou_new", "new classes"), ("miou_all", "all classes")]
    ):
        for name, s in summaries.items():
            pts = _points(s, aggregate.get(name) if aggregate else None, key)
            if not pts:
                continue
            if s.get("offline"):
                ax.axhline(pts[-1][1], linestyle="--", color="black", alpha=0.6, label=f"{name} (upper bound)")
            else:
                ax.errorbar(
                    [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=3, label=name
                )
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


def _say(quiet: bool):
    return (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))


def _run_methods(
    root: Path, seed: int, methods: Sequence[str], common: dict, preset: dict, say, timings: Dict[str, float]
) -> Dict[str, dict]:
    """Every method of one seed in ``root``: step 0 once (``root/base``), then each method from it."""
    common = dict(common, seed=seed)
    incremental = [m for m in methods if m in INCREMENTAL]
    base_ckpt = None
    summaries: Dict[str, dict] = {}
    if incremental:
        t0 = time.time()
        s = train(TrainConfig(method="finetune", out=str(root / "base"), step=0, **common))
        timings["step 0 (shared)"] = timings.get("step 0 (shared)", 0.0) + time.time() - t0
        base_ckpt = root / "base" / "checkpoints" / "step0.pt"
        say(f"  seed {seed}, step 0 (shared by {', '.join(incremental)}): mIoU {s['steps'][0]['miou_all']:.1f}")
    for m in methods:
        t0 = time.time()
        if m == "joint":
            s = train(TrainConfig(method="joint", out=str(root / "joint"), **common))
        else:
            run = dict(common, method=m)
            run.update(VARIANTS.get(m, {}))
            run.update(preset.get("variants", {}).get(m, {}))
            s = train(TrainConfig(out=str(root / m), init_from=str(base_ckpt), **run))
            s["method"] = m
        timings[m] = timings.get(m, 0.0) + time.time() - t0
        summaries[m] = s
        e = s["steps"][-1]
        say(
            f"  seed {seed}, {m:<11} last step {e['step']}: old {report.format_number(e['miou_old']).strip()} "
            f"new {report.format_number(e['miou_new']).strip()} all {report.format_number(e['miou_all']).strip()}"
            f"  [{time.time() - t0:.0f}s]"
        )
    return summaries


def aggregate_seeds(runs: Dict[int, Dict[str, dict]]) -> Dict[str, List[dict]]:
    """``{method: [{"step": t, "miou_old": {"mean", "std", "n"}, "miou_new": ..., "miou_all": ...}]}``
    over the seeds that ran the method (``std``: the sample standard deviation, 0 for one seed;
    undefined values skipped; ``n`` says how many seeds)."""
    out: Dict[str, List[dict]] = {}
    methods = list(dict.fromkeys(m for r in runs.values() for m in r))  # a seed may lack a method
    for m in methods:
        have = [r[m] for r in runs.values() if m in r]
        steps = sorted({e["step"] for s in have for e in s["steps"]})
        rows = []
        for t in steps:
            row: dict = {"step": t}
            for key in ("miou_old", "miou_new", "miou_all"):
                vals = [e[key] for s in have for e in s["steps"] if e["step"] == t and e[key] is not None]
                row[key] = _mean_std(vals)
            rows.append(row)
        out[m] = rows
    return out


def _mean_std(vals: List[float]) -> Optional[dict]:
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": var**0.5, "n": len(vals)}


def _fmt(stat: Optional[dict]) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.1f}" if stat["n"] == 1 else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def format_aggregate(aggregate: Dict[str, List[dict]]) -> str:
    """Table of the last step of every method: mIoU old / new / all, mean ± std over the seeds."""
    lines = [f"{'method':<12} {'step':>4} {'old':>12} {'new':>12} {'all':>12}"]
    for name, rows in aggregate.items():
        e = rows[-1]
        lines.append(
            f"{name:<12} {e['step']:>4} {_fmt(e['miou_old']):>12} {_fmt(e['miou_new']):>12} {_fmt(e['miou_all']):>12}"
        )
    return "\n".join(lines)


def _aggregate_md(aggregate: Dict[str, List[dict]]) -> List[str]:
    steps = sorted({r["step"] for rows in aggregate.values() for r in rows})
    md = [
        "| method | " + " | ".join(f"step {t} (old / new / all)" for t in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, rows in aggregate.items():
        by = {r["step"]: r for r in rows}
        cells = [
            "" if t not in by else " / ".join(_fmt(by[t][k]) for k in ("miou_old", "miou_new", "miou_all"))
            for t in steps
        ]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md


def run_demo(
    out: Optional[str] = None,
    quick: bool = False,
    device: str = "auto",
    workers: Optional[int] = None,
    seed: int = 0,
    methods: Optional[Sequence[str]] = None,
    quiet: bool = False,
    seeds: Optional[int] = None,
    full: bool = False,
    bn: str = "train",
) -> dict:
    """Run the demo (module docstring) with ``seeds`` training seeds ``seed, seed + 1, ...`` on the
    dataset of ``seed`` (step 0 shared per seed; default 1 seed, :data:`FULL_SEEDS` with ``full``);
    ``bn`` is the student's BatchNorm mode in the later steps (``lskd train --bn``). Returns the
    ``summary.json`` content."""
    t_start = time.time()
    if quick and full:
        raise ValueError("demo: --quick and --full exclude each other")
    preset_name = "quick" if quick else "default"
    preset = PRESETS[preset_name]
    seeds = (FULL_SEEDS if full else 1) if seeds is None else int(seeds)
    out_p = Path(out) if out else Path("runs") / ("demo-quick" if quick else "demo-full" if full else "demo")
    methods = list(methods) if methods else list(DEMO_METHODS)
    bad = [m for m in methods if m not in DEMO_METHODS]
    if bad:
        raise ValueError(f"demo: unknown method(s) {bad}; choose among {DEMO_METHODS}")
    if seeds < 1:
        raise ValueError(f"demo: --seeds must be >= 1, got {seeds}")
    if bn not in BN_MODES:
        raise ValueError(f"demo: --bn must be one of {list(BN_MODES)}, got {bn!r}")
    if workers is None:
        workers = 2 if (device != "cpu" and torch.cuda.is_available()) else 0
    out_p.mkdir(parents=True, exist_ok=True)
    data_root = _dataset(out_p / "data", preset["data"], seed, quiet)
    for old in [*(out_p / n for n in ["base", *DEMO_METHODS]), *out_p.glob("seed*")]:  # a previous demo's runs
        if old.is_dir():
            shutil.rmtree(old)
    common = dict(
        dataset="folder",
        data_root=str(data_root),
        task=preset["task"],
        device=device,
        workers=workers,
        quiet=True,
        bn=bn,
        **preset["train"],
    )
    say = _say(quiet)
    say(
        f"demo ({preset_name}): task {preset['task']} on {data_root}, methods {methods}, {seeds} seed(s), "
        f"BatchNorm in later steps: {bn}, output {out_p}"
    )
    timings: Dict[str, float] = {}
    seed_list = [seed + k for k in range(seeds)]
    runs = {
        s: _run_methods(out_p if seeds == 1 else out_p / f"seed{s}", s, methods, common, preset, say, timings)
        for s in seed_list
    }
    return _write_demo(out_p, preset_name, dict(preset, bn=bn), data_root, device, runs, timings, time.time() - t_start)


def _write_demo(
    out_p: Path,
    preset_name: str,
    preset: dict,
    data_root: Path,
    device: str,
    runs: Dict[int, Dict[str, dict]],
    timings: Dict[str, float],
    total: float,
) -> dict:
    """summary.json, summary.md and comparison.png of a demo; prints the table."""
    seed_list = list(runs)
    summaries = runs[seed_list[0]]
    aggregate = aggregate_seeds(runs)
    any_s = next(iter(summaries.values()))
    settings = {
        "preset": preset_name,
        "task": preset["task"],
        "dataset": {"root": str(data_root), **preset["data"], "seed": seed_list[0]},
        "train": preset["train"],
        "bn": preset["bn"],
        "seeds": seed_list,
        "device": device,
        "class_names": any_s.get("class_names"),
    }
    result = {
        "methods": summaries,
        "seeds": {str(s): r for s, r in runs.items()} if len(runs) > 1 else {},
        "aggregate": aggregate,
        "learnt_class_iou": {m: {str(t): v for t, v in d.items()} for m, d in learnt_class_iou(runs).items()},
        "settings": settings,
        "time_s": round(total, 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    report.write_json(out_p / "summary.json", result)
    title = f"lskd demo: synthetic {preset['data']['classes']} classes, task {preset['task']}, tiny DeepLabV3"
    plot_comparison(out_p / "comparison.png", summaries, title, aggregate if len(runs) > 1 else None)
    report.write_text_atomic(
        out_p / "summary.md", "\n".join(_demo_md(preset_name, preset, runs, aggregate, timings, total))
    )
    print(
        f"\nmIoU (%) after the last step of task {preset['task']} ({total:.0f}s in all"
        f"{', mean ± std over ' + str(len(runs)) + ' seeds' if len(runs) > 1 else ''}):"
    )
    print(format_aggregate(aggregate) if len(runs) > 1 else format_comparison(summaries))
    print(f"\nwrote {out_p / 'summary.md'}, {out_p / 'summary.json'} and {out_p / 'comparison.png'}", flush=True)
    return result


def _step_classes(runs: Dict[int, Dict[str, dict]]) -> Dict[int, List[str]]:
    """``{t: the classes learnt at step t}`` for t > 0, from any incremental method's summary."""
    for summaries in runs.values():
        for s in summaries.values():
            if not s.get("offline"):
                return {e["step"]: list(e["classes"]) for e in s["steps"] if e["step"] > 0}
    return {}


def learnt_class_iou(runs: Dict[int, Dict[str, dict]]) -> Dict[str, Dict[int, Optional[dict]]]:
    """``{method: {t: mean ± std over the seeds of the IoU (%) of step t's classes}}``: for an
    incremental method right after step t (did it learn the class?), for joint (offline) after its
    one step (what the network can learn of that class)."""
    step_classes = _step_classes(runs)
    out: Dict[str, Dict[int, Optional[dict]]] = {}
    for m in dict.fromkeys(m for r in runs.values() for m in r):
        out[m] = {}
        for t, classes in step_classes.items():
            vals = []
            for summaries in runs.values():
                if m not in summaries:
                    continue
                s = summaries[m]
                e = s["steps"][-1] if s.get("offline") else next((e for e in s["steps"] if e["step"] == t), None)
                ious = [e["iou"].get(c) for c in classes] if e else []
                if ious and None not in ious:
                    vals.append(sum(ious) / len(ious))
            out[m][t] = _mean_std(vals)
    return out


def _learning_md(runs: Dict[int, Dict[str, dict]]) -> List[str]:
    table = learnt_class_iou(runs)
    step_classes = _step_classes(runs)
    if not step_classes:
        return []
    md = [
        "## Does each method learn the new class? IoU (%) of step t's class right after step t",
        "",
        "(joint: after its one offline step, the same classes; the later steps run at a tenth of step 0's lr)",
        "",
        "| method | " + " | ".join(f"step {t} ({', '.join(c)})" for t, c in step_classes.items()) + " |",
        "|---|" + "---|" * len(step_classes),
    ]
    for m, per_step in table.items():
        md.append(f"| {m} | " + " | ".join(_fmt(per_step[t]) for t in step_classes) + " |")
    return md + [""]


def _demo_md(
    preset_name: str,
    preset: dict,
    runs: Dict[int, Dict[str, dict]],
    aggregate: Dict[str, List[dict]],
    timings: Dict[str, float],
    total: float,
) -> List[str]:
    tr, data = preset["train"], preset["data"]
    summaries = runs[next(iter(runs))]
    seeds_txt = (
        f"{len(runs)} training seeds ({', '.join(map(str, runs))}; mean ± sample std)" if len(runs) > 1 else "one seed"
    )
    md = [
        f"# lskd demo ({preset_name})",
        "",
        f"Synthetic benchmark ({data['classes']} classes, {data['images']} training / {data['val_images']} validation "
        f"images of {data['size']}x{data['size']}), task {preset['task']} (overlapped), {tr['backbone']} DeepLabV3 "
        f"(output stride {tr.get('output_stride', 16)}), {tr['epochs']} epochs at step 0 (lr {tr['lr']}), "
        f"{tr['epochs_next']} per later step (lr {tr['lr_next']}, BatchNorm {preset['bn']}), batch {tr['batch_size']}, "
        f"{seeds_txt}. "
        f"Step 0 is trained once per seed and shared by the incremental methods; joint trains all classes in one step.",
        "",
        f"Total time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).",
        "",
        "## mIoU (%) after the last step",
        "",
        "| method | old | new | all | seeds |",
        "|---|---|---|---|---|",
    ]
    for name, rows in aggregate.items():
        e = rows[-1]
        n = e["miou_all"]["n"] if e["miou_all"] else 0
        md.append(f"| {name} | {_fmt(e['miou_old'])} | {_fmt(e['miou_new'])} | {_fmt(e['miou_all'])} | {n} |")
    md += [
        "",
        "## mIoU (%) per step (old / new / all)",
        "",
        *_aggregate_md(aggregate),
        "",
        "![comparison](comparison.png)",
        "",
    ]
    md += _learning_md(runs)
    md += _schemes_and_weights_md(summaries)
    return md
