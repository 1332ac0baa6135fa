"""Fine-tuning: cross-entropy on the step's labels only (the lower bound of CISS)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..models.deeplab import SegOutput
from .base import IGNORE_INDEX, Method, StepContext, cross_entropy

__all__ = ["Finetune"]


class Finetune(Method):
    """``terms -> {"ce": CE(upsampled logits [N, K, H, W], labels [N, H, W], ignore 255)}``,
    averaged over the non-ignored pixels, over all K output channels. No teacher."""

    name = "finetune"
    needs_teacher = False
    teacher_passes = 0

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def terms(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        student_out: SegOutput,
        teacher_out: Optional[SegOutput],
        ctx: StepContext,
    ) -> Dict[str, torch.Tensor]:
        return {"ce": cross_entropy(student_out.logits, labels, self.ignore_index)}
