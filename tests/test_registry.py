from collections import OrderedDict

import pytest

from prunebench import registry
from prunebench.datasets.digits import DIGITS
from prunebench.errors import ConfigError, PluginError
from prunebench.protocols import (
    AllocateCriterion,
    Criterion,
    Kind,
    Knob,
    ScoreCriterion,
    TrainingHooks,
    TransformCriterion,
)


def test_builtins_come_from_entry_points():
    entries = registry.criteria.entries()
    builtin = {"l1", "random", "coring", "qsfm", "hbgs", "hbgs-b", "hbgts", "hbgts-b", "ht2", "trp"}
    assert builtin <= set(entries)
    for name in builtin:  # each one is what its entry point promises
        assert entries[name].distribution == "prunebench"
        cls = registry.criteria.get(name)
        assert cls.name == name and isinstance(cls.needs_data, bool)
        assert isinstance(cls.summary, str) and cls.summary and isinstance(cls.reference, str) and cls.reference
    assert {n for n in builtin if registry.criteria.get(n).needs_data} == {"qsfm", "hbgs", "hbgs-b", "hbgts", "hbgts-b", "trp"}
    assert {"resnet56", "vgg16_bn"} <= set(registry.architectures.names())
    assert {"digits", "cifar10", "imagefolder"} <= set(registry.datasets.names())


def test_unknown_name_suggests_close_matches_and_lists_available():
    with pytest.raises(ConfigError) as exc:
        registry.architectures.get("resnet65")
    msg = str(exc.value)
    assert "Did you mean 'resnet56'" in msg
    assert "Available:" in msg and "vgg16_bn" in msg


def test_unknown_hyper_parameter_is_rejected_with_suggestion():
    class Knobbed(ScoreCriterion):
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Params:
            distance: str = "vbd"

        def scores(self, model, layers, calibration):
            return {}

    with pytest.raises(ConfigError, match="no hyper-parameter 'distanse'.*Did you mean 'distance'"):
        Knobbed.from_kwargs(distanse="cosine")
    assert Knobbed.from_kwargs(distance="cosine").params.distance == "cosine"


def test_command_line_strings_become_the_declared_types():
    from dataclasses import dataclass

    class Typed(ScoreCriterion):
        @dataclass(frozen=True)
        class Params:
            rank: int = 1
            energy: float = 0.5
            compensate: bool = True
            distance: str = "vbd"

        def scores(self, model, layers, calibration):
            return {}

    p = Typed.from_kwargs(rank="3", energy="0.25", compensate="off", distance="1").params
    assert (p.rank, p.energy, p.compensate, p.distance) == (3, 0.25, False, "1")
    assert Typed.from_kwargs(compensate="yes").params.compensate is True
    for key, value, typ in [("rank", "2.5", "int"), ("energy", "high", "float"), ("compensate", "maybe", "bool")]:
        with pytest.raises(ConfigError, match=f"hyper-parameter '{key}' expects {typ}, got '{value}'"):
            Typed.from_kwargs(**{key: value})


def test_broken_plugin_is_listed_not_fatal():
    reg = registry.Registry("prunebench.criteria", "criterion", registry._validate_criterion)
    reg.register("ghost", "prunebench_no_such_module:Thing", distribution="ghost-dist")
    listing = {item.name: item for item in reg.listing()}
    assert listing["ghost"].broken
    assert "ModuleNotFoundError" in listing["ghost"].error and "ghost-dist" in listing["ghost"].error
    assert not listing["l1"].broken
    with pytest.raises(PluginError, match="failed to load"):
        reg.get("ghost")


# --- what the registry refuses to load ------------------------------------------------------


class _Scores(ScoreCriterion):
    def scores(self, model, layers, calibration):
        return {}


class _Transform(TransformCriterion):
    knob = Knob("energy", 0.0, 1.0, increases_compression=False)

    def transform(self, model, value, ctx):
        return []

    @classmethod
    def rebuild_module(cls, original, spec):
        return original


class _Allocate(AllocateCriterion):
    def allocate(self, model, ctx):
        return {}


class DirectCriterion(Criterion):
    kind = Kind.SCORE

    def scores(self, model, layers, calibration):
        return {}


class NoRebuild(TransformCriterion):
    knob = Knob("energy", 0.0, 1.0, increases_compression=False)

    def transform(self, model, value, ctx):
        return []


class NoAllocate(AllocateCriterion):
    pass


class PlainParams(_Scores):
    class Params:
        energy = 0.5


class NoKnob(TransformCriterion):
    def transform(self, model, value, ctx):
        return []

    @classmethod
    def rebuild_module(cls, original, spec):
        return original


class TupleKnob(_Transform):
    knob = ("energy", 0.0, 1.0)


class ScoresTooFew(ScoreCriterion):
    def scores(self, model):
        return {}


class ScoresTooMany(ScoreCriterion):
    def scores(self, model, layers, calibration, extra):
        return {}


class AllocateTooFew(AllocateCriterion):
    def allocate(self, model):
        return {}


class TransformTooFew(_Transform):
    def transform(self, model, value):
        return []


class ScoresKeywordOnly(ScoreCriterion):
    def scores(self, model, *, layers, calibration):
        return {}


def load(monkeypatch, obj, name="bad", kind="criterion"):
    """Register ``obj`` as a plug-in of ``kind`` and load it, as the registry does for an entry point."""
    import sys
    import types

    module = types.ModuleType("prunebench_test_plugins")
    module.obj = obj
    monkeypatch.setitem(sys.modules, "prunebench_test_plugins", module)
    validate = {"criterion": registry._validate_criterion, "architecture": registry._validate_architecture,
                "dataset": registry._validate_dataset}[kind]
    reg = registry.Registry(f"prunebench.{kind}", kind, validate)
    reg.register(name, "prunebench_test_plugins:obj", distribution="bad-dist")
    return reg.get(name)


