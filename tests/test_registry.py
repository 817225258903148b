import pytest

from prunebench import registry
from prunebench.errors import ConfigError, PluginError
from prunebench.protocols import ScoreCriterion


def test_builtins_come_from_entry_points():
    entries = registry.criteria.entries()
    assert {"l1", "random"} <= set(entries)
    assert entries["l1"].distribution == "prunebench"
    assert {"resnet56", "vgg16_bn"} <= set(registry.architectures.names())
    assert {"digits", "cifar10", "imagefolder"} <= set(registry.datasets.names())


def test_unknown_name_suggests_close_matches_and_lists_available():
    with pytest.raises(ConfigError) as exc:
        registry.architectures.get("resnet65")
    msg = str(exc.value)
    assert "Did you mean 'resnet56'" in msg
    assert "Available:" in msg and "vgg16_bn" in msg


def test_unknown_hyper_parameter_is_rejected_with_suggestion():
    from prunebench.testing import check_criterion  # noqa: F401 - ensures imports are cheap

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


def test_broken_plugin_is_listed_not_fatal():
    reg = registry.Registry("prunebench.criteria", "criterion", registry._validate_criterion)
    reg.register("ghost", "prunebench_no_such_module:Thing", distribution="ghost-dist")
    listing = {item.name: item for item in reg.listing()}
    assert listing["ghost"].broken
    assert "ModuleNotFoundError" in listing["ghost"].error and "ghost-dist" in listing["ghost"].error
    assert not listing["l1"].broken
    with pytest.raises(PluginError, match="failed to load"):
        reg.get("ghost")


def test_plugin_that_is_not_a_criterion_is_rejected_on_load():
    reg = registry.Registry("prunebench.criteria", "criterion", registry._validate_criterion)
    reg.register("notone", "collections:OrderedDict")
    with pytest.raises(PluginError, match="must be a subclass of prunebench.protocols.Criterion"):
        reg.get("notone")


def test_abstract_criterion_names_missing_methods():
    reg = registry.Registry("prunebench.criteria", "criterion", registry._validate_criterion)
    reg.register("abstract", "prunebench.protocols:ScoreCriterion")
    with pytest.raises(PluginError, match="does not implement: scores"):
        reg.get("abstract")


def test_wrong_method_signature_is_rejected_on_load():
    reg = registry.Registry("prunebench.criteria", "criterion", registry._validate_criterion)
    reg.register("badsig", "tests_badsig:BadSig")
    import sys
    import types

    mod = types.ModuleType("tests_badsig")

    class BadSig(ScoreCriterion):
        def scores(self, model):  # missing layers, calibration
            return {}

    mod.BadSig = BadSig
    sys.modules["tests_badsig"] = mod
    try:
        with pytest.raises(PluginError, match=r"scores must accept \(model, layers, calibration\)"):
            reg.get("badsig")
    finally:
        del sys.modules["tests_badsig"]


def test_misspelled_training_hook_is_rejected():
    from prunebench.compress import check_hooks
    from prunebench.protocols import TrainingHooks

    class Typo(TrainingHooks):
        def after_stpe(self, model, step):
            pass

    with pytest.raises(PluginError, match="Did you mean 'after_step'"):
        check_hooks("x", Typo())
    check_hooks("x", TrainingHooks())  # the base is fine
