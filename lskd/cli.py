"""Command line: ``lskd {train,eval,demo,make-synthetic}`` (also ``python -m lskd``).

Examples::

    lskd make-synthetic --out data/synth --classes 6
    lskd train --dataset folder --data-root data/synth --task 3-1 --method lskd --out runs/x \\
        --backbone tiny --epochs 10 --batch-size 32 --crop 64
    torchrun --nproc_per_node=4 -m lskd train --dataset voc --data-root VOC2012 --task 15-1 \\
        --method lskd --out runs/voc-15-1-lskd --pretrained resnet101.pth --amp bf16
    lskd eval --out runs/x
    lskd demo            # the synthetic benchmark of every method (~10 min on 2 CPU cores)

Errors in the input (missing data, bad task string, a checkpoint of another run, a run directory
in use, a diverging run, a read-only or full disk, ...) print one ``lskd <command>: error: ...``
line and exit with status 2, without writing a summary.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _error_message(e: BaseException) -> str:
    """One line for a user error or a failed file operation (read-only folder, full disk)."""
    if isinstance(e, OSError) and not isinstance(e, USER_ERRORS) and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        return f"cannot write or read{where}: {e.strerror} (errno {e.errno})"
    return str(e) or type(e).__name__


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train every step of a class-incremental task (or one step) and evaluate after each",
        description=(
            "Train the steps of a class-incremental task in order, evaluate after each step, and write "
            "OUT/summary.json, OUT/metrics.csv and OUT/miou.png. Defaults follow the papers (SGD, "
            "momentum 0.9, Nesterov, weight decay 1e-4, poly lr 0.9, lr 0.01 / 0.001, batch 24, crop 512, "
            "30 epochs for VOC and folders, 60 for ADE20K). Under torchrun it trains with DDP."
        ),
    )
    _train_what_args(p)
    _train_schedule_args(p)
    _train_run_args(p)
    _train_protocol_args(p)
    _train_weighting_args(p.add_argument_group("dynamic weights and scheme search (LSKD)"))
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-epoch lines")


def _train_what_args(p: argparse.ArgumentParser) -> None:
    """Data, task, method, output and model."""
    from .methods import METHODS
    from .models import BACKBONES

    p.add_argument(
        "--dataset",
        required=True,
        choices=["voc", "ade", "folder"],
        help="dataset layout (folder = VOC layout + classes.txt)",
    )
    p.add_argument("--data-root", required=True, help="dataset folder")
    p.add_argument("--task", required=True, help="task string: 'B-I' (15-1, 100-10), 'B-Ns' (15-5s) or 'offline'")
    p.add_argument("--disjoint", action="store_true", help="disjoint protocol (default: overlapped)")
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="CISS method")
    p.add_argument("--out", required=True, help="output folder of the run")
    p.add_argument(
        "--backbone", default="resnet101", choices=list(BACKBONES), help="ResNet backbone (default resnet101)"
    )
    p.add_argument("--pretrained", default=None, help="local torchvision-format ImageNet state dict of the backbone")
    p.add_argument("--output-stride", type=int, default=16, choices=[8, 16], help="output stride (default 16)")


def _train_schedule_args(p: argparse.ArgumentParser) -> None:
    """Epochs, batch, learning rates, crop, evaluation size, precision."""
    p.add_argument("--epochs", type=int, default=None, help="epochs of step 0 (default: 30 VOC/folder, 60 ADE)")
    p.add_argument("--epochs-next", type=int, default=None, help="epochs of the steps > 0 (default: --epochs)")
    p.add_argument("--batch-size", type=int, default=24, help="global batch, split over the ranks (default 24)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of step 0 (default 0.01)")
    p.add_argument("--lr-next", type=float, default=0.001, help="learning rate of the steps > 0 (default 0.001)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default 1e-4)")
    p.add_argument("--crop", type=int, default=512, help="training crop side (default 512)")
    p.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="evaluate at this size (shorter side + centre crop; default: full size)",
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="evaluation batch per rank (default: the training batch per rank)",
    )
    p.add_argument(
        "--amp",
        default="none",
        choices=["bf16", "fp16", "none"],
        help="mixed precision (default none; fp16 uses a GradScaler)",
    )
    p.add_argument(
        "--memory-format",
        default="channels_last",
        choices=["channels_last", "contiguous"],
        help="layout of the models and images (default channels_last: faster convolutions, same results "
        "up to float rounding)",
    )
    p.add_argument(
        "--compile",
        default="none",
        choices=["none", "teacher", "student", "both"],
        help="run these models through torch.compile (default none: each step's first iteration would "
        "compile for tens of seconds; worth it for long steps)",
    )


def _train_run_args(p: argparse.ArgumentParser) -> None:
    """Device, workers, seed and what this invocation does (--step, --resume, --init-from)."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: the GPU when present)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and augmentation")
    p.add_argument(
        "--step", type=int, default=None, help="train this step only (the previous step's checkpoint must exist)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="CKPT",
        help="start from a step-k checkpoint (e.g. a shared step 0) and train k+1..",
    )


