"""Promise: a criterion trains only through the ledger, and cannot change its calibration data.

Every criterion gets the same post-baseline epochs (the ledger); training during compression
goes through ``ctx.train``, which charges them. An optimizer step anywhere else during
compression, a score criterion whose ``scores()`` changes the model's parameters or buffers,
and a write to the calibration data each fail the run with one line naming the criterion.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _support import invoke, records, run_args

from prunebench import registry
from prunebench.errors import PluginError, TargetMissedError
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.protocols import AllocateCriterion, Calibration, CompressionContext, EpochLedger, Target
from prunebench.testing import TINY_PROTECTED, TINY_PRUNABLE, TinyNet

L1 = registry.criteria.get("l1")


class TrainsInScores(L1):
    """Trains on the calibration batches inside scores() (an unpaid fine-tune), then scores as l1."""

    def scores(self, model, layers, calibration):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for images, labels in calibration.batches():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
        return super().scores(model, layers, calibration)


class EditsWeightsInScores(L1):
    def scores(self, model, layers, calibration):
        with torch.no_grad():
            next(model.parameters()).mul_(1.01)
        return super().scores(model, layers, calibration)


class WritesCalibration(L1):
    def scores(self, model, layers, calibration):
        calibration.images.mul_(0.5)
        return super().scores(model, layers, calibration)


class WritesCalibrationBehindTorchsBack(L1):
    """Writes through numpy, which torch's in-place counters do not see."""

    def scores(self, model, layers, calibration):
        calibration.images.numpy()[0] = 0.0
        return super().scores(model, layers, calibration)


class StepsAndHides(AllocateCriterion):
    """Steps an optimizer inside allocate() and swallows the error."""

    def allocate(self, model, ctx):
        try:
            torch.optim.SGD(model.parameters(), lr=0.1).step()
        except Exception:  # noqa: BLE001 - hiding it is the point
            pass
        return {}


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.setattr(registry.criteria, "_extra", dict(registry.criteria._extra))

    def register(name: str, cls: type) -> str:
        monkeypatch.setattr(registry.criteria, "_loaded", dict(registry.criteria._loaded))
        registry.criteria.register(name, f"{__name__}:{cls.__name__}", "sneaky-criteria")
        return name
    return register


def test_a_criterion_that_trains_inside_scores_fails_the_run_naming_it(tmp_path, plugin):
    name = plugin("trains-in-scores", TrainsInScores)
    args = run_args(tmp_path / "r")
    args[args.index("l1")] = name
    res = invoke(*args)
    assert isinstance(res.exception, PluginError), res.output + repr(res.exception)
    assert str(res.exception) == (f"criterion {name!r} took an optimizer step outside the ledger's training; "
                                  "training during compression must go through ctx.train, which charges its epochs")
    (rec,) = records(tmp_path / "r").values()
    assert rec["status"] == "failed" and "final" not in rec


def tiny_compression(criterion, train=lambda *a, **k: None):
    """Compress a TinyNet with ``criterion``, with calibration data and a one-epoch ledger."""
    model = TinyNet().eval()
    example = torch.randn(1, 3, 8, 8)
    target = Target("macs", 0.3, 0.05)
    meter = Meter(copy.deepcopy(model), example, target)
    calibration = Calibration(images=torch.randn(8, 3, 8, 8), labels=torch.zeros(8, dtype=torch.long), batch_size=4)
    ctx = CompressionContext(
        example_inputs=example, calibration=calibration, target=target, device=torch.device("cpu"), seed=0,
        prunable=TINY_PRUNABLE, protected=TINY_PROTECTED, ledger=EpochLedger(1.0), reduction=meter.reduction,
        reduction_of=lambda kept: meter.reduction_of(model, kept), train=train,
    )
    return compress(criterion, model, ctx, meter)


@pytest.mark.parametrize("cls, message", [
    (EditsWeightsInScores, "changed the model's parameters or buffers in scores(), outside the ledger's training"),
    (WritesCalibration, "wrote to the calibration data in scores(); they are read-only"),
    (WritesCalibrationBehindTorchsBack, "wrote to the calibration data in compression; they are read-only"),
    (StepsAndHides, "took an optimizer step outside the ledger's training"),
])
def test_a_criterion_that_bypasses_the_ledger_is_a_one_line_error_naming_it(cls, message):
    criterion = cls()
    criterion.name = "sneaky"
    with pytest.raises(PluginError) as exc:
        tiny_compression(criterion)
    assert str(exc.value).startswith("criterion 'sneaky' ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_training_through_the_ledger_is_allowed():
    """The same optimizer step, taken inside ctx.train, is the ledger's training."""
    steps = []

    class TrainsThroughTheLedger(AllocateCriterion):
        def allocate(self, model, ctx):
            ctx.train(model, 1.0)
            return {"conv1": torch.arange(12), "expand": torch.arange(12)}

    def train(model, epochs, hooks=None, purpose="compress"):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        steps.append(epochs)

    criterion = TrainsThroughTheLedger()
    criterion.name = "honest"
    with pytest.raises(TargetMissedError):  # past the guard; the allocation itself is arbitrary
        tiny_compression(criterion, train)
    assert steps == [1.0]
