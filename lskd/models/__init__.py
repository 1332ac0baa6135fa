"""Segmentation models: DeepLabV3 on ResNet backbones (docs/MATHEMATICS.md §1.2, §6.4).

``DeepLabV3(backbone, classes_per_step, output_stride=16, pretrained=None)`` returns
:class:`SegOutput` (``logits``, the six distilled ``maps``); ``load_pretrained`` loads
torchvision-format ImageNet weights from a local file; ``convert_sync_batchnorm`` for DDP.
"""

from .deeplab import ASPP, DeepLabV3, SegOutput
from .resnet import BACKBONES, BasicBlock, Bottleneck, ResNet, build_resnet, load_pretrained
from .sync_bn import DistBatchNorm2d, convert_sync_batchnorm

__all__ = [
    "ASPP",
    "DeepLabV3",
    "SegOutput",
    "convert_sync_batchnorm",
    "DistBatchNorm2d",
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "load_pretrained",
]
