"""MACs and parameter counts from the architectures' layer tables, counted by hand.

The expected numbers in test_architectures.py were measured with prunebench.pipeline.metrics; here
each architecture is described again from its paper or torchvision's definition (layer by
layer: channels, kernel, stride, output size) and counted with the protocol's convention:
multiply-accumulates of convolutions and linear layers per image, bias adds included;
BatchNorm, activations, pooling and additions are not MACs. Parameters include BatchNorm's
weight and bias. Models are built on the meta device: shapes only, no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prunebench import registry
from prunebench.pipeline.metrics import count_macs, count_params


@dataclass
class Tally:
    macs: int = 0
    params: int = 0

    def conv(self, c_in: int, c_out: int, k: int, out_hw: int, groups: int = 1, bias: bool = False) -> None:
        weights = c_out * (c_in // groups) * k * k
        self.macs += out_hw * out_hw * (weights + (c_out if bias else 0))
        self.params += weights + (c_out if bias else 0)

    def bn(self, c: int) -> None:
        self.params += 2 * c

    def linear(self, n_in: int, n_out: int) -> None:
        self.macs += n_in * n_out + n_out
        self.params += n_in * n_out + n_out


def out_size(size: int, stride: int) -> int:
    """3x3/padding 1 or 1x1/padding 0 convolutions: ceil(size / stride)."""
    return (size + stride - 1) // stride


def cifar_resnet(n: int, classes: int = 10) -> Tally:
    """He et al. 2016, Sec. 4.2: 3x3 conv 16; 3 stages x n blocks (16/32/64 ch. at 32/16/8);
    option-A shortcuts (no parameters); global pool; linear."""
    t = Tally()
    t.conv(3, 16, 3, 32)
    t.bn(16)
    c = 16
    for width, size in ((16, 32), (32, 16), (64, 8)):
        for _ in range(n):
            t.conv(c, width, 3, size)
            t.bn(width)
            t.conv(width, width, 3, size)
            t.bn(width)
            c = width
    t.linear(64, classes)
    return t


def cifar_resnet18(classes: int = 10) -> Tally:
    """ResNet-18 (He et al. 2016, Table 1) with a 3x3/1 stem and no max-pool for 32x32 inputs;
    1x1 conv + BN projection shortcuts where the shape changes."""
    t = Tally()
    t.conv(3, 64, 3, 32)
    t.bn(64)
    c, size = 64, 32
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            size = out_size(size, s)
            t.conv(c, width, 3, size)
            t.bn(width)
            t.conv(width, width, 3, size)
            t.bn(width)
            if s != 1 or c != width:
                t.conv(c, width, 1, size)
                t.bn(width)
            c = width
    t.linear(512, classes)
    return t


# Sandler et al. 2018, Table 2: (expansion t, channels c, repeats n, stride s)
MOBILENETV2_TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                     (6, 320, 1, 1))


def mobilenetv2(size: int, stem_stride: int, strides: tuple[int, ...], classes: int) -> Tally:
    """3x3 conv 32; inverted residuals (1x1 expand unless t = 1, 3x3 depthwise with the stride,
    linear 1x1 projection), each conv followed by BN; 1x1 conv 1280; pool; linear."""
    t = Tally()
    size = out_size(size, stem_stride)
    t.conv(3, 32, 3, size)
    t.bn(32)
    c = 32
    for (expansion, width, repeats, _), stride in zip(MOBILENETV2_TABLE, strides, strict=True):
        for i in range(repeats):
            hidden = c * expansion
            if expansion != 1:
                t.conv(c, hidden, 1, size)
                t.bn(hidden)
            size = out_size(size, stride if i == 0 else 1)
            t.conv(hidden, hidden, 3, size, groups=hidden)
            t.bn(hidden)
            t.conv(hidden, width, 1, size)
            t.bn(width)
            c = width
    t.conv(c, 1280, 1, size)
    t.bn(1280)
    t.linear(1280, classes)
    return t


def vgg16_bn(classes: int = 1000) -> Tally:
    """Simonyan & Zisserman 2015, configuration D, with BN after every conv (torchvision's
    vgg16_bn): 3x3 convs with bias, 2x2 max-pools, 7x7 average pool, 4096-4096-classes."""
    t = Tally()
    c, size = 3, 224
    for stage in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for width in stage:
            t.conv(c, width, 3, size, bias=True)
            t.bn(width)
            c = width
        size //= 2
    t.linear(512 * 7 * 7, 4096)
    t.linear(4096, 4096)
    t.linear(4096, classes)
    return t


HAND_COUNTS = {
    "resnet20": lambda: cifar_resnet(3),
    "resnet32": lambda: cifar_resnet(5),
    "resnet56": lambda: cifar_resnet(9),
    "resnet110": lambda: cifar_resnet(18),
    "resnet18": cifar_resnet18,
    # CIFAR variant (architectures/cifar_mobilenetv2.py): stem and the 24-channel stage at stride 1
    "mobilenetv2": lambda: mobilenetv2(32, 1, (1, 1, 2, 2, 1, 2, 1), 10),
    "tv_mobilenet_v2": lambda: mobilenetv2(224, 2, tuple(s for *_, s in MOBILENETV2_TABLE), 1000),
    "tv_vgg16_bn": vgg16_bn,
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_counts_match_the_layer_table(name: str) -> None:
    arch = registry.architectures.get(name)
    classes = 10 if arch.family == "cifar" else 1000
    with torch.device("meta"):
        model = arch.build(num_classes=classes)
    x = torch.zeros(1, 3, arch.input_size, arch.input_size, device="meta")
    expected = HAND_COUNTS[name]()
    assert (count_macs(model, x), count_params(model)) == (expected.macs, expected.params)


def test_hand_counts_reproduce_the_published_figures() -> None:
    """The tables above give the figures papers quote (millions, or GMACs for ImageNet)."""
    assert round(cifar_resnet(3).macs / 1e6, 2) == 40.55 and round(cifar_resnet(3).params / 1e6, 2) == 0.27
    assert round(cifar_resnet(9).macs / 1e6, 2) == 125.49 and round(cifar_resnet(9).params / 1e6, 2) == 0.85
    r18 = cifar_resnet18()
    assert (round(r18.macs / 1e9, 2), round(r18.params / 1e6, 2)) == (0.56, 11.17)  # "0.56G / 11.17M"
    tv_mnv2 = HAND_COUNTS["tv_mobilenet_v2"]()
    assert round(tv_mnv2.params / 1e6, 2) == 3.50  # torchvision: 3,504,872 parameters
    assert abs(tv_mnv2.macs / 1e6 - 300) < 1  # 300M multiply-adds in the paper (Table 3)
    vgg = vgg16_bn()
    assert vgg.params == 138_365_992  # torchvision's documented parameter count for vgg16_bn
    assert round(vgg.macs / 1e9, 1) == 15.5  # the usual 15.5 GMACs
