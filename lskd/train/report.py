"""Run reports: summary.json, metrics.csv, miou.png and the text table.

``summary.json`` (stable keys; later versions add keys, never rename these)::

    {"dataset": "folder", "task": "3-1", "method": "lskd",
     "steps": [{"step": 0, "classes": ["background", "a", "b", "c"],
                "miou_old": 71.2, "miou_new": null, "miou_all": 71.2,
                "iou": {"background": 90.1, "a": 60.3, ...}}, ...]}

mIoU and IoU are in percent; ``null`` = undefined (no "new" classes at step 0, or a class with
neither ground truth nor prediction). ``classes`` = the classes learnt AT that step (the ``iou``
keys are every class learnt up to it). Extra keys written here: ``disjoint``, ``backbone``,
``class_names``, ``offline`` (joint training: one step with every class, reported as the last
step of the task) and per step ``losses`` (mean of each loss term over the last epoch).
Also per step: ``weights`` (``{term name: final weight}``: 1, --term-weights, or the weights
learnt by RGE / GradNorm / the search) and ``schemes`` (``{map name: scheme}`` that LSKD
distilled each map with; ``{}`` for the other methods and at step 0).

``weights/step{t}.json`` (dynamic weights and the search) holds the trace of the weights (and
of the scheme probabilities) over the updates; ``weights.png`` plots it.

``metrics.csv``: one row per (step, class): ``step,class_id,class,group,iou`` with
``group`` = old | new and an empty ``iou`` when undefined.

Everything is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .._io import atomic_open

__all__ = [
    "write_text_atomic",
    "write_json",
    "write_summary",
    "write_metrics_csv",
    "plot_miou",
    "format_table",
    "format_number",
    "write_reports",
    "plot_weights",
    "pyplot",
    "save_figure",
]

PathLike = Union[str, os.PathLike]


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    with atomic_open(path, "w", newline="") as f:
        f.write(text)
    return path


def _clean(obj):
    """NaN/inf -> None so that the JSON is standard."""
    if isinstance(obj, float):
        return None if (math.isnan(obj) or math.isinf(obj)) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: PathLike, obj) -> Path:
    """Indented, standard JSON (NaN -> null), written atomically."""
    return write_text_atomic(path, json.dumps(_clean(obj), indent=2) + "\n")


def write_summary(path: PathLike, summary: dict) -> Path:
    """Write ``summary.json``."""
    return write_json(path, summary)


def write_metrics_csv(path: PathLike, summary: dict, base_classes: Sequence[str]) -> Path:
    """One row per step and class: ``step,class_id,class,group,iou`` (iou in percent).

    ``base_classes`` = the names of the step-0 classes (group "old"; the others are "new").
    """
    names = summary.get("class_names")
    ids = {n: i for i, n in enumerate(names)} if names else {}
    base = set(base_classes)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "class_id", "class", "group", "iou"])
    for entry in summary["steps"]:
        for name, iou in entry["iou"].items():
            w.writerow(
                [
                    entry["step"],
                    ids.get(name, ""),
                    name,
                    "old" if name in base else "new",
                    "" if iou is None else f"{iou:.4f}",
                ]
            )
    return write_text_atomic(path, buf.getvalue())


def _series(steps: List[dict], key: str):
    xs, ys = [], []
    for e in steps:
        v = e.get(key)
        if v is not None:
            xs.append(e["step"])
            ys.append(v)
    return xs, ys


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    return plt


def save_figure(fig, path: PathLike) -> Path:
    """Lay out ``fig``, write it as a PNG atomically to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_miou(path: PathLike, summary: dict) -> Optional[Path]:
    """``miou.png``: mIoU (old / new / all) per step. Returns None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:  # pragma: no cover - matplotlib is a dependency of the CLI
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    styles = {"miou_old": ("old", "o-"), "miou_new": ("new", "s-"), "miou_all": ("all", "^-")}
    for key, (label, style) in styles.items():
        xs, ys = _series(summary["steps"], key)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    steps = [e["step"] for e in summary["steps"]]
    if steps:
        ax.set_xticks(sorted(set(steps)))
    ax.set_title(f"{summary.get('method')} on {summary.get('dataset')} {summary.get('task')}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _map_label(m: str) -> str:
    from ..methods import MAP_NAMES

    i = int(m)
    return f"map {i} ({MAP_NAMES[i]})" if 0 <= i < len(MAP_NAMES) else f"map {i}"


def plot_weights(path: PathLike, traces: Sequence[dict]) -> Optional[Path]:
    """``weights.png`` from the per-step traces ``[{"step", "weighting", "trace": [...]}, ...]``.

    Top: every weight against the update index (the steps one after the other, separated by
    dashed lines). When a trace holds scheme probabilities (the search), one panel per map
    below: the probability of each scheme against the update index. None without matplotlib
    or without any trace entry."""
    traces = [t for t in sorted(traces, key=lambda t: t["step"]) if t.get("trace")]
    if not traces:
        return None
    plt = pyplot()
    if plt is None:  # pragma: no cover - matplotlib is a dependency of the CLI
        return None
    maps = sorted({m for t in traces for e in t["trace"] for m in e.get("probabilities", {})}, key=int)
    ncols = max(1, min(3, len(maps)))
    nrows = 1 + (len(maps) + ncols - 1) // ncols if maps else 1
    fig = plt.figure(figsize=(5 * max(ncols, 2), 3.2 * nrows), dpi=100)
    grid = fig.add_gridspec(nrows, ncols)
    ax = fig.add_subplot(grid[0, :])
    starts = []
    offset = 0
    for t in traces:
        starts.append(offset)
        offset += max(int(e.get("update", 0)) for e in t["trace"])
    series: Dict[str, tuple] = {}
    for t, start in zip(traces, starts):
        for e in t["trace"]:
            for name, w in e.get("weights", {}).items():
                label = _map_label(name) if "probabilities" in e else name
                xs, ys = series.setdefault(label, ([], []))
                xs.append(start + int(e.get("update", 0)))
                ys.append(w)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "-", label=label, linewidth=1.2)
    for b in starts[1:]:
        ax.axvline(b, linestyle="--", color="gray", alpha=0.6)
    ax.set_title("weights over the updates (steps " + ", ".join(str(t["step"]) for t in traces) + ")")
    ax.set_xlabel("update")
    ax.set_ylabel("weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=min(5, max(1, len(series))), loc="best")
    for k, m in enumerate(maps):
        pax = fig.add_subplot(grid[1 + k // ncols, k % ncols])
        curves: Dict[str, tuple] = {}
        for t, start in zip(traces, starts):
            for e in t["trace"]:
                for scheme, p in e.get("probabilities", {}).get(m, {}).items():
                    xs, ys = curves.setdefault(scheme, ([], []))
                    xs.append(start + int(e.get("update", 0)))
                    ys.append(p)
        for scheme, (xs, ys) in curves.items():
            pax.plot(xs, ys, "-", label=scheme)
        for b in starts[1:]:
            pax.axvline(b, linestyle="--", color="gray", alpha=0.6)
        pax.set_ylim(0, 1)
        pax.set_title(f"{_map_label(m)}: scheme probabilities", fontsize=9)
        pax.grid(alpha=0.3)
        if k == 0:
            pax.legend(fontsize=7)
    return save_figure(fig, path)


def format_number(v: Optional[float], width: int = 6) -> str:
    """``71.234 -> ' 71.2'``; None -> '-' right-aligned."""
    return f"{'-':>{width}}" if v is None else f"{v:{width}.1f}"


def _short_classes(classes: Sequence[str], limit: int = 28) -> str:
    text = ",".join(classes)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(summary: dict) -> str:
    """The per-step table of one run (mIoU old / new / all in percent)."""
    lines = [f"{summary.get('method')} | {summary.get('dataset')} | task {summary.get('task')}"]
    lines.append(f"{'step':>4}  {'classes':<28}  {'old':>6}  {'new':>6}  {'all':>6}")
    for e in summary["steps"]:
        lines.append(
            f"{e['step']:>4}  {_short_classes(e['classes']):<28}  {format_number(e['miou_old'])}  "
            f"{format_number(e['miou_new'])}  {format_number(e['miou_all'])}"
        )
    return "\n".join(lines)


def write_reports(out: PathLike, summary: dict, base_classes: Sequence[str], prefix: str = "") -> Dict[str, Path]:
    """summary.json, metrics.csv and miou.png in ``out`` (with an optional file-name prefix)."""
    out = Path(out)
    paths = {
        "summary": write_summary(out / f"{prefix}summary.json", summary),
        "metrics": write_metrics_csv(out / f"{prefix}metrics.csv", summary, base_classes),
    }
    png = plot_miou(out / f"{prefix}miou.png", summary)
    if png is not None:
        paths["plot"] = png
    return paths
