"""ResNet backbones for DeepLabV3 (docs/MATHEMATICS.md §1.2, §6.4), written from scratch.

Parameter names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ...), so ImageNet checkpoints in torchvision format load
directly with :func:`load_pretrained`. There is no ``fc`` layer.

Output stride: the stem and stages 1-2 always reduce by 4 and 8. For output stride
16 stage 4 keeps stride 1 and dilates (2); for 8 stages 3 and 4 dilate (2, 4), as
torchvision's ``replace_stride_with_dilation`` does (the first block of a dilated
stage uses the previous dilation in its 3x3 convolution).

Each stage exposes its output *before the final ReLU of its last block* (the map that
PLOP/LSKD distil); the next stage receives the ReLU of it.

Backbones: ``resnet18`` (BasicBlock [2, 2, 2, 2]), ``resnet50`` (Bottleneck [3, 4, 6, 3]),
``resnet101`` (Bottleneck [3, 4, 23, 3]) and ``tiny`` (BasicBlock [1, 1, 1, 1], widths
16/32/64/128, stem 16 channels; a CPU demo model, not meant for ImageNet weights).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "BACKBONES",
    "build_resnet",
    "load_pretrained",
]


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34, tiny).

    ``forward_pre_relu(x [N, Cin, H, W]) -> [N, planes, H/stride, W/stride]`` (the residual
    sum, before the final ReLU); ``forward`` applies that ReLU.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_pre_relu(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.forward_pre_relu(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 bottleneck, torchvision's v1.5 layout (ResNet-50/101).

    ``forward_pre_relu(x [N, Cin, H, W]) -> [N, 4 * planes, H/stride, W/stride]``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward_pre_relu(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.forward_pre_relu(x))


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """ResNet trunk without the classification head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage (4 entries).
        widths: ``planes`` of the four stages (the output channels are ``planes * expansion``).
        stem_width: channels of the 7x7 stem convolution.
        output_stride: 16 or 8 (32 = no dilation is accepted too).

    ``forward(x [N, 3, H, W]) -> (maps, out)``: ``maps`` = the four stage outputs before
    the last block's final ReLU, of shapes ``[N, channels[i], H/4, W/4]``, ``[.., H/8, ..]``,
    ``[.., H/16, ..]`` and ``[.., H/os, ..]`` (stage 3 at H/8 for os 8; sizes rounded up as
    strided convolutions do); ``out = relu(maps[3])``, the input of the decoder.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"ResNet: output_stride must be 8, 16 or 32, got {output_stride}")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError("ResNet: layers and widths must have 4 entries (one per stage)")
        dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}[output_stride]
        self.output_stride = output_stride
        self.inplanes = stem_width
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], 1, False)
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, dilate[2])
        self.channels: List[int] = [w * block.expansion for w in widths]
        del self.inplanes, self.dilation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            mods.append(block(self.inplanes, planes, 1, None, self.dilation))
        return nn.Sequential(*mods)

    def stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps: List[torch.Tensor] = []
        for stage in self.stages():
            for blk in stage[:-1]:
                x = blk(x)
            pre = stage[-1].forward_pre_relu(x)
            maps.append(pre)
            x = F.relu(pre)  # not in place: ``pre`` is returned
        return maps, x


_SPECS: Dict[str, dict] = {
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    "tiny": dict(block=BasicBlock, layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16),
}
BACKBONES: Tuple[str, ...] = tuple(_SPECS)


def build_resnet(name: str, output_stride: int = 16) -> ResNet:
    """Build one of :data:`BACKBONES` (``"resnet18" | "resnet50" | "resnet101" | "tiny"``)."""
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    return ResNet(output_stride=output_stride, **_SPECS[name])


def _read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pretrained: no such file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"load_pretrained: cannot read {path} as a torch state dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"load_pretrained: {path} does not hold a state dict (a dict of tensors)")
    out = {}
    for k, v in obj.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def _short(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a torchvision-format ImageNet ResNet state dict from a local file.

    ``model`` is a :class:`ResNet` or any module with a ``backbone`` ResNet attribute
    (e.g. :class:`lskd.models.DeepLabV3`). Keys ``fc.*`` are ignored, a ``module.``
    prefix is stripped and a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is
    unwrapped; missing ``num_batches_tracked`` buffers (old checkpoints) are allowed.
    Any other missing or unexpected key, or a shape mismatch, raises ``ValueError``
    listing them (e.g. a ResNet-50 file for a ResNet-101 model). Returns ``model``.
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, ResNet):
        raise TypeError(f"load_pretrained: expected a ResNet or a model with a .backbone ResNet, got {type(model)}")
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"load_pretrained: {path} does not match the backbone"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {_short(wrong, 6)}")
        raise ValueError("; ".join(parts))
    backbone.load_state_dict(state, strict=False)
    return model
