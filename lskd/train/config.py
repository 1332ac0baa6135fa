"""A run's settings (``TrainConfig``), their checks, and which of them make the run's identity.

Every setting that changes a run's results (seed, epochs, batch, crop, learning rates, weight
decay, term weights, weighting and search settings, backbone, ...) is part of the run: a run
directory holds one set of them (``OUT/config.json``), and ``--resume`` or ``--step`` into that
directory with any of them changed is refused with the list of differences
(:func:`settings_differences`). The settings in :data:`FREE_SETTINGS` only say where and how a
process runs and may change between invocations.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Dict, List, Optional

import torch

from ..weighting import WEIGHTINGS

__all__ = [
    "TrainConfig",
    "RunError",
    "TrainingDiverged",
    "DATASETS",
    "DEFAULT_EPOCHS",
    "AMP_DTYPES",
    "BN_MODES",
    "PSEUDO_THRESHOLDS",
    "FREE_SETTINGS",
    "settings_differences",
]

#: CLI dataset names -> lskd.data.load_dataset kinds.
DATASETS: Dict[str, str] = {"voc": "voc", "ade": "ade20k", "folder": "folder"}
#: Epochs per step by dataset (the papers' protocols).
DEFAULT_EPOCHS: Dict[str, int] = {"voc": 30, "ade": 60, "folder": 30}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
#: The student's BatchNorm in steps > 0: "train" (batch statistics, updated running statistics)
#: or "frozen" (running statistics, not updated; affine parameters frozen: the release's --fix_bn).
BN_MODES = ("train", "frozen")
#: PLOP / LSKD pseudo-label thresholds: the exact per-class median (the papers) or the release's rule.
PSEUDO_THRESHOLDS = ("median", "released")

#: The student's and teacher's memory formats (--memory-format).
MEMORY_FORMATS = ("channels_last", "contiguous")
#: What --compile runs through torch.compile.
COMPILE_TARGETS = ("none", "teacher", "student", "both")

#: Settings that do not change results: where the run lives and its data are (a run directory
#: and a dataset may move), the device, workers, verbosity, the evaluation batch, what this
#: invocation does (--step, --resume, --init-from) and the speed options (memory format,
#: compile), which change the numbers by float rounding only, as another device would.
FREE_SETTINGS = frozenset(
    {
        "out",
        "data_root",
        "device",
        "workers",
        "quiet",
        "eval_batch_size",
        "step",
        "resume",
        "init_from",
        "memory_format",
        "compile",
    }
)


class RunError(ValueError):
    """A run that cannot start or continue (bad settings, an existing run, missing checkpoints)."""


class TrainingDiverged(RunError):
    """A loss term became non-finite during training."""


@dataclass
class TrainConfig:
    """Settings of a run (the CLI's ``lskd train`` options; saved as ``OUT/config.json``).

    epochs / epochs_next: epochs of step 0 / of the later steps (None: by dataset; the later steps
    default to ``epochs``). lr / lr_next: base learning rate of step 0 / later steps.
    batch_size: the GLOBAL batch (split over the ranks). eval_size: None = full-resolution
    evaluation; an int resizes the shorter side and centre-crops. eval_batch_size: per rank
    (default: the per-rank training batch; images of different sizes are padded with 255 labels).
    step: train this step only (the previous one must exist in ``out`` or come from
    ``init_from``). init_from: a ``step{k}.pt`` checkpoint (e.g. a shared step 0) to start step
    ``k + 1`` from. term_weights: fixed weight per loss-term name (default 1). bn: the student's
    BatchNorm in steps > 0 (:data:`BN_MODES`). pseudo_threshold: PLOP / LSKD's pseudo-label
    threshold rule (:data:`PSEUDO_THRESHOLDS`). memory_format: the models' and images' layout
    (:data:`MEMORY_FORMATS`; channels-last is the faster one on both CPU and GPU convolutions).
    compile: which models run through ``torch.compile`` (:data:`COMPILE_TARGETS`; the first
    iteration of a step then compiles for tens of seconds).
    """

    dataset: str
    data_root: str
    task: str
    method: str
    out: str
    disjoint: bool = False
    backbone: str = "resnet101"
    pretrained: Optional[str] = None
    output_stride: int = 16
    epochs: Optional[int] = None
    epochs_next: Optional[int] = None
    batch_size: int = 24
    lr: float = 0.01
    lr_next: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_power: float = 0.9
    crop: int = 512
    eval_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    amp: str = "none"
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    step: Optional[int] = None
    resume: bool = False
    init_from: Optional[str] = None
    quiet: bool = False
    weighting: str = "fixed"
    term_weights: Dict[str, float] = field(default_factory=dict)
    weight_lr: Optional[float] = None
    search: str = "none"
    search_epochs: int = 1
    search_split: float = 0.1
    search_order: int = 1
    search_lr: float = 3e-3
    train_split: str = "train"
    val_split: str = "val"
    bn: str = "train"
    pseudo_threshold: str = "median"
    memory_format: str = "channels_last"
    compile: str = "none"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise RunError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        if self.amp not in AMP_DTYPES:
            raise RunError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        self._check_counts()
        self._check_rates()
        if self.resume and self.init_from:
            raise RunError("--resume continues the run in --out; it cannot be combined with --init-from")
        if self.weighting not in WEIGHTINGS:
            raise RunError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.weighting != "fixed" and self.term_weights:
            raise RunError(
                f"--term-weights sets fixed weights; it cannot be combined with --weighting {self.weighting}"
            )
        if self.bn not in BN_MODES:
            raise RunError(f"--bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        if self.pseudo_threshold not in PSEUDO_THRESHOLDS:
            raise RunError(
                f"--pseudo-threshold must be one of {', '.join(PSEUDO_THRESHOLDS)}, got {self.pseudo_threshold!r}"
            )
        for name, allowed in (("memory_format", MEMORY_FORMATS), ("compile", COMPILE_TARGETS)):
            if getattr(self, name) not in allowed:
                raise RunError(f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.compile in ("student", "both") and (self.weighting != "fixed" or self.search != "none"):
            raise RunError(
                f"--compile {self.compile} needs --weighting fixed and no --search: RGE, GradNorm and the "
                "search take one gradient per term through the student's graph, which a compiled backward "
                "refuses (and would run whole each time); use --compile teacher"
            )
        if self.search not in ("none", "bilevel"):
            raise RunError(f"--search must be 'none' or 'bilevel', got {self.search!r}")
        if self.search == "bilevel":
            self._check_search()

    def _check_counts(self) -> None:
        for name in ("batch_size", "crop"):
            if int(getattr(self, name)) < 1:
                raise RunError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "epochs_next", "eval_size", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise RunError(f"--{_flag(name)} must be >= 1, got {v}")
        if self.workers < 0:
            raise RunError(f"--workers must be >= 0, got {self.workers}")

    def _check_rates(self) -> None:
        """Learning rates > 0 and every real-valued setting finite (a NaN would train silently)."""
        for name in ("lr", "lr_next", "momentum", "weight_decay", "lr_power"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise RunError(f"--{_flag(name)} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("lr", "lr_next"):
            if not float(getattr(self, name)) > 0:
                raise RunError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.weight_lr is not None and not (math.isfinite(self.weight_lr) and self.weight_lr > 0):
            raise RunError(f"--weight-lr must be a finite number > 0, got {self.weight_lr}")

    def _check_search(self) -> None:
        if self.method.lower() != "lskd":
            raise RunError(
                f"--search bilevel searches LSKD's per-map schemes; it needs --method lskd, not {self.method!r}"
            )
        if self.weighting != "fixed" or self.term_weights:
            raise RunError(
                "--search bilevel learns the per-map weights itself; "
                "use it with --weighting fixed and no --term-weights"
            )
        if int(self.search_epochs) < 1:
            raise RunError(f"--search-epochs must be >= 1, got {self.search_epochs}")
        if not 0.0 < float(self.search_split) < 1.0:
            raise RunError(f"--search-split must be a fraction in (0, 1), got {self.search_split}")
        if int(self.search_order) not in (1, 2):
            raise RunError(f"--search-order must be 1 or 2, got {self.search_order}")
        if not (math.isfinite(self.search_lr) and self.search_lr > 0):
            raise RunError(f"--search-lr must be a finite number > 0, got {self.search_lr}")

    @property
    def epochs_step0(self) -> int:
        return int(self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.dataset])

    @property
    def epochs_later(self) -> int:
        return int(self.epochs_next if self.epochs_next is not None else self.epochs_step0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _flag(name: str) -> str:
    return name.replace("_", "-")


def settings_differences(saved: dict, cfg: TrainConfig) -> List[str]:
    """The result-changing settings in which ``cfg`` differs from a run's saved config, one line
    each (``--lr-next: the run has 0.001, this command gives 0.1``); empty when they agree.

    The method is compared case-insensitively (it is stored as given); a setting missing from an
    older config.json counts as its default.
    """
    now = cfg.to_dict()
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    diffs = []
    for name, value in now.items():
        if name in FREE_SETTINGS:
            continue
        before = saved.get(name, defaults.get(name, {} if name == "term_weights" else None))
        if name == "method":
            before, value = str(before).lower(), str(value).lower()
        if before != value:
            diffs.append(f"--{_flag(name)}: the run has {before!r}, this command gives {value!r}")
    return diffs
