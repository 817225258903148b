"""Every registered criterion, built-in or installed, passes the contract check (timm-style),
and the check rejects criteria that break the contract, naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.errors import PluginError
from prunebench.protocols import AllocateCriterion, Knob, ScoreCriterion, TrainingHooks, TransformCriterion
from prunebench.testing import check_criterion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", registry.criteria.names())
def test_registered_criterion_meets_contract(name):
    report = check_criterion(name)
    assert abs(report["achieved"] - 0.3) <= 0.01  # the protocol's ±1 pp, for every kind
    assert report["plan_steps"] >= 1
    assert report["model"] == ("TinyFactorNet" if report["kind"] == "transform" else "TinyNet")


# --- deliberately broken criteria --------------------------------------------------------


class L1Like(ScoreCriterion):
    """A correct score criterion; the broken ones below change one thing each."""

    name = "l1like"

    def scores(self, model, layers, calibration):
        modules = dict(model.named_modules())
        return {n: modules[n].weight.detach().abs().flatten(1).sum(1) for n in layers}


class ShortScores(L1Like):
    def scores(self, model, layers, calibration):
        out = super().scores(model, layers, calibration)
        out["conv1"] = out["conv1"][:-1]
        return out


class NaNScores(L1Like):
    def scores(self, model, layers, calibration):
        out = super().scores(model, layers, calibration)
        out["expand"] = out["expand"].clone()
        out["expand"][3] = float("nan")
        return out


class MissingLayer(L1Like):
    def scores(self, model, layers, calibration):
        out = super().scores(model, layers, calibration)
        del out["dw"]
        return out


class EditsTheModel(L1Like):
    def scores(self, model, layers, calibration):
        with torch.no_grad():
            model.get_submodule("conv2").weight.mul_(2.0)
        return super().scores(model, layers, calibration)


class Unseeded(L1Like):
    def scores(self, model, layers, calibration):
        modules = dict(model.named_modules())
        return {n: torch.rand(modules[n].out_channels) for n in layers}


class KeepsEverything(AllocateCriterion):
    """An allocate criterion that ignores the target."""

    name = "keepseverything"

    def allocate(self, model, ctx):
        return {n: torch.arange(model.get_submodule(n).out_channels) for n in ctx.prunable}


class _Split(TransformCriterion):
    """Each 3x3 conv (stem aside) -> 3x3 C->R then 1x1 R->N. ``fraction`` sets a total of
    ``units`` ranks, dealt to the layers in turn, so one unit moves one layer by one rank;
    ``units`` is rounded to a multiple of ``step``. The subclasses break one thing each.
    """

    name = "split"
    knob = Knob("fraction", 0.0, 1.0, increases_compression=False)
    step = 1

    def transform(self, model, value, ctx):
        convs = [(n, m) for n, m in model.named_modules()
                 if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.groups == 1 and n != "stem.0"]
        full = [min(m.out_channels, 9 * m.in_channels) for _, m in convs]
        units = max(self.step, round(value * sum(full) / self.step) * self.step)
        steps = []
        for i, ((name, conv), cap) in enumerate(zip(convs, full, strict=True)):
            rank = min(cap, max(1, -(-(units - i) // len(convs))))
            spec = self.spec(rank)
            _set(model, name, self.rebuild_module(conv, spec))
            steps.append({"op": "replace", "module": name, "criterion": self.name, "spec": spec})
        return steps

    def spec(self, rank):
        return {"rank": rank}

    @classmethod
    def rebuild_module(cls, original, spec):
        r = int(spec["rank"])
        return nn.Sequential(nn.Conv2d(original.in_channels, r, 3, padding=1, bias=False),
                             nn.Conv2d(r, original.out_channels, 1, bias=False))


def _set(model, dotted, new):
    parent, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class CoarseSplit(_Split):
    """Four ranks at a time: the MACs move by about 3 points per step, so ±1 pp is out of reach."""

    name = "coarsesplit"
    step = 4


class NoOpTransform(_Split):
    name = "noop"

    def transform(self, model, value, ctx):
        return []


class WrongShapes(_Split):
    """Its plan rebuilds each conv one rank wider than the one it compressed to."""

    name = "wrongshapes"

    @classmethod
    def rebuild_module(cls, original, spec):
        return super().rebuild_module(original, {"rank": int(spec["rank"]) + int(spec.get("extra", 0))})

    def transform(self, model, value, ctx):
        steps = super().transform(model, value, ctx)
        return [{**s, "spec": {**s["spec"], "extra": 1}} for s in steps]


class WrongStructure(_Split):
    """Its plan rebuilds the same weight shapes wired differently (a dilated 3x3 conv)."""

    name = "wrongstructure"

    def transform(self, model, value, ctx):
        steps = super().transform(model, value, ctx)
        return [{**s, "spec": {**s["spec"], "dilation": 2}} for s in steps]

    @classmethod
    def rebuild_module(cls, original, spec):
        new = super().rebuild_module(original, spec)
        d = int(spec.get("dilation", 1))
        new[0].dilation, new[0].padding = (d, d), (d, d)
        return new


class TensorInPlan(_Split):
    name = "tensorinplan"

    def spec(self, rank):
        return {"rank": torch.tensor(rank)}


class Misnamed(_Split):
    """Its plan steps name another criterion, so a run's saved model would not rebuild."""

    name = "misnamed"

    def transform(self, model, value, ctx):
        return [{**s, "criterion": "ht2"} for s in super().transform(model, value, ctx)]


