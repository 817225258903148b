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

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .base import Architecture

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "PadShortcutPruner",
    "RESNET20",
    "RESNET32",
    "RESNET44",
    "RESNET56",
    "RESNET110",
    "all_block_convs",
    "build_resnet",
    "inner_convs",
]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and place the channels in a wider map.

    Input channel ``src[j]`` lands on output channel ``dst[j]``; every other output channel is
    zero. A fresh shortcut uses the usual layout: input channel ``i`` lands on output channel
    ``i + (out_channels - in_channels) // 2`` (zero padding split evenly before and after).
    When channels are pruned the mapping shrinks with them (:class:`PadShortcutPruner`): a
    removed input channel no longer feeds the shortcut, a removed output channel takes its
    input with it, and the remaining indices are renumbered. ``src``/``dst`` are buffers that
    are not saved in the state dict: a pruned model's mapping is rebuilt by replaying its
    pruning plan, and unpruned checkpoints keep their usual keys.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("PadShortcut cannot reduce the number of channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        before = (out_channels - in_channels) // 2
        self.src: Tensor
        self.dst: Tensor
        self.register_buffer("src", torch.arange(in_channels), persistent=False)
        self.register_buffer("dst", torch.arange(in_channels) + before, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def mapping(self) -> list[tuple[int, int]]:
        """``(input channel, output channel)`` pairs the shortcut copies."""
        return list(zip(self.src.tolist(), self.dst.tolist(), strict=True))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, copies={self.src.numel()}"


def _renumber(kept_old: Tensor, n_old: int, removed: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Which entries of ``kept_old`` survive removing ``removed`` from ``0..n_old-1``, and their new numbers."""
    alive = torch.ones(n_old, dtype=torch.bool)
    alive[list(removed)] = False
    new_index = torch.cumsum(alive.long(), 0) - 1
    keep = alive[kept_old.cpu()]
    return keep, new_index[kept_old.cpu()[keep]]


class PadShortcutPruner(tp.pruner.BasePruningFunc):
    """torch-pruning's view of :class:`PadShortcut`: inputs and outputs shrink independently.

    The input channels belong to the previous stage's residual group, the output channels to
    this stage's, so ``prune_in_channels`` and ``prune_out_channels`` are different functions
    (no intra-layer dependency) and each edits the channel mapping.
    """

    TARGET_MODULES = (PadShortcut,)

    def prune_out_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
        keep, new_dst = _renumber(layer.dst, layer.out_channels, idxs)
        device = layer.dst.device
        layer.src = layer.src[keep.to(device)]
        layer.dst = new_dst.to(device)
        layer.out_channels -= len(set(idxs))
        return layer

    def prune_in_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> PadShortcut:
        keep, new_src = _renumber(layer.src, layer.in_channels, idxs)
        device = layer.src.device
        layer.dst = layer.dst[keep.to(device)]
        layer.src = new_src.to(device)
        layer.in_channels -= len(set(idxs))
        return layer

    def get_out_channels(self, layer: PadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: PadShortcut) -> int:
        return layer.in_channels


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


def all_block_convs(model: nn.Module) -> list[str]:
    """The stem and both convs of every BasicBlock, in forward order.

    The stem and the second conv of every block of stage ``s`` write the residual stream of
    that stage, so the dependency graph ties their output channels into one group per stage
    (named after its first member: ``conv1``, ``layer2.0.conv2``, ``layer3.0.conv2``).
    """
    names = ["conv1"]
    for name, m in model.named_modules():
        if isinstance(m, BasicBlock):
            names += [f"{name}.conv1", f"{name}.conv2"]
    return names


def _fc(model: nn.Module) -> list[str]:
    return ["fc"]


_NOTE = (
    "Scope 'inner' (the default) prunes the first conv of each BasicBlock. Scope 'all' also "
    "prunes the residual-coupled channels: the stem and every block's second conv, one group "
    "per stage (the stage's residual stream), with the option-A shortcuts' channel mapping "
    "shrinking to match."
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
        default_scope="inner",
        scopes={"all": all_block_convs},
        scope_notes={
            "inner": "first conv of each block",
            "all": "stem + both convs of each block (one residual group per stage)",
        },
        customized_pruners={PadShortcut: PadShortcutPruner},
    )


RESNET20 = _make(20)
RESNET32 = _make(32)
RESNET44 = _make(44)
RESNET56 = _make(56)
RESNET110 = _make(110)
