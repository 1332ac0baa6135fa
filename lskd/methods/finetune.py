"""Fine-tuning: cross-entropy on the step's labels only (the lower bound of CISS)."""

from __future__ import annotations

from .base import IGNORE_INDEX, Method

__all__ = ["Finetune"]


class Finetune(Method):
    """``terms -> {"ce": CE(upsampled logits [N, K, H, W], labels [N, H, W], ignore 255)}``,
    averaged over the non-ignored pixels, over all K output channels. No teacher."""

    name = "finetune"
    needs_teacher = False
    teacher_passes = 0

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index
