"""ImageNet architectures from torchvision, with the pruning metadata prunebench needs.

Models: ResNet-18/50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016),
MobileNetV2 (Sandler et al., CVPR 2018) and VGG-16-BN (Simonyan & Zisserman, ICLR 2015), all
``torchvision.models.<name>(weights=None, num_classes=num_classes)`` -- fresh torchvision
initialisation, no pretrained weights. With ``in_channels != 3`` the first conv is replaced
by an identically shaped conv taking ``in_channels`` inputs (Kaiming-normal, fan_out).
Measured at 224x224 with ``prunebench.pipeline.metrics`` (1000 classes): ResNet-18 1,814,074,344 MACs /
11,689,512 params; ResNet-50 4,089,185,256 / 25,557,032; MobileNetV2 300,775,272 / 3,504,872;
VGG-16-BN 15,483,821,032 / 138,365,992.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from .base import Architecture, all_convs, last_linear

__all__ = [
    "TV_MOBILENET_V2",
    "TV_RESNET18",
    "TV_RESNET50",
    "TV_VGG16_BN",
    "mobilenet_expansion_convs",
    "resnet_inner_convs",
]


def _new_conv(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, _new_conv(conv, in_channels))


def _builder(tv_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        model = getattr(torchvision.models, tv_name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        return model

    build.__name__ = f"build_{tv_name}"
    build.__doc__ = f"A fresh torchvision {tv_name} (weights=None)."
    return build


def resnet_inner_convs(model: nn.Module) -> list[str]:
    """conv1 of each BasicBlock; conv1 and conv2 of each Bottleneck (not residual-coupled)."""
    names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, Bottleneck):
            names += [f"{name}.conv1", f"{name}.conv2"]
        elif isinstance(m, BasicBlock):
            names.append(f"{name}.conv1")
    return names


def mobilenet_expansion_convs(model: nn.Module) -> list[str]:
    """The 1x1 expansion conv of each InvertedResidual with expansion > 1."""
    names: list[str] = []
    for name, m in model.named_modules():
        # blocks with expand_ratio == 1 start with the depthwise conv (3 layers, not 4)
        if isinstance(m, InvertedResidual) and len(m.conv) == 4:
            names.append(f"{name}.conv.0.0")
    return names


_RESNET_NOTE = (
    "Scope 'inner' (the default) prunes the block-internal convs; scope 'all' also prunes the "
    "residual-coupled channels (stem, each block's last conv, downsample convs), one group per stage."
)
_RESNET_SCOPES = {"all": all_convs}
_RESNET_SCOPE_NOTES = {"inner": "block-internal convs", "all": "every conv (one residual group per stage)"}

TV_RESNET18 = Architecture(
    name="tv_resnet18",
    build=_builder("resnet18"),
    family="imagenet",
    input_size=224,
    description="torchvision ResNet-18 (He et al. 2016), ImageNet layout",
    prunable=resnet_inner_convs,
    protected=last_linear,
    pruning_note=_RESNET_NOTE,
    default_scope="inner",
    scopes=_RESNET_SCOPES,
    scope_notes=_RESNET_SCOPE_NOTES,
)

TV_RESNET50 = Architecture(
    name="tv_resnet50",
    build=_builder("resnet50"),
    family="imagenet",
    input_size=224,
    description="torchvision ResNet-50 (He et al. 2016), ImageNet layout",
    prunable=resnet_inner_convs,
    protected=last_linear,
    pruning_note=_RESNET_NOTE,
    default_scope="inner",
    scopes=_RESNET_SCOPES,
    scope_notes=_RESNET_SCOPE_NOTES,
)

TV_MOBILENET_V2 = Architecture(
    name="tv_mobilenet_v2",
    build=_builder("mobilenet_v2"),
    family="imagenet",
    input_size=224,
    description="torchvision MobileNetV2 (Sandler et al. 2018), width 1.0",
    prunable=mobilenet_expansion_convs,
    protected=last_linear,
    pruning_note="Only expansion 1x1 convs are prunable (the depthwise conv follows them).",
    default_scope="inner",
)

TV_VGG16_BN = Architecture(
    name="tv_vgg16_bn",
    build=_builder("vgg16_bn"),
    family="imagenet",
    input_size=224,
    description="torchvision VGG-16-BN (Simonyan & Zisserman 2015), 4096-4096 classifier",
    prunable=all_convs,
    protected=last_linear,
    pruning_note="All convs of the features are prunable; the last Linear is protected.",
    default_scope="all",
)
