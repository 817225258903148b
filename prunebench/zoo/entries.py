"""The zoo's entries: what each pretrained checkpoint is, where it comes from, how it was made.

CIFAR ResNets: Y. Idelbayev, "Proper ResNet Implementation for CIFAR10/CIFAR100 in PyTorch",
https://github.com/akamaster/pytorch_resnet_cifar10 (BSD-2-Clause), trained on the official
CIFAR-10 release with ImageNet normalisation. File names are the project's own; the 8 hex
digits in each are the first digits of the file's sha256. Reported accuracies are 100 minus
the test errors of that project's README ("Test err (this impl.)"). ``git_blob`` is the
file's git object id in that repository at commit d5489e8995e81e91ce6b1d69dcc98ad579b0b153
(``git ls-tree -l HEAD pretrained_models/``): a hash of the whole file, which is the only
full hash known for ResNet-110, whose sha256 is known only by its first 8 digits.

torchvision: the ImageNet-1k weights of ``torchvision.models`` (V1, the weights pruning
papers start from), loaded through torchvision's weights API. URLs, accuracies and
preprocessing are torchvision 0.29's metadata (a test checks them against the installed
torchvision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    """One pretrained checkpoint.

    ``datasets`` are the run datasets the checkpoint serves as they are (its own training
    data); ``adapt_to`` those it serves after an adaptation fine-tune (a shifted version of
    its training data, e.g. ``cifar10-jpeg`` for a checkpoint trained on official CIFAR-10).
    ``sha256`` is the full digest, or only its known prefix (``sha256_complete`` False).
    ``key_map`` names how the file's state dict maps onto the architecture
    (:mod:`prunebench.zoo.keys`); ``torchvision_weights`` (``"Enum.MEMBER"``) marks an entry
    downloaded through torchvision's weights API.
    """

    name: str
    arch: str
    trained_on: str
    datasets: tuple[str, ...]
    adapt_to: tuple[str, ...]
    num_classes: int
    file: str
    url: str
    sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reported_top1: float
    reported_source: str
    license: str
    license_file: str | None = None  # must travel with every copy of the file
    license_url: str | None = None  # where a download fetches that licence file from
    key_map: str = "none"
    git_blob: str | None = None
    torchvision_weights: str | None = None
    user_supplied: bool = False  # not in the shared data folder: the user provides the file
    note: str = ""

    @property
    def sha256_complete(self) -> bool:
        return len(self.sha256) == 64

    def serves(self, dataset: str) -> bool:
        return dataset in self.datasets or dataset in self.adapt_to

    def needs_adaptation(self, dataset: str) -> bool:
        return dataset in self.adapt_to

    def describe(self) -> dict[str, Any]:
        """The entry as plain data (JSON types), for the record."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["sha256_complete"] = self.sha256_complete
        return out


_IDELBAYEV = "https://github.com/akamaster/pytorch_resnet_cifar10"
_IDELBAYEV_COMMIT = "d5489e8995e81e91ce6b1d69dcc98ad579b0b153"


def _cifar(depth: int, file: str, sha256: str, git_blob: str, error: float, user_supplied: bool = False,
           note: str = "") -> ZooEntry:
    return ZooEntry(
        name=f"resnet{depth}-cifar10-idelbayev",
        arch=f"resnet{depth}",
        trained_on="cifar10",
        datasets=("cifar10",),
        adapt_to=("cifar10-jpeg",),
        num_classes=10,
        file=file,
        url=f"{_IDELBAYEV}/raw/master/pretrained_models/{file}",
        sha256=sha256,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        reported_top1=round(100.0 - error, 2),
        reported_source=f"{_IDELBAYEV} README, test error {error}% on CIFAR-10 (commit {_IDELBAYEV_COMMIT[:7]})",
        license="BSD-2-Clause",
        license_file="LICENSE-pytorch_resnet_cifar10",
        license_url=f"{_IDELBAYEV}/raw/{_IDELBAYEV_COMMIT}/LICENSE",
        key_map="idelbayev",
        git_blob=git_blob,
        user_supplied=user_supplied,
        note=note,
    )


def _tv(arch: str, weights: str, file: str, top1: float, recipe: str) -> ZooEntry:
    return ZooEntry(
        name=f"{arch}-imagenet1k-torchvision",
        arch=arch,
        trained_on="imagenet-1k",
        datasets=("imagefolder", "imagenet"),
        adapt_to=(),
        num_classes=1000,
        file=file,
        url=f"https://download.pytorch.org/models/{file}",
        sha256=file.rsplit("-", 1)[1].split(".")[0],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        reported_top1=top1,
        reported_source=f"torchvision {weights} metadata (ImageNet-1K acc@1; recipe {recipe})",
        license="BSD-3-Clause (torchvision); the ImageNet terms of use may apply to weights trained on it",
        key_map="none",
        torchvision_weights=weights,
        note="serves imagenet, and an imagefolder dataset holding ImageNet-1k (1000 classes, torchvision's "
             "class order: sorted WordNet ids)",
    )


_TV_REFS = "https://github.com/pytorch/vision/tree/main/references/classification"

BUILTIN: tuple[ZooEntry, ...] = (
    _cifar(20, "resnet20-12fca82f.th", "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
           "f7c370bc38314d1c98166b834cd50988aec2ca50", 8.27),
    _cifar(32, "resnet32-d509ac18.th", "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
           "8be5f1b233fe23955f050b24a0ef08094b3220db", 7.37),
    _cifar(44, "resnet44-014dd654.th", "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
           "95b2a26a7e6bd2902453b3f1f3994e0e4ff91bb9", 6.90),
    _cifar(56, "resnet56-4bfd9763.th", "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
           "5df0ea2530c843f9eaa9c602b28d37505de64378", 6.61),
    _cifar(110, "resnet110-1d1ed7c2.th", "1d1ed7c2", "45daff3ec1b813c24feb5e17d2208a79066e42d2", 6.32,
           user_supplied=True,
           note="only the first 8 hex digits of the sha256 are published (in the file name); the file is "
                "also checked against its git object id in the source repository"),
    _tv("tv_resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, f"{_TV_REFS}#resnet"),
    _tv("tv_resnet50", "ResNet50_Weights.IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.13, f"{_TV_REFS}#resnet"),
    _tv("tv_mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", "mobilenet_v2-b0353104.pth", 71.878,
        f"{_TV_REFS}#mobilenetv2"),
    _tv("tv_vgg16_bn", "VGG16_BN_Weights.IMAGENET1K_V1", "vgg16_bn-6c64b313.pth", 73.36,
        f"{_TV_REFS}#alexnet-and-vgg"),
)