SIGNATURE = "must accept ({}), but its signature is {}"


INVALID = [
    (ScoreCriterion.scores, "criterion 'bad' must be a subclass of prunebench.protocols.Criterion, got <function"),
    (_Scores(), "criterion 'bad' must be a subclass of prunebench.protocols.Criterion, got <"),
    (OrderedDict, "criterion 'bad' must be a subclass of prunebench.protocols.Criterion, got <class "
                  "'collections.OrderedDict'>"),
    (DirectCriterion, "criterion 'bad' must subclass one of ['ScoreCriterion', 'AllocateCriterion', "
                      "'TransformCriterion']"),
    (ScoreCriterion, "criterion 'bad' (ScoreCriterion) does not implement: scores"),
    (NoRebuild, "criterion 'bad' (NoRebuild) does not implement: rebuild_module"),
    (NoAllocate, "criterion 'bad' (NoAllocate) does not implement: allocate"),
    (PlainParams, "criterion 'bad': Params must be a dataclass"),
    (NoKnob, "criterion 'bad': a transform criterion must declare `knob = Knob(...)`"),
    (TupleKnob, "criterion 'bad': a transform criterion must declare `knob = Knob(...)`"),
    (ScoresTooFew, "ScoresTooFew.scores " + SIGNATURE.format("model, layers, calibration", "(self, model)")),
    (ScoresTooMany, "ScoresTooMany.scores " + SIGNATURE.format("model, layers, calibration",
                                                                "(self, model, layers, calibration, extra)")),
    (ScoresKeywordOnly, "ScoresKeywordOnly.scores " + SIGNATURE.format(
        "model, layers, calibration", "(self, model, *, layers, calibration)")),
    (AllocateTooFew, "AllocateTooFew.allocate " + SIGNATURE.format("model, ctx", "(self, model)")),
    (TransformTooFew, "TransformTooFew.transform " + SIGNATURE.format("model, value, ctx", "(self, model, value)")),
]


@pytest.mark.parametrize("obj, message", INVALID, ids=[
    "function", "instance", *(obj.__name__ for obj, _ in INVALID[2:])])
def test_invalid_criterion_shapes_are_refused_on_load(monkeypatch, obj, message):
    with pytest.raises(PluginError) as exc:
        load(monkeypatch, obj)
    assert message in str(exc.value)
    assert str(exc.value).endswith("[plug-in 'bad' from bad-dist ]")  # which package to blame


class OptionalExtra(ScoreCriterion):
    def scores(self, model, layers, calibration, weights=None):
        return {}


class VarArgs(AllocateCriterion):
    def allocate(self, *args):
        return {}


@pytest.mark.parametrize("cls", [_Scores, _Allocate, _Transform, OptionalExtra, VarArgs])
def test_valid_criterion_shapes_load(monkeypatch, cls):
    assert load(monkeypatch, cls, name="fine") is cls
    assert cls.name == "fine"  # the entry point's name


def build_tiny(num_classes=10, in_channels=3):
    """An architecture's build function, registered instead of its Architecture."""
    from prunebench.testing import TinyNet

    return TinyNet(num_classes, in_channels)


@pytest.mark.parametrize("kind, obj, message", [
    ("architecture", build_tiny, "architecture 'bad' must be a prunebench.architectures.Architecture, got "
                                 "<function build_tiny"),
    ("dataset", DIGITS.load, "dataset 'bad' must be a prunebench.datasets.base.Dataset, got <function"),
], ids=["architecture", "dataset"])
def test_architectures_and_datasets_are_checked_on_load(monkeypatch, kind, obj, message):
    with pytest.raises(PluginError) as exc:
        load(monkeypatch, obj, kind=kind)
    assert message in str(exc.value)
    good = registry.architectures.get("resnet20") if kind == "architecture" else DIGITS
    assert load(monkeypatch, good, name="fine", kind=kind) is good



class TypoStep(TrainingHooks):
    def after_stpe(self, model, step):
        pass


class TypoLoss(TrainingHooks):
    def extra_los(self, model):
        return None


class TypoEnd(TrainingHooks):
    def on_train_ends(self, model):
        pass


class NotHooks:
    def after_step(self, model, step):
        pass


class WithHelpers(TrainingHooks):
    """Helpers that are nothing like a hook name are fine, and so are private ones."""

    def project(self):
        pass

    def _after_stpe(self):
        pass


HOOKS = "Hooks: after_backward, after_step, extra_loss, on_train_end"


@pytest.mark.parametrize("hooks, message", [
    (TypoStep(), "criterion 'x': hook method 'after_stpe' is not a training hook and would never be called. "
                 "Did you mean 'after_step'? " + HOOKS),
    (TypoLoss(), "hook method 'extra_los' is not a training hook and would never be called. "
                 "Did you mean 'extra_loss'?"),
    (TypoEnd(), "hook method 'on_train_ends' is not a training hook and would never be called. "
                "Did you mean 'on_train_end'?"),
    (NotHooks(), "criterion 'x': training_hooks() must return a TrainingHooks, got <"),
], ids=["after_stpe", "extra_los", "on_train_ends", "not-hooks"])
def test_unknown_training_hook_names_are_rejected(hooks, message):
    from prunebench.pipeline.guard import check_hooks

    with pytest.raises(PluginError) as exc:
        check_hooks("x", hooks)
    assert message in str(exc.value)


@pytest.mark.parametrize("hooks", [None, TrainingHooks(), WithHelpers()])
def test_valid_training_hooks_pass(hooks):
    from prunebench.pipeline.guard import check_hooks

    check_hooks("x", hooks)
