"""VGG-16-BN for CIFAR, the variant the pruning literature quotes (HRank, Lin et al. CVPR 2020).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (configuration D), with BatchNorm (Ioffe & Szegedy 2015) and the small CIFAR
classifier "512-512-10" used by HRank and its successors:

* features: 13 conv3x3 layers (64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512),
  each ``Conv2d(bias=True) -> BatchNorm2d -> ReLU``; the four ``M`` are
  ``MaxPool2d(2, ceil_mode=True)`` (identical to floor mode at 32x32; ceil mode keeps an 8x8
  input alive down to 1x1);
* the last reduction is a global average pool (HRank: ``AvgPool2d(2)`` on the 2x2 map; here
  ``AdaptiveAvgPool2d(1)``, the same at 32x32 and valid at any size);
* classifier: ``Linear(512, 512) -> BatchNorm1d(512) -> ReLU -> Linear(512, num_classes)``.

Counted with ``prunebench.pipeline.metrics`` at 32x32 (conv + linear MACs with bias adds; every
parameter, BatchNorm included) this is 313,740,810 MACs (313.74M) and 14,991,946 params
(14.99M). The literature's "313.73M / 14.98M" is not reachable under that convention by any
variant (with/without conv bias, BN1d, hidden bias, affine BN, either pooling -- all checked):
14.98M is the parameter count *without BatchNorm* (HRank's ``get_flops`` skips BN), and 313.73M
is reproduced by conv MACs without bias plus linear layers counted as (2*in-1)*out FLOPs.
Pooling never changes the count. Kaiming-normal (fan_out) init for convs, as in HRank/torchvision.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Architecture, all_convs

__all__ = ["CFG16", "CifarVGG", "VGG16_BN", "build_vgg16_bn"]

CFG16: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip


class CifarVGG(nn.Module):
    """VGG with BatchNorm, global average pooling and a 512-hidden classifier."""

    def __init__(
        self,
        cfg: tuple[int | str, ...] = CFG16,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=True), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def build_vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh CIFAR VGG-16-BN (512-512-num_classes classifier)."""
    return CifarVGG(CFG16, num_classes=num_classes, in_channels=in_channels)


def _last_linear(model: nn.Module) -> list[str]:
    return ["classifier.3"]


VGG16_BN = Architecture(
    name="vgg16_bn",
    build=build_vgg16_bn,
    family="cifar",
    input_size=32,
    description="CIFAR VGG-16-BN (Simonyan & Zisserman 2015; HRank variant, 512-512-10 classifier)",
    prunable=all_convs,
    protected=_last_linear,
    pruning_note="All 13 convs are prunable; the hidden Linear is never a root (its inputs shrink "
    "when the last conv is pruned); the final Linear is protected.",
    default_scope="all",
)
