"""Joint training (the upper bound): fine-tuning on all classes in a single step.

The task is the "offline" one (one step with every class, labels untouched), so the
loss is the plain cross-entropy of :class:`~lskd.methods.finetune.Finetune`.
"""

from __future__ import annotations

from .finetune import Finetune

__all__ = ["Joint"]


class Joint(Finetune):
    """Alias of :class:`Finetune` named ``"joint"``; use it with the offline task (one step)."""

    name = "joint"
