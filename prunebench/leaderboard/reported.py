"""Numbers the papers published, shown beside (never inside) prunebench's rankings.

Each entry was checked against the source it names (repository README at the commit given,
or the paper's abstract). They come from the official CIFAR-10 release, their own baselines
and their own fine-tuning (often hundreds of epochs, best epoch selected on the test set), so
they are not comparable with the reproduced rows: a page prints them in a separate table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reported:
    arch: str  # prunebench architecture name
    dataset: str  # dataset family the paper used
    method: str
    base: float | None  # baseline top-1 (%)
    pruned: float | None  # pruned top-1 (%)
    delta: float | None  # pruned - base, when the source gives only the difference
    flops_down: str  # as the source states it (FLOPs reduction or MACs speed-up)
    params_down: str
    finetune: str  # fine-tuning (or training) the number comes from, and how the epoch was chosen
    source: str


_HRANK = "HRank README, github.com/lmbxmu/HRank @ c03ac85"
_CORING = "CORING README, github.com/pvtien96/CORING @ 6490ff4"
_TP = "Torch-Pruning reproduce/readme.md, github.com/VainF/Torch-Pruning @ e80127d"
_TRP = "TRP README, github.com/yuhuixu1993/Trained-Rank-Pruning @ 8cc7470"

REPORTED: tuple[Reported, ...] = (
    Reported("resnet56", "cifar10", "HRank (Lin et al., CVPR 2020)", 93.26, 93.17, None, "50.0%", "42.4%",
             "15 epochs after each pruned layer (main.py default); best epoch",
             _HRANK + " (baseline from CORING README's table); HRank notes its real pruning rates are "
             "higher than counted"),
    Reported("resnet56", "cifar10", "CORING-V-5, VBD (Pham et al., NN 2024)", 93.26, 94.22, None, "47.4%",
             "42.8%", "300 epochs (authors' scripts); best checkpoint", _CORING),
    Reported("resnet56", "cifar10", "CORING-E, Euclidean (Pham et al., NN 2024)", 93.26, 92.84, None, "72.3%",
             "71.8%", "300 epochs (authors' scripts); best checkpoint", _CORING),
    Reported("resnet56", "cifar10", "QSFM, no fine-tuning (Wang et al., IEEE IoT-J 2022)", None, None, -0.54,
             "48.7%", "57.9%", "none (one-shot)", "arXiv 2105.06052, abstract"),
    Reported("resnet56", "cifar10", "QSFM, fine-tuned", None, 91.88, None, "60.0%", "71.3%",
             "not stated by the quoting source", _CORING + " (QSFM row, quoted; baseline not given)"),
    Reported("resnet56", "cifar10", "L1 / Group-L1 (re-run by Torch-Pruning)", 93.53, 92.93, None,
             "2.12× MACs (52.8%)", "—", "100 epochs; best epoch", _TP),
    Reported("resnet56", "cifar10", "DepGraph (Fang et al., CVPR 2023)", 93.53, 93.77, None,
             "2.13× MACs (53.1%)", "—", "100 sparse-learning + 100 fine-tune epochs; best epoch", _TP),
    Reported("resnet20", "cifar10", "TRP+Nu, channel (Xu et al., IJCAI 2020)", 91.74, 90.50, None,
             "2.17× (53.9%)", "0.27M → 0.1M", "trained with TRP for 164 epochs; best checkpoint", _TRP),
    Reported("resnet20", "cifar10", "TRP+Nu, spatial (Xu et al., IJCAI 2020)", 91.74, 90.62, None,
             "2.84× (64.8%)", "0.27M → 0.08M", "trained with TRP for 164 epochs; best checkpoint", _TRP),
)


def family(dataset: str) -> str:
    """The dataset a paper number can stand beside: ``cifar10-jpeg`` pages show CIFAR-10 numbers."""
    return "cifar10" if dataset in ("cifar10", "cifar10-jpeg") else dataset


def reported_for(dataset: str, arch: str) -> list[Reported]:
    return [r for r in REPORTED if r.arch == arch and r.dataset == family(dataset)]
