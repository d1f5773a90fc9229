"""ResNets: a stem, four stages of residual blocks, global average pool.

Stage ``i`` has ``width * 2**i`` channels times the block's expansion (1 for the BasicBlock of ResNet-10/18, 4 for
the Bottleneck of ResNet-50), stride 2 from the second stage on, so ``feature_dim`` is ``8 * width`` (basic) or
``32 * width`` (bottleneck).  The ``stem`` option picks the first layer of the layouts teachers are trained with:

* ``cifar``: 3x3 conv, stride 1, padding 1, no max-pool (the default; Mix-BT, lightly);
* ``cifar-pad2``: the same conv with padding 2 (solo-learn, KRR-ST / MKDT), which grows the map by 2 pixels;
* ``imagenet``: 7x7 conv, stride 2, padding 3, then a 3x3 stride-2 max-pool (torchvision, timm).

``stem_relu=False`` leaves out the ReLU after the stem's BatchNorm: the graph of lightly's benchmark backbones,
``Sequential(*ResNetGenerator.children()[:-1])``, which drops the ReLU its forward applies functionally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssdd.errors import ConfigError
from ssdd.models.base import Backbone, choice, init_conv_net, positive_int, register_model

STEMS = ("cifar", "cifar-pad2", "imagenet")


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The shortcut: identity, or a 1x1 conv-BN projection when the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = _projection(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, each with BN, and a residual connection."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def make_stem(in_channels: int, width: int, stem: str, relu: bool) -> nn.Sequential:
    """Conv-BN(-ReLU)(-max-pool) of layout ``stem`` (see the module docstring); the conv and BN are ``0`` and ``1``."""
    if stem == "imagenet":
        conv = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
    else:
        conv = nn.Conv2d(in_channels, width, 3, padding=2 if stem == "cifar-pad2" else 1, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(width)]
    if relu:
        layers.append(nn.ReLU())
    if stem == "imagenet":
        layers.append(nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Sequential(*layers)


class ResNet(Backbone):
    """ResNet with ``blocks[i]`` blocks of type ``block`` in stage ``i``."""

    def __init__(
        self, name: str, num_outputs: int, in_channels: int, image_size: int, blocks: Sequence[int],
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock, width: int = 64, stem: str = "cifar",
        stem_relu: bool = True,
    ):
        super().__init__(name, in_channels, image_size)
        width = positive_int(name, "width", width)
        stem = choice(name, "stem", stem, STEMS)
        if not isinstance(stem_relu, bool):
            raise ConfigError(f"model {name}: stem_relu must be true or false, got {stem_relu!r}")
        self.stem = make_stem(in_channels, width, stem, stem_relu)
        stages: list[nn.Module] = []
        channels = width
        for index, count in enumerate(blocks):
            planes = width * 2**index
            stage = []
            for position in range(count):
                stride = 2 if index > 0 and position == 0 else 1
                stage.append(block(channels, planes, stride))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.width = width
        init_conv_net(self)
        self.feature_dim = channels
        self.reset_head(num_outputs)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)


@register_model("resnet10")
def resnet10(name: str, num_outputs: int, in_channels: int, image_size: int, *, width: int = 64,
             stem: str = "cifar", stem_relu: bool = True) -> ResNet:
    """ResNet-10 (one BasicBlock per stage); ``width`` is the first stage's width."""
    return ResNet(name, num_outputs, in_channels, image_size, [1, 1, 1, 1], BasicBlock, width, stem, stem_relu)


@register_model("resnet18")
def resnet18(name: str, num_outputs: int, in_channels: int, image_size: int, *, width: int = 64,
             stem: str = "cifar", stem_relu: bool = True) -> ResNet:
    """ResNet-18 (two BasicBlocks per stage); ``width`` is the first stage's width."""
    return ResNet(name, num_outputs, in_channels, image_size, [2, 2, 2, 2], BasicBlock, width, stem, stem_relu)


@register_model("resnet50")
def resnet50(name: str, num_outputs: int, in_channels: int, image_size: int, *, width: int = 64,
             stem: str = "cifar", stem_relu: bool = True) -> ResNet:
    """ResNet-50 (3-4-6-3 Bottlenecks); ``width`` is the first stage's width, the features are ``32 * width``."""
    return ResNet(name, num_outputs, in_channels, image_size, [3, 4, 6, 3], Bottleneck, width, stem, stem_relu)