def _train_protocol_args(p: argparse.ArgumentParser) -> None:
    """BatchNorm mode, pseudo-label rule, fixed term weights."""
    p.add_argument(
        "--bn",
        default="train",
        choices=["train", "frozen"],
        help="the student's BatchNorm in steps > 0: train (batch statistics; default) or frozen "
        "(running statistics, not updated, affine frozen: the release's --fix_bn)",
    )
    p.add_argument(
        "--pseudo-threshold",
        default="median",
        choices=["median", "released"],
        help="PLOP/LSKD pseudo-label thresholds: the exact per-class median of the entropy (the "
        "papers; default) or the released code's histogram rule (far above the median)",
    )
    p.add_argument(
        "--term-weights",
        default=None,
        metavar="NAME=W,...",
        help="fixed weights of loss terms (default 1), e.g. 'unkd=0.5'",
    )


def _train_weighting_args(g) -> None:
    """Dynamic weights (RGE, GradNorm) and the bi-level scheme search."""
    g.add_argument(
        "--weighting",
        default="fixed",
        choices=["fixed", "rge", "gradnorm"],
        help="trade-off weights of the loss terms: fixed (1, or --term-weights), rge (regularised "
        "gradient equilibrium, as released) or gradnorm (default fixed)",
    )
    g.add_argument(
        "--weight-lr",
        type=float,
        default=None,
        help="learning rate of the rge/gradnorm weights (default: the network's, same poly schedule)",
    )
    g.add_argument(
        "--search",
        default="none",
        choices=["none", "bilevel"],
        help="bilevel: learn each map's scheme {pod, md, md+mcd, none} and weight on held-out data "
        "during the first --search-epochs of every step > 0, then fix the argmax (needs --method lskd)",
    )
    g.add_argument(
        "--search-epochs", type=int, default=1, help="search epochs at the start of each step > 0 (default 1)"
    )
    g.add_argument(
        "--search-split",
        type=float,
        default=0.1,
        help="fraction of the step's training images held out for the upper level (default 0.1)",
    )
    g.add_argument(
        "--search-order",
        type=int,
        default=1,
        choices=[1, 2],
        help="1: hypergradient first order in the step size (default); 2: DARTS unrolled step",
    )
    g.add_argument(
        "--search-lr",
        type=float,
        default=3e-3,
        help="Adam learning rate of the scheme logits and weights (default 3e-3)",
    )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="re-evaluate a run from its checkpoints and saved config",
        description="Re-evaluate every step checkpoint of a run with the run's saved config; writes summary.json, "
        "metrics.csv and miou.png to --report-dir (default OUT/eval).",
    )
    p.add_argument("--out", required=True, help="the run's folder (the --out of lskd train)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one of the run)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help="evaluation batch per rank (default: the run's)"
    )
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the run's)")
    p.add_argument("--report-dir", default=None, help="where to write the reports (default OUT/eval)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the synthetic benchmark: joint, finetune, MiB, PLOP, LSKD (fixed-weight ablation, +search) "
        "on a multi-step task",
        description="Build a synthetic dataset (once), train joint, finetune, mib, plop, lskd (as released, with its "
        "RGE weights), lskd-fixed (the fixed-weight ablation) and lskd+search (bi-level scheme search) on a "
        "multi-step protocol of it with the tiny backbone "
        "(step 0 trained once and shared), print the old/new/all mIoU table and write OUT/summary.md, "
        "OUT/summary.json and OUT/comparison.png. About 7 minutes on 2 CPU cores; --quick about 1.5.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller, shorter version (CI: under 2 minutes)")
    p.add_argument(
        "--full",
        action="store_true",
        help="the benchmark: the default protocol with 3 seeds (or --seeds), mean ± std; `make benchmark` runs it "
        "for both --bn settings",
    )
    p.add_argument(
        "--bn",
        default="train",
        choices=["train", "frozen"],
        help="the student's BatchNorm in the later steps, as `lskd train --bn` (default train)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/demo-quick or runs/demo-full)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on the CPU, 2 on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the first training seed")
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="train every method with this many seeds (seed, seed+1, ...; step 0 shared per seed) and "
        "report mean and std (default 1, 3 with --full)",
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated subset of joint,finetune,mib,plop,lskd,lskd-fixed,lskd+search"
    )
    p.add_argument("--quiet", action="store_true", help="only the final table")


