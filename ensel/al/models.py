"""torchvision classifiers, with the small-image stem the paper uses for 32x32 inputs.

ResNet-10 is torchvision's ResNet with one BasicBlock per stage. For inputs of 32 pixels or less
the stem becomes a 3x3 stride-1 convolution without max-pooling (the paper's CIFAR variant), so
8x8 digits keep their resolution into the first stage.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

_RESNETS = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
}
ARCHITECTURES = ("resnet10", *_RESNETS, "densenet121")


def build_model(arch: str, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """A randomly initialized torchvision model (no pretrained weights: nothing is downloaded)."""
    small = image_size <= 32
    if arch == "resnet10":
        model = tvm.ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    elif arch in _RESNETS:
        model = _RESNETS[arch](weights=None, num_classes=num_classes)
    elif arch == "densenet121":
        model = tvm.densenet121(weights=None, num_classes=num_classes)
        width = model.features.conv0.out_channels
        stride, kernel = (1, 3) if small else (2, 7)
        model.features.conv0 = nn.Conv2d(in_channels, width, kernel, stride, kernel // 2, bias=False)
        if small:
            model.features.pool0 = nn.Identity()
        return model
    else:
        raise ValueError(f"arch={arch!r}: unknown; choose one of {', '.join(ARCHITECTURES)}")
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
