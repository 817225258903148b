"""Check a criterion against the contract — for prunebench's own tests and for plug-in authors.

    from prunebench.testing import check_criterion
    check_criterion(MyCriterion)          # or a registered name: check_criterion("coring")

It runs the criterion on a tiny CPU model (convs, BatchNorm, a depthwise conv, a residual
addition) with synthetic calibration data, through the same harness a real run uses, and
raises ``AssertionError`` naming what is wrong. Takes a few seconds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from prunebench.compress import Meter, compress
from prunebench.protocols import (
    AllocateCriterion,
    Calibration,
    CompressionContext,
    Criterion,
    EpochLedger,
    ScoreCriterion,
    Target,
    TransformCriterion,
)
from prunebench.surgery import load_compressed, replay


class TinyNet(nn.Module):
    """conv-bn-relu ×2, a residual block, a depthwise-separable pair, pooling, classifier."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, width: int = 12) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.conv1 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * w)
        self.conv2 = nn.Conv2d(2 * w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.expand = nn.Conv2d(w, 2 * w, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.dw = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.project = nn.Conv2d(2 * w, w, 1)
        self.fc = nn.Linear(w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        y = torch.relu(self.bn3(self.expand(x)))
        y = torch.relu(self.bn4(self.dw(y)))
        x = x + self.project(y)
        return self.fc(x.mean((2, 3)))


TINY_PRUNABLE = ["conv1", "expand"]
TINY_PROTECTED = ["fc"]


def _context(model: nn.Module, target: Target, seed: int) -> tuple[CompressionContext, Meter]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(64, 3, 8, 8, generator=g)
    labels = torch.randint(0, 4, (64,), generator=g)
    example = images[:1]
    meter = Meter(copy.deepcopy(model), example, target)
    ledger = EpochLedger(total=1.0)

    def train(m: nn.Module, epochs: float, hooks: Any = None, purpose: str = "compress") -> None:
        ledger.draw(epochs, purpose)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        from prunebench.protocols import TrainingHooks

        h = hooks or TrainingHooks()
        for step in range(max(1, int(4 * epochs))):
            loss = nn.functional.cross_entropy(m(images), labels)
            extra = h.extra_loss(m)
            if extra is not None:
                loss = loss + extra
            opt.zero_grad()
            loss.backward()
            h.after_backward(m, step)
            opt.step()
            h.after_step(m, step)
        h.on_train_end(m)

    ctx = CompressionContext(
        example_inputs=example, calibration=Calibration(images, labels, batch_size=32), target=target,
        device=torch.device("cpu"), seed=seed, prunable=list(TINY_PRUNABLE), protected=list(TINY_PROTECTED),
        ledger=ledger, reduction=meter.reduction, reduction_of=lambda kept: meter.reduction_of(model, kept),
        train=train, log=lambda msg: None,
    )
    return ctx, meter


def check_criterion(criterion: type[Criterion] | str, params: dict[str, Any] | None = None,
                    target_ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """Run ``criterion`` through the harness on :class:`TinyNet`; raise AssertionError on violations."""
    from prunebench import registry

    cls = registry.criteria.get(criterion) if isinstance(criterion, str) else criterion
    name = cls.name or cls.__name__
    assert issubclass(cls, (ScoreCriterion, AllocateCriterion, TransformCriterion)), (
        f"{name}: must subclass ScoreCriterion, AllocateCriterion or TransformCriterion"
    )
    crit = cls.from_kwargs(seed=seed, **(params or {}))
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    # TinyNet has only two factorisable k×k convs, so a transform's rank steps are coarser
    # than ±1 pp here; on real networks the harness holds every kind to the run's tolerance.
    tolerance = 0.05 if issubclass(cls, TransformCriterion) else 0.01
    target = Target("macs", target_ratio, tolerance)
    ctx, meter = _context(model, target, seed)
    report: dict[str, Any] = {"criterion": name, "kind": cls.kind.value}

    if isinstance(crit, ScoreCriterion):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        layers = ["stem.0", "conv1", "conv2", "expand", "dw", "project"]
        scores = crit.scores(model, layers, ctx.calibration)
        modules = dict(model.named_modules())
        for layer in layers:
            assert layer in scores, f"{name}: scores() returned nothing for layer {layer!r}"
            s = torch.as_tensor(scores[layer])
            assert s.ndim == 1 and s.numel() == modules[layer].out_channels, (
                f"{name}: scores for {layer!r} have shape {tuple(s.shape)}, expected ({modules[layer].out_channels},)"
            )
            assert torch.isfinite(s).all(), f"{name}: non-finite scores for {layer!r}"
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{name}: scores() modified the model ({k})"
        again = crit.scores(model, layers, ctx.calibration)
        for layer in layers:
            assert torch.allclose(torch.as_tensor(again[layer]).double(), torch.as_tensor(scores[layer]).double()), (
                f"{name}: scores are not deterministic for a fixed seed ({layer})"
            )

    result = compress(crit, model, ctx, meter)
    assert meter.within(result.achieved), f"{name}: achieved {result.achieved:.3f}, target {target_ratio}"
    out = model(ctx.example_inputs)
    assert out.shape == (1, 4) and torch.isfinite(out).all(), f"{name}: compressed model output is broken"

    # the plan must rebuild the same model from a fresh architecture
    fresh = TinyNet()
    replay(fresh, ctx.example_inputs, result.plan)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    model.eval()
    assert torch.allclose(fresh(ctx.example_inputs), model(ctx.example_inputs), atol=1e-5), (
        f"{name}: replaying the plan does not rebuild the compressed model"
    )
    report.update(achieved=result.achieved, plan_steps=len(result.plan), knob=result.knob)
    return report


__all__ = ["TinyNet", "check_criterion", "load_compressed"]
