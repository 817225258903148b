"""MobileNetV2 adapted to 32x32 CIFAR images.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018. The inverted residual blocks, widths (multiplier 1.0) and
expansion factors are the paper's (Table 2); the CIFAR adaptation is the common one
(e.g. kuangliu/pytorch-cifar):

* the stem ``Conv3x3(32)`` has stride 1 instead of 2;
* the first two stages (t=1, c=16 and t=6, c=24) have stride 1, so the feature map stays at
  32x32 until the 32-channel stage; stage strides are 1,1,2,2,1,2,1 (32 -> 4 at the end);
* head ``Conv1x1(1280) -> global average pool -> Linear(1280, num_classes)``, no dropout.

Unlike kuangliu's version, shortcuts are the paper's: identity only where stride is 1 and
the width is unchanged, no 1x1 projection shortcuts. Blocks use ReLU6 and a linear
(no activation) projection. Kaiming-normal (fan_out) init for convs, as in torchvision.
Measured at 32x32 with ``prunebench.pipeline.metrics``: 87,976,458 MACs (87.98M) and 2,236,682 params (2.24M).
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Architecture

__all__ = ["CifarMobileNetV2", "InvertedResidual", "MOBILENETV2", "build_mobilenetv2", "expansion_convs"]

# (expansion t, output channels c, repeats n, stride s of the first block); ImageNet strides
# are 1,2,2,2,1,2,1 -- the 24-channel stage is set to stride 1 for 32x32 inputs.
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn(
    in_c: int, out_c: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_c),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    """1x1 expansion (if t > 1) -> 3x3 depthwise -> linear 1x1 projection (+ identity)."""

    def __init__(self, in_c: int, out_c: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_c * expansion
        self.expansion = expansion
        self.use_residual = stride == 1 and in_c == out_c
        self.expand: nn.Sequential | None = (
            nn.Sequential(*_conv_bn(in_c, hidden, 1)) if expansion != 1 else None
        )
        self.depthwise = nn.Sequential(*_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden))
        self.project = nn.Sequential(*_conv_bn(hidden, out_c, 1, act=False))

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, 32, 3, stride=1))
        blocks: list[nn.Module] = []
        c = 32
        for t, out_c, n, s in CIFAR_SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(c, out_c, s if i == 0 else 1, t))
                c = out_c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(*_conv_bn(c, 1280, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.avgpool(x).flatten(1))


def build_mobilenetv2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh CIFAR MobileNetV2 (width 1.0)."""
    return CifarMobileNetV2(num_classes=num_classes, in_channels=in_channels)


def expansion_convs(model: nn.Module) -> list[str]:
    """The 1x1 expansion conv of every inverted residual block with expansion > 1."""
    return [
        f"{name}.expand.0"
        for name, m in model.named_modules()
        if isinstance(m, InvertedResidual) and m.expand is not None
    ]


def _classifier(model: nn.Module) -> list[str]:
    return ["classifier"]


MOBILENETV2 = Architecture(
    name="mobilenetv2",
    build=build_mobilenetv2,
    family="cifar",
    input_size=32,
    description="MobileNetV2 (Sandler et al. 2018), CIFAR variant: stem and 24-ch stage stride 1",
    prunable=expansion_convs,
    protected=_classifier,
    pruning_note="Only the expansion 1x1 conv of blocks with t > 1 is prunable; the dependency "
    "graph shrinks the depthwise conv and the projection's inputs with it. Block outputs "
    "(residual-coupled) are kept.",
    default_scope="inner",
)
