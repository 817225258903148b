"""CIFAR ResNet-20/32/44/56/110 with option-A (parameter-free) shortcuts.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2:
a 3x3 stem with 16 filters, three stages of ``n`` BasicBlocks with 16/32/64 channels
(the first block of stages 2 and 3 has stride 2), global average pooling and a linear
classifier; depth = 6n + 2. Shortcuts are option A: identity, or -- where the shape
changes -- stride-2 subsampling plus zero-padding of the extra channels (no parameters).
Convolutions have no bias (each is followed by BatchNorm) and are Kaiming-normal
initialised (fan_out, ReLU gain), as in the paper.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Architecture

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "RESNET20",
    "RESNET32",
    "RESNET44",
    "RESNET56",
    "RESNET110",
    "build_resnet",
    "inner_convs",
]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad channels.

    ``x[:, :, ::2, ::2]`` followed by padding ``out_channels - in_channels`` zero
    channels, split evenly before and after the existing ones (the usual layout).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("PadShortcut cannot reduce the number of channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - x.shape[1]
        if extra > 0:
            before = extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, extra - before))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an option-A shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; works on any input of at least 1x1."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)


def inner_convs(model: nn.Module) -> list[str]:
    """The first (inner) conv of every BasicBlock: its outputs are not residual-coupled."""
    return [f"{name}.conv1" for name, m in model.named_modules() if isinstance(m, BasicBlock)]


def _fc(model: nn.Module) -> list[str]:
    return ["fc"]


_NOTE = (
    "Only the inner (first) conv of each BasicBlock is prunable: torch-pruning's "
    "DependencyGraph cannot follow the option-A padding shortcut (PadShortcut), so the "
    "residual-coupled channels (stem, second conv of each block) are never pruned."
)


def _make(depth: int) -> Architecture:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return build_resnet(depth, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = f"build_resnet{depth}"
    build.__doc__ = f"A fresh CIFAR ResNet-{depth} (option-A shortcuts)."
    return Architecture(
        name=f"resnet{depth}",
        build=build,
        family="cifar",
        input_size=32,
        description=f"CIFAR ResNet-{depth} (He et al. 2016), option-A shortcuts, 16/32/64 channels",
        prunable=inner_convs,
        protected=_fc,
        pruning_note=_NOTE,
    )


RESNET20 = _make(20)
RESNET32 = _make(32)
RESNET44 = _make(44)
RESNET56 = _make(56)
RESNET110 = _make(110)
