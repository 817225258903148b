"""Check a criterion against the contract — for prunebench's own tests and for plug-in authors.

    from prunebench.testing import check_criterion
    check_criterion(MyCriterion)          # or a registered name: check_criterion("coring")

It runs the criterion on a tiny CPU model (convs, BatchNorm, a depthwise conv, a residual
addition) with synthetic calibration data, through the same harness a real run uses, and
holds every kind to the protocol's ±1 pp of the MACs target. A class the registry would
refuse to load raises :class:`~prunebench.errors.PluginError` (as on load); a criterion that
loads but breaks the contract raises ``AssertionError`` naming what is wrong. Takes a few
seconds.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import torch
from torch import nn

from prunebench.errors import TargetMissedError
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.surgery import load_compressed, replay, set_module
from prunebench.protocols import (
    Calibration,
    CompressionContext,
    Criterion,
    EpochLedger,
    ScoreCriterion,
    Target,
    TransformCriterion,
)


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


class _Residual(nn.Module):
    """conv-bn-relu-conv-bn (3x3, ``c -> h -> c``) plus the identity, then ReLU."""

    def __init__(self, c: int, h: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, h, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv2 = nn.Conv2d(h, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyFactorNet(nn.Module):
    """The model transform criteria are checked on: TinyNet's pieces, more of them.

    A stem, three residual blocks of 3x3 convs (16 -> 32 -> 16), the depthwise-separable
    pair, a hidden linear layer and the classifier. One rank of any factorisable layer moves
    the MACs by about 1 % or less (TinyNet's two 3x3 convs move them by 2-4 % a rank), so a
    transform criterion's knob can reach the run's ±1 pp like every other kind.
    """

    def __init__(self, num_classes: int = 4, in_channels: int = 3, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(*[_Residual(w, 2 * w) for _ in range(blocks)])
        self.expand = nn.Conv2d(w, 2 * w, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.dw = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.project = nn.Conv2d(2 * w, w, 1)
        self.hidden = nn.Linear(w, w)
        self.fc = nn.Linear(w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        y = torch.relu(self.bn3(self.expand(x)))
        y = torch.relu(self.bn4(self.dw(y)))
        x = x + self.project(y)
        return self.fc(torch.relu(self.hidden(x.mean((2, 3)))))


FACTOR_PRUNABLE = ["blocks.0.conv1", "blocks.1.conv1", "blocks.2.conv1", "expand"]
FACTOR_PROTECTED = ["fc"]


def _context(
    model: nn.Module, target: Target, seed: int, prunable: list[str], protected: list[str]
) -> tuple[CompressionContext, Meter]:
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
        device=torch.device("cpu"), seed=seed, prunable=list(prunable), protected=list(protected),
        ledger=ledger, reduction=meter.reduction, reduction_of=lambda kept: meter.reduction_of(model, kept),
        train=train, log=lambda msg: None,
    )
    return ctx, meter


def _nontrivial_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def check_criterion(criterion: type[Criterion] | str, params: dict[str, Any] | None = None,
                    target_ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """Run ``criterion`` through the harness on a tiny model; raise AssertionError on violations.

    Score and allocate criteria run on :class:`TinyNet`, transform criteria on
    :class:`TinyFactorNet`; every kind must land within ±1 pp of ``target_ratio`` (MACs).
    """
    from prunebench import registry

    if isinstance(criterion, str):
        cls = registry.criteria.get(criterion)
    else:  # what the registry checks on load: kind, abstract methods, Params, knob, signatures
        cls = registry._validate_criterion(getattr(criterion, "name", "") or getattr(criterion, "__name__", "?"),
                                           criterion)
    name = cls.name or cls.__name__
    crit = cls.from_kwargs(seed=seed, **(params or {}))
    transform = isinstance(crit, TransformCriterion)
    net, prunable, protected = (
        (TinyFactorNet, FACTOR_PRUNABLE, FACTOR_PROTECTED) if transform else (TinyNet, TINY_PRUNABLE, TINY_PROTECTED)
    )
    torch.manual_seed(seed)
    model = _nontrivial_bn(net())
    target = Target("macs", target_ratio, 0.01)
    ctx, meter = _context(model, target, seed, prunable, protected)
    report: dict[str, Any] = {"criterion": name, "kind": cls.kind.value, "model": net.__name__}

    if isinstance(crit, ScoreCriterion):
        _check_scores(crit, name, model, ctx.calibration)

    try:
        result = compress(crit, model, ctx, meter)
    except TargetMissedError as exc:
        raise AssertionError(f"{name}: misses the target on {net.__name__}: {exc}") from exc
    recount = meter.reduction(model)
    assert abs(recount - result.achieved) <= 1e-9, (
        f"{name}: the harness reports {result.achieved:.4f} MACs reduction but the model has {recount:.4f}"
    )
    assert meter.within(recount), (
        f"{name}: achieved {recount:.2%} MACs reduction, outside the target {target_ratio:.1%} ± 1 pp"
    )
    out = model(ctx.example_inputs)
    assert out.shape == (1, 4) and torch.isfinite(out).all(), f"{name}: compressed model output is broken"
    try:
        json.dumps(result.plan)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{name}: the plan is not plain JSON data ({exc})") from exc

    # the plan and a weights-only state dict must rebuild the same model from a fresh architecture
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = net()
    try:
        _replay(fresh, ctx.example_inputs, result.plan, cls, name)
        fresh.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise AssertionError(
            f"{name}: replaying the plan does not rebuild the compressed model "
            f"({type(exc).__name__}: {' '.join(first[:2])})"
        ) from exc
    fresh.eval()
    model.eval()
    assert torch.allclose(fresh(ctx.example_inputs), model(ctx.example_inputs), atol=1e-5), (
        f"{name}: replaying the plan does not rebuild the compressed model (outputs differ)"
    )
    report.update(achieved=result.achieved, plan_steps=len(result.plan), knob=result.knob)
    return report


def _replay(model: nn.Module, example: torch.Tensor, plan: list[dict[str, Any]], cls: type[Criterion],
            name: str) -> None:
    """:func:`~prunebench.pipeline.surgery.replay`, with this criterion's own steps rebuilt by ``cls``.

    A criterion under test need not be installed yet, so the registry may not know its name.
    """
    from prunebench import registry

    for step in plan:
        if step.get("op") == "replace":
            assert step.get("criterion") == name, (
                f"{name}: plan step replacing {step.get('module')!r} names criterion {step.get('criterion')!r}, "
                f"not {name!r}"
            )
    if name in registry.criteria.names() and registry.criteria.get(name) is cls:
        replay(model, example, plan)
        return
    pending: list[dict[str, Any]] = []
    for step in plan:
        if step.get("op") != "replace":
            pending.append(step)
            continue
        replay(model, example, pending)
        pending = []
        set_module(model, step["module"], cls.rebuild_module(model.get_submodule(step["module"]), step["spec"]))
    replay(model, example, pending)


def _check_scores(crit: ScoreCriterion, name: str, model: nn.Module, calibration: Calibration | None) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = ["stem.0", "conv1", "conv2", "expand", "dw", "project"]
    scores = crit.scores(model, layers, calibration)
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
    again = crit.scores(model, layers, calibration)
    for layer in layers:
        assert torch.allclose(torch.as_tensor(again[layer]).double(), torch.as_tensor(scores[layer]).double()), (
            f"{name}: scores are not deterministic for a fixed seed ({layer})"
        )


__all__ = ["TinyFactorNet", "TinyNet", "check_criterion", "load_compressed"]
