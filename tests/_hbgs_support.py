"""Shared fixtures of the HBGS / HBGTS tests: a small CNN, random BatchNorm statistics, the
harness's surgery through torch-pruning's DependencyGraph, a compression context, and the
brute-force backward elimination and explicit ridge fit the tests replay the search against."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from prunebench.pipeline.metrics import count_macs
from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

LAYERS = ["conv1", "conv2", "conv3"]


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(self.gap(x).flatten(1))


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def prune_copy(model: nn.Module, x: torch.Tensor, kept: dict[str, torch.Tensor]) -> nn.Module:
    """The harness's surgery: remove every non-kept output channel through the DependencyGraph."""
    m = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])
    modules = dict(m.named_modules())
    for name, idx in kept.items():
        conv = modules[name]
        keep = set(int(i) for i in idx)
        removed = [i for i in range(conv.out_channels) if i not in keep]
        if removed:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=removed).prune()
    return m


def make_ctx(
    model: nn.Module,
    ratio: float,
    n_images: int = 64,
    size: int = 8,
    prunable=LAYERS,
    metric: str = "macs",
    epochs: float = 0.0,
    train=None,
    tolerance: float = 0.01,
) -> CompressionContext:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n_images, 3, size, size, generator=g)
    baseline = copy.deepcopy(model).eval()
    base_macs = count_macs(baseline, x)
    base_params = sum(p.numel() for p in baseline.parameters())

    def measure(m: nn.Module) -> float:
        if metric == "macs":
            return 1.0 - count_macs(m, x) / base_macs
        return 1.0 - sum(p.numel() for p in m.parameters()) / base_params

    return CompressionContext(
        example_inputs=x[:2],
        calibration=Calibration(x, torch.zeros(n_images, dtype=torch.long), batch_size=32),
        target=Target(metric=metric, ratio=ratio, tolerance=tolerance),
        device=torch.device("cpu"),
        seed=0,
        prunable=list(prunable),
        protected=["fc"],
        ledger=EpochLedger(total=epochs),
        reduction=measure,
        reduction_of=lambda kept: measure(prune_copy(baseline, x, kept)),
        train=train or (lambda *a, **k: None),
        log=lambda msg: None,
    )


def check_allocation(model: nn.Module, ctx: CompressionContext, kept: dict[str, torch.Tensor]) -> float:
    modules = dict(model.named_modules())
    assert set(kept) == set(ctx.prunable)
    for name, idx in kept.items():
        n = modules[name].out_channels
        assert idx.dtype == torch.long and idx.dim() == 1
        assert 0 < idx.numel() <= n
        assert len(set(idx.tolist())) == idx.numel()
        assert int(idx.min()) >= 0 and int(idx.max()) < n
    pruned = prune_copy(model, ctx.example_inputs, kept)
    out = pruned(ctx.calibration.images[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    achieved = ctx.reduction(pruned)
    assert abs(achieved - ctx.target.ratio) <= ctx.target.tolerance + 1e-9
    return achieved


def brute_backward(H: torch.Tensor, pool: list[int], k: int, lam: float) -> list[int]:
    """Drop k filters one at a time, each the one whose removal keeps the pool's own filters
    best rebuilt (exhaustive refits, targets = the current pool)."""
    from prunebench.criteria._selection import reconstruction_error

    pool = list(pool)
    targets = list(pool)
    out = []
    for _ in range(k):
        errs = [reconstruction_error(H, [q for q in pool if q != p], targets, lam) for p in pool]
        p = pool[int(torch.tensor(errs).argmin())]
        pool.remove(p)
        out.append(p)
    return out


def explicit_ridge(w: torch.Tensor, kept, removed, lam: float) -> torch.Tensor:
    """Ridge fit of each removed filter from the kept ones, by numpy's least squares on
    ``[A_S; √λ I] c = [a_r; 0]`` (``A`` = flattened filters as columns)."""
    import numpy as np

    a = w.reshape(w.shape[0], -1).T.numpy()
    kept, removed = [int(i) for i in kept], [int(i) for i in removed]
    stacked = np.vstack([a[:, kept], np.sqrt(lam) * np.eye(len(kept))])
    rhs = np.vstack([a[:, removed], np.zeros((len(kept), len(removed)))])
    return torch.from_numpy(np.linalg.lstsq(stacked, rhs, rcond=None)[0].T)