class TypoHooks(TrainingHooks):
    def after_stpe(self, model, step):
        pass


class HookedSplit(_Split):
    name = "hookedsplit"

    def training_epochs(self, ctx):
        return 0.25

    def training_hooks(self, model, ctx):
        return TypoHooks()


def test_the_broken_criteria_differ_from_a_working_one_only_where_meant():
    assert abs(check_criterion(L1Like)["achieved"] - 0.3) <= 0.01
    assert abs(check_criterion(_Split)["achieved"] - 0.3) <= 0.01


@pytest.mark.parametrize("criterion, message", [
    (ShortScores, "l1like: scores for 'conv1' have shape (23,), expected (24,)"),
    (NaNScores, "l1like: non-finite scores for 'expand'"),
    (MissingLayer, "l1like: scores() returned nothing for layer 'dw'"),
    (EditsTheModel, "l1like: scores() modified the model (conv2.weight)"),
    (Unseeded, "l1like: scores are not deterministic for a fixed seed (stem.0)"),
    (KeepsEverything, "keepseverything: misses the target on TinyNet: criterion 'keepseverything' reached "
                      "0.00% macs reduction, outside 30.0% ± 1.0%"),
    (NoOpTransform, "noop: misses the target on TinyFactorNet: noop: no fraction in [0.0, 1.0] gives "
                    "30.0% ± 1.0% macs reduction; closest 0.00%"),
    (CoarseSplit, "coarsesplit: misses the target on TinyFactorNet: coarsesplit: no fraction in [0.0, 1.0] "
                  "gives 30.0% ± 1.0% macs reduction; closest"),
    (WrongShapes, "wrongshapes: replaying the plan does not rebuild the compressed model (RuntimeError: "
                  "Error(s) in loading state_dict"),
    (WrongStructure, "wrongstructure: replaying the plan does not rebuild the compressed model (outputs differ)"),
    (TensorInPlan, "tensorinplan: the plan is not plain JSON data"),
    (Misnamed, "misnamed: plan step replacing 'blocks.0.conv1' names criterion 'ht2', not 'misnamed'"),
])
def test_check_criterion_names_the_violation(criterion, message):
    with pytest.raises(AssertionError) as exc:
        check_criterion(criterion)
    assert message in str(exc.value)


def test_a_coarse_transform_misses_by_more_than_a_point_not_by_more_than_five():
    """What CoarseSplit above is for: a transform that a ±5 pp check would let through."""
    with pytest.raises(AssertionError, match=r"closest (\d+\.\d+)%") as exc:
        check_criterion(CoarseSplit)
    closest = float(str(exc.value).split("closest ")[1].split("%")[0]) / 100
    assert 0.01 < abs(closest - 0.3) < 0.05


class _NoKnob(_Split):
    name = "noknob"
    knob = None


class _ParamsNotDataclass(L1Like):
    class Params:
        pass


@pytest.mark.parametrize("criterion, message", [
    (nn.Conv2d, "must be a subclass of prunebench.protocols.Criterion"),
    (_NoKnob, "a transform criterion must declare `knob = Knob(...)`"),
    (_ParamsNotDataclass, "Params must be a dataclass"),
    (HookedSplit, "hook method 'after_stpe' is not a training hook and would never be called. "
                  "Did you mean 'after_step'?"),
])
def test_check_criterion_rejects_what_the_registry_rejects(criterion, message):
    with pytest.raises(PluginError) as exc:
        check_criterion(criterion)
    assert message in str(exc.value)
