"""Turn a pytest-benchmark JSON into the Markdown table of the README.

    python benches/summarize.py results.json [--markdown out.md]

One row per (op, shape, dtype, backend): median time, speed-up over the eager
reference and over torch.compile of it (same run), bytes floor, achieved GB/s,
fraction of the measured copy bandwidth, time over the floor, peak extra memory.
Training benchmarks get their own tables: seconds per iteration per weighting / search variant
(test_bench_training.py), and milliseconds per whole training step per method with the ratios to
LSKD's floor (c) and to LSKD as released (f) and the peak memory (test_bench_step.py).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def rows(data):
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "floor_ms" not in e:  # not an operator benchmark (training, overhead)
            continue
        groups[(e["op"], e["shape"], e["dtype"])][e["backend"]] = (b["stats"]["median"], e)
    out = []
    for (op, shape, dtype), by_backend in groups.items():
        eager = by_backend.get("eager", (None,))[0]
        comp = by_backend.get("compile", (None,))[0]
        for backend, (median, e) in by_backend.items():
            out.append(
                {
                    "op": op,
                    "shape": shape,
                    "dtype": dtype,
                    "backend": backend,
                    "ms": median * 1e3,
                    "vs_eager": eager / median if eager else None,
                    "vs_compile": comp / median if comp else None,
                    "floor_ms": e["floor_ms"],
                    "x_floor": median * 1e3 / e["floor_ms"],
                    "GBps": e["achieved_GBps"],
                    "bw_frac": e["fraction_of_copy_bw"],
                    "peak_MB": e.get("peak_extra_MB"),
                }
            )
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(data) -> str:
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    head = (
        f"device: {first.get('gpu') or first.get('device')} | torch {first.get('torch')} | "
        f"measured copy bandwidth {fmt(first.get('copy_bandwidth_GBps'), '.0f')} GB/s\n\n"
    )
    lines = [
        "| op | shape | dtype | backend | median ms | vs eager | vs compile | floor ms | x floor | GB/s "
        "| % copy BW | peak extra MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(data):
        if r["floor_ms"] < 1e-3:  # fixed-cost (overhead) rows: no meaningful memory floor
            r.update(x_floor=None, bw_frac=None)
        lines.append(
            f"| {r['op']} | {r['shape'] if len(r['shape']) < 30 else 'six LSKD maps'} | {r['dtype']} "
            f"| {r['backend']} | {r['ms']:.3f} | {fmt(r['vs_eager'], '.1f')} | {fmt(r['vs_compile'], '.1f')} "
            f"| {r['floor_ms']:.3f} | {fmt(r['x_floor'], '.1f')} | {r['GBps']:.1f} "
            f"| {fmt(r['bw_frac'] and 100 * r['bw_frac'], '.0f')} | {fmt(r['peak_MB'], '.0f')} |"
        )
    return head + "\n".join(lines) + "\n" + compile_note(data)


def compile_note(data) -> str:
    """One line per torch.compile benchmark: its first call (compilation or cache loading + one step)."""
    notes = []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("backend") == "compile" and e.get("first_call_s") is not None:
            cache = (
                ", ".join(f"{k} {v}" for k, v in sorted((e.get("compile_cache") or {}).items())) or "no cache events"
            )
            notes.append(f"{e['op']} {e['dtype']} {e['first_call_s']:.1f} s ({cache})")
    return "\ntorch.compile first call: " + "; ".join(notes) + "\n" if notes else ""


def training_table(data) -> str:
    """Seconds per training iteration per weighting / search variant (benches/test_bench_training.py)."""
    runs = {
        b["extra_info"]["variant"]: b["extra_info"]
        for b in data["benchmarks"]
        if b["extra_info"].get("kind") == "training"
    }
    if not runs:
        return ""
    first = next(iter(runs.values()))
    base = runs.get("fixed", {}).get("s_per_iter")
    lines = [
        f"training iteration, LSKD step 1 ({first['backbone']}, {first['size']}x{first['size']}, "
        f"batch {first['batch']}) "
        f"on {first.get('gpu') or first.get('device')}",
        "",
        "| variant | s / iteration | vs fixed | s / search iteration | search vs fixed |",
        "|---|---|---|---|---|",
    ]
    for name, e in runs.items():
        s_it, s_se = e["s_per_iter"], e.get("s_per_iter_search")
        lines.append(
            f"| {name} | {s_it:.3f} | {fmt(s_it / base if base else None, '.2f')} | {fmt(s_se, '.3f')} | "
            f"{fmt(s_se / base if base and s_se else None, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def step_table(data) -> str:
    """Milliseconds per training iteration (benches/test_bench_step.py), one table per dtype: each
    variant's median, its ratio to LSKD's floor (c) and to LSKD as released (f) of the same dtype and
    run, and the GPU's peak allocated memory (MiB: models, optimiser state, activations)."""
    runs = [b["extra_info"] for b in data["benchmarks"] if b["extra_info"].get("kind") == "step"]
    if not runs:
        return ""
    out = []
    for dtype in dict.fromkeys(e["dtype"] for e in runs):  # in the order they ran
        of = {e["variant"]: e for e in runs if e["dtype"] == dtype}
        floor, released = (of.get(k, {}).get("ms_per_iter") for k in ("c-floor", "f-released"))
        first = next(iter(of.values()))
        where = first.get("gpu") or f"{first.get('device')} ({first.get('threads', '?')} thread(s))"
        out += [
            f"training step, {first['backbone']} (output stride {first['output_stride']}), "
            f"{first['size']}x{first['size']}, batch {first['batch']}, {dtype}"
            f"{' (autocast)' if dtype != 'float32' else ''}, median of {first['rounds']} rounds, "
            f"on {where}",
            "",
            "| variant | ms / iteration | x (c) floor | x (f) released | peak MiB |",
            "|---|---|---|---|---|",
        ]
        for e in of.values():
            ms = e["ms_per_iter"]
            out.append(
                f"| {e.get('label', e['variant'])} | {ms:.1f} | {fmt(ms / floor if floor else None, '.2f')} "
                f"| {fmt(ms / released if released else None, '.2f')} | {fmt(e.get('peak_MB'), '.0f')} |"
            )
        if first.get("memory_note"):
            out.append(f"\nmemory: {first['memory_note']}")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="pytest-benchmark JSON file")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()
    with open(args.json) as fh:
        data = json.load(fh)
    text = "\n".join(t for t in (table(data) if rows(data) else "", training_table(data), step_table(data)) if t)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
