"""DeepLabV3 with one 1x1 classifier per incremental step (docs/MATHEMATICS.md §1.2, §6.4).

Head: ASPP = a 1x1 branch, three 3x3 branches dilated 6/12/18 (12/24/36 at output
stride 8) and an image-pooling branch (global average pool -> 1x1 -> BN -> ReLU,
broadcast back), each ``aspp_channels`` wide with BN + ReLU; concatenated and
projected by 1x1 -> BN -> ReLU to ``aspp_channels`` (256; 64 for the tiny model):
the "pre-logits" (map 4). No dropout (so that a frozen teacher and its copy agree,
and the released distillation sees the same map). Classifiers: one ``Conv2d(C, n_t, 1)``
per step t; logits = their concatenation, at feature resolution (the caller
upsamples).

Choices where docs/MATHEMATICS.md is silent: torchvision-style ASPP (the image-pooling branch is
concatenated, not added as in MiB's head); plain ``BatchNorm2d`` everywhere (so in
training mode a device batch of 1 fails in the pooling branch, as in torchvision: use
>= 2 images per device or SyncBatchNorm across devices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BACKBONES, ResNet, build_resnet, load_pretrained

__all__ = ["SegOutput", "ASPP", "DeepLabV3"]


@dataclass
class SegOutput:
    """Output of :class:`DeepLabV3`.

    logits: ``[N, K, h, w]`` at feature resolution (h = ceil(H / os) for even strides).
    maps: the six distilled maps ``[stage1, stage2, stage3, stage4]`` (pre-ReLU, ``[N, C_i, h_i, w_i]``),
        the ASPP output ``[N, A, h, w]`` and the logits (the same tensor as ``logits``).
    """

    logits: torch.Tensor
    maps: List[torch.Tensor]


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> None:
        pad = 0 if kernel == 1 else dilation
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``[N, Cin, h, w] -> [N, channels, h, w]`` (>= 0, after ReLU)."""

    def __init__(self, in_channels: int, channels: int = 256, rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_ConvBNReLU(in_channels, channels, 1)])
        for r in rates:
            self.branches.append(_ConvBNReLU(in_channels, channels, 3, r))
        self.pool = _ConvBNReLU(in_channels, channels, 1)
        self.project = _ConvBNReLU(channels * (len(rates) + 2), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3(nn.Module):
    """DeepLabV3 for class-incremental segmentation.

    Args:
        backbone: ``"resnet101" | "resnet50" | "resnet18" | "tiny"``.
        classes_per_step: number of classes of each step learnt so far, e.g. ``[16]`` at
            step 0 of 15-1 (background included) or ``[16, 1, 1]`` to rebuild a step-2 model.
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
        pretrained: optional local path of a torchvision ImageNet state dict for the backbone.
        aspp_channels: width of the ASPP / pre-logits (default 256, 64 for ``"tiny"``).

    ``forward(x [N, 3, H, W]) -> SegOutput``. ``add_step(n_new)`` appends a classifier with
    MiB's balanced initialisation; ``freeze()`` makes a teacher.
    """

    def __init__(
        self,
        backbone: str,
        classes_per_step: Sequence[int],
        output_stride: int = 16,
        pretrained: Optional[str] = None,
        aspp_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"DeepLabV3: unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLabV3: output_stride must be 16 or 8, got {output_stride}")
        if len(classes_per_step) == 0 or any(int(n) < 1 for n in classes_per_step):
            raise ValueError(f"DeepLabV3: classes_per_step must be positive counts, got {list(classes_per_step)}")
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.backbone: ResNet = build_resnet(backbone, output_stride)
        if pretrained:
            load_pretrained(self.backbone, pretrained)
        if aspp_channels is None:
            aspp_channels = 64 if backbone == "tiny" else 256
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(self.backbone.channels[3], aspp_channels, rates)
        self.aspp_channels = aspp_channels
        self.classifiers = nn.ModuleList([nn.Conv2d(aspp_channels, int(n), 1) for n in classes_per_step])
        self._frozen = False
        self._bn_frozen = False

    # -- classes -------------------------------------------------------------------
    @property
    def classes_per_step(self) -> List[int]:
        return [c.out_channels for c in self.classifiers]

    @property
    def num_classes(self) -> int:
        """K, the total number of output channels (background included)."""
        return sum(self.classes_per_step)

    @torch.no_grad()
    def add_step(self, n_new: int, balanced: bool = True) -> nn.Conv2d:
        """Append a classifier for ``n_new`` classes; return it.

        With ``balanced`` (MiB): new weights = the background weights, new biases =
        ``b_bg - log(n_new + 1)``, and the background bias becomes the same value, so that
        every old probability is unchanged and the background probability is split evenly
        between the background and the new classes.
        """
        if int(n_new) < 1:
            raise ValueError(f"add_step: n_new must be >= 1, got {n_new}")
        ref = self.classifiers[0]
        new = nn.Conv2d(self.aspp_channels, int(n_new), 1).to(device=ref.weight.device, dtype=ref.weight.dtype)
        if balanced:
            bias = ref.bias[0] - math.log(n_new + 1)
            new.weight.copy_(ref.weight[0:1].expand_as(new.weight))
            new.bias.copy_(bias.expand_as(new.bias))
            ref.bias[0] = bias
        new.requires_grad_(not self._frozen)
        self.classifiers.append(new)
        return new

    # -- teacher -------------------------------------------------------------------
    def freeze(self) -> "DeepLabV3":
        """Eval mode for good (``train()`` keeps it in eval) and no gradients. Returns self."""
        self._frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> "DeepLabV3":
        """Undo :meth:`freeze`: ``train()`` switches modes again and every parameter takes
        gradients. Returns self (e.g. the student built from a copy of the previous teacher)."""
        self._frozen = False
        self.requires_grad_(True)
        return self

    def freeze_batchnorm(self) -> "DeepLabV3":
        """Keep every BatchNorm layer in eval mode for good (its running statistics normalise and
        are not updated) and freeze its affine parameters, as the release's ``--fix_bn``; the rest
        of the network trains. Call it before building the optimiser. Returns self."""
        self._bn_frozen = True
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "DeepLabV3":
        super().train(False if self._frozen else mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
        return self

    # -- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> SegOutput:
        stages, feat = self.backbone(x)
        pre_logits = self.aspp(feat)
        logits = torch.cat([c(pre_logits) for c in self.classifiers], dim=1)
        return SegOutput(logits=logits, maps=[*stages, pre_logits, logits])
