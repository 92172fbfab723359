"""torchvision classifiers, with the small-image stem the paper uses for 32x32 inputs.

ResNet-10 is torchvision's ResNet with one BasicBlock per stage; any ResNet name takes a width
suffix (`resnet10-w16`: base width 16 instead of 64). For inputs of 32 pixels or less
the stem becomes a 3x3 stride-1 convolution without max-pooling (the paper's CIFAR variant), so
8x8 digits keep their resolution into the first stage.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

# name -> (block, blocks per stage) of torchvision's ResNets; resnet10 has one BasicBlock per stage.
_RESNETS = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}
ARCHITECTURES = (*_RESNETS, "densenet121")
# A ResNet name with "-w<N>" (resnet10-w16) has base width N instead of 64: stages of N, 2N, 4N,
# 8N channels, about (N / 64)^2 of the compute. The width that fits a 2-core CPU (issue 12).
_WIDTH_SUFFIX = "-w"


def parse_arch(arch: str) -> tuple[str, int | None]:
    """(base architecture, ResNet base width or None) of an --arch name; ValueError if unknown."""
    if not isinstance(arch, str):
        raise TypeError(f"arch: expected a name, got {type(arch).__name__}")
    base, sep, width = arch.partition(_WIDTH_SUFFIX)
    known = ", ".join(ARCHITECTURES) + "; a ResNet with -w<width> (resnet10-w16)"
    if base not in ARCHITECTURES or (sep and base not in _RESNETS):
        raise ValueError(f"arch={arch!r}: unknown; choose one of {known}")
    if not sep:
        return base, None
    if not width.isdigit() or not 1 <= int(width) <= 1024 or width != str(int(width)):
        raise ValueError(f"arch={arch!r}: the width after -w must be a whole number from 1 to 1024")
    return base, int(width)


class _ResNet(tvm.ResNet):
    """torchvision's ResNet (its blocks, layer builder and initialization) with base width
    `width` where torchvision fixes 64."""

    def __init__(self, block, layers, num_classes: int, width: int):
        super().__init__(block, layers, num_classes=num_classes)  # torchvision's init, at width 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialization, for the rebuilt modules
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """A randomly initialized torchvision model (no pretrained weights: nothing is downloaded)."""
    small = image_size <= 32
    base, width = parse_arch(arch)
    if base == "densenet121":
        model = tvm.densenet121(weights=None, num_classes=num_classes)
        width = model.features.conv0.out_channels
        stride, kernel = (1, 3) if small else (2, 7)
        model.features.conv0 = nn.Conv2d(in_channels, width, kernel, stride, kernel // 2, bias=False)
        if small:
            model.features.pool0 = nn.Identity()
        return model
    block, layers = _RESNETS[base]
    if width is None:
        model = tvm.ResNet(block, layers, num_classes=num_classes)
    else:
        model = _ResNet(block, layers, num_classes, width)
    width = model.conv1.out_channels
    if small:
        model.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512):
    """Yields (start, logits) over `images` in batches, in eval mode: ready for Accumulator.update."""
    model.eval()
    for start in range(0, images.shape[0], batch_size):
        yield start, model(images[start : start + batch_size]).float()
