"""Per-term losses and gradient norms across one step of a finished run (a diagnosis tool).

For step ``t`` of the run in ``RUN`` (an ``lskd train`` output directory, e.g. one method of a
demo), on the step's first training batch:

* the student at the start of the step (the model after step t - 1 with the new classifier, as
  training starts) and at its end (``step{t}.pt``), on a copy, with its BatchNorm in train mode
  (batch statistics, as trained in train mode) and in eval mode (running statistics): at the
  start the eval-mode feature terms are 0, so what train mode shows then is the BatchNorm gap,
  and at the end the eval-mode values are the drift from the teacher;
* every term of the method, the L2 norm of its gradient with respect to all the student's
  parameters, and the cosine between that gradient and the CE gradient (negative: the term
  pulls against learning the new class);
* the per-epoch term means of the step from ``history.json`` (first and last epoch).

    python benches/term_probe.py runs/demo-full/seed0/plop --step 4 [--json out.json]

Nothing is written into ``RUN``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

from lskd.train import TrainConfig
from lskd.train.batching import mix_seed
from lskd.train.step import StepTrainer
from lskd.train.trainer import Trainer


def _trainer(run: Path) -> Trainer:
    cfg = json.loads((run / "config.json").read_text())["config"]
    cfg.update(quiet=True, resume=False, init_from=None, step=None, device="cpu", workers=0)
    return Trainer(TrainConfig.from_dict(cfg))


def _first_batch(step: StepTrainer):
    seed = mix_seed(step.cfg.seed, step.t, 0)
    batch = step._batches(len(step.subset), 0, 0)[:1]
    return next(iter(step.run.loader(step.subset, batch, seed)))


def _grad_rows(step: StepTrainer, student, images, labels, train_mode: bool) -> Dict[str, dict]:
    """{term: {"value", "grad_norm", "cos_ce"}} of ``student`` (BatchNorm in train or eval mode, on a copy)."""
    method = step.run.method
    probe = copy.deepcopy(student).train(train_mode)
    params = [p for p in probe.parameters() if p.requires_grad]
    with torch.no_grad():
        t_out, bctx = method.teacher_forward(step.teacher, images, labels, step.ctx)
    terms = method.terms(images, labels, probe(images), t_out, bctx)
    grads = {}
    for name, value in terms.items():
        g = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
    ce = grads.get("ce")
    rows = {}
    for name, g in grads.items():
        norm = float(g.norm())
        cos = float(torch.dot(g, ce) / (norm * ce.norm())) if ce is not None and norm > 0 and ce.norm() > 0 else None
        rows[name] = {"value": float(terms[name].detach()), "grad_norm": norm, "cos_ce": cos}
    return rows


def probe(run: Path, t: int) -> dict:
    """The measurements above as a dict (``{"train"|"eval": {"start", "end"}}``, ``epochs``, ``weights``)."""
    trainer = _trainer(run)
    ckpts = run / "checkpoints"
    prev = trainer.load_step_model(ckpts / f"step{t - 1}.pt", t - 1)
    step = StepTrainer(trainer, t, prev)
    if step.run.method.needs_prepare_step:
        step.run.method.prepare_step(step.teacher, trainer.prepare_batches(step.subset, t), step.ctx)
    images, labels = _first_batch(step)
    end = trainer.load_step_model(ckpts / f"step{t}.pt", t)
    history = [h for h in json.loads((run / "history.json").read_text()) if h.get("step") == t]
    summary = json.loads((run / "summary.json").read_text())
    entry = next(e for e in summary["steps"] if e["step"] == t)
    return {
        "run": str(run),
        "step": t,
        **{
            mode: {
                "start": _grad_rows(step, step.student, images, labels, mode == "train"),
                "end": _grad_rows(step, end, images, labels, mode == "train"),
            }
            for mode in ("train", "eval")
        },
        "epochs": {
            "first": history[0].get("losses") if history else None,
            "last": history[-1].get("losses") if history else None,
        },
        "weights": entry.get("weights"),
    }


def format_probe(r: dict) -> str:
    lines = []
    for mode in ("train", "eval"):
        lines.append(f"{r['run']} step {r['step']} (first batch; student BatchNorm in {mode} mode)")
        lines.append(
            f"{'term':<6} {'start: value':>13} {'|grad|':>9} {'cos(ce)':>8}   "
            f"{'end: value':>11} {'|grad|':>9} {'cos(ce)':>8}  weight"
        )
        for name, s in r[mode]["start"].items():
            e = r[mode]["end"][name]
            cs = "-" if s["cos_ce"] is None else f"{s['cos_ce']:.3f}"
            ce_ = "-" if e["cos_ce"] is None else f"{e['cos_ce']:.3f}"
            w = (r.get("weights") or {}).get(name)
            lines.append(
                f"{name:<6} {s['value']:>13.4g} {s['grad_norm']:>9.3g} {cs:>8}   "
                f"{e['value']:>11.4g} {e['grad_norm']:>9.3g} {ce_:>8}  {'-' if w is None else f'{w:.2f}'}"
            )
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="an lskd train output directory")
    ap.add_argument("--step", type=int, required=True, help="the step t > 0 to probe")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    r = probe(args.run, args.step)
    print(format_probe(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
