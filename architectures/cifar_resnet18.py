"""ResNet-18 adapted to 32x32 CIFAR images.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (the
ImageNet ResNet-18: four stages of two BasicBlocks, 64/128/256/512 channels), in the
common CIFAR adaptation (e.g. kuangliu/pytorch-cifar, used by many pruning papers):
the 7x7/2 stem and its max-pool are replaced by a 3x3/1 conv, so stages run at 32/16/8/4;
shortcuts that change shape are 1x1 conv + BN projections (option B). Convs have no bias
and are Kaiming-normal (fan_out) initialised.
Measured at 32x32 with ``prunebench.pipeline.metrics``: 555,422,730 MACs (555.42M) and 11,173,962 params
(11.17M); the "0.56G / 11.17M" usually quoted.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Architecture, all_convs

__all__ = ["BasicBlock", "CifarResNet18", "RESNET18", "block_first_convs", "build_resnet18"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus identity or 1x1-conv-BN projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Sequential] = []
        c = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(c, planes, stride), BasicBlock(planes, planes, 1)))
            c = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def build_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh CIFAR ResNet-18."""
    return CifarResNet18(num_classes=num_classes, in_channels=in_channels)


def block_first_convs(model: nn.Module) -> list[str]:
    """The first conv of every BasicBlock (outputs not coupled to the residual stream)."""
    return [f"{name}.conv1" for name, m in model.named_modules() if isinstance(m, BasicBlock)]


def _fc(model: nn.Module) -> list[str]:
    return ["fc"]


RESNET18 = Architecture(
    name="resnet18",
    build=build_resnet18,
    family="cifar",
    input_size=32,
    description="ResNet-18 (He et al. 2016), CIFAR variant: 3x3/1 stem, no max-pool, 1x1 projections",
    prunable=block_first_convs,
    protected=_fc,
    pruning_note="Scope 'inner' (the default) prunes the first conv of each BasicBlock; scope 'all' "
    "also prunes the residual-coupled channels (stem, conv2, 1x1 projections), one group per stage.",
    default_scope="inner",
    scopes={"all": all_convs},
    scope_notes={"inner": "first conv of each block", "all": "every conv (one residual group per stage)"},
)