def _add_make_synthetic(sub) -> None:
    p = sub.add_parser(
        "make-synthetic",
        help="write the synthetic segmentation benchmark in the VOC layout",
        description="Write the procedural benchmark of lskd.data.make_synthetic (VOC layout + classes.txt); "
        "train on it with --dataset folder.",
    )
    p.add_argument("--out", required=True, help="output folder (must be empty, new, or a previous synthetic dataset)")
    p.add_argument("--classes", type=int, default=6, help="object classes K (default 6)")
    p.add_argument("--images", type=int, default=600, help="training images (default 600)")
    p.add_argument("--val-images", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="image format (default png)")


def build_parser() -> argparse.ArgumentParser:
    """The ``lskd`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lskd",
        description="Class-incremental semantic segmentation with layer-specific knowledge distillation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,demo,make-synthetic}")
    sub.required = True
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_make_synthetic(sub)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, cleanup_distributed, init_distributed, parse_weights, train

    # every option of `lskd train` is the TrainConfig field of the same name
    cfg = TrainConfig.from_dict({**vars(args), "term_weights": parse_weights(args.term_weights)})
    dctx = init_distributed(cfg.device)
    try:
        train(cfg, dctx)
    finally:
        cleanup_distributed(dctx)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import cleanup_distributed, evaluate_run, init_distributed

    dctx = init_distributed(args.device)
    try:
        evaluate_run(
            args.out,
            data_root=args.data_root,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            report_dir=args.report_dir,
            quiet=args.quiet,
            dctx=dctx,
        )
    finally:
        cleanup_distributed(dctx)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    run_demo(
        out=args.out,
        quick=args.quick,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
        methods=methods,
        quiet=args.quiet,
        seeds=args.seeds,
        full=args.full,
        bn=args.bn,
    )
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data import make_synthetic

    root = make_synthetic(
        args.out,
        classes=args.classes,
        images=args.images,
        size=args.size,
        seed=args.seed,
        val_images=args.val_images,
        image_format=args.format,
    )
    print(
        f"wrote the synthetic dataset ({args.classes} classes, {args.images} train + {args.val_images} val images of "
        f"{args.size}x{args.size}) to {root}; train on it with --dataset folder --data-root {root}"
    )
    return 0


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "demo": _cmd_demo,
    "make-synthetic": _cmd_make_synthetic,
}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``lskd`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("lskd: interrupted", file=sys.stderr)
        return 130
    except (*USER_ERRORS, OSError) as e:
        print(f"lskd {args.command}: error: {_error_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
