"""Named layer-ratio profiles: the authors' lists, mapped onto prunebench's layer names."""

from __future__ import annotations

import json
import re

import pytest
import torch

from prunebench import registry
from prunebench.config.profiles import named_profile, named_profiles
from prunebench.config.validation import load_profile
from prunebench.errors import ConfigError


def expand(spec: str) -> list[float]:
    """``[0.]+[0.18]*29`` -> 30 floats (the list syntax of the authors' scripts)."""
    out: list[float] = []
    for term in spec.split("+"):
        m = re.fullmatch(r"\[([0-9.]+)\](?:\*(\d+))?", term.strip())
        assert m, term
        out += [float(m.group(1))] * int(m.group(2) or 1)
    return out


def test_the_shipped_profiles():
    assert named_profiles() == [f"hrank-{a}-{i}" for a in ("resnet56", "vgg16") for i in (1, 2, 3)]
    lists = {named_profile(n)["list"] for n in named_profiles()}
    assert lists == {"[0.]+[0.18]*29", "[0.]+[0.12]*2+[0.4]*27", "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9",
                     "[0.21]*7+[0.75]*5", "[0.3]*7+[0.75]*5", "[0.45]*7+[0.78]*5"}
    for name in named_profiles():
        doc = named_profile(name)
        assert doc["source"].startswith("https://github.com/pvtien96/CORING/blob/6490ff4")


@pytest.mark.parametrize("i", [1, 2, 3])
def test_resnet56_mapping(i):
    doc = named_profile(f"hrank-resnet56-{i}")
    cr = expand(doc["list"])
    assert len(cr) == 30
    expected = {}
    for s in range(3):
        for b in range(9):
            expected[f"layer{s + 1}.{b}.conv1"] = cr[3 + 9 * s + b]  # the 27 inner convs, in order
            expected[f"layer{s + 1}.{b}.conv2"] = cr[1 + s] if s < 2 else 0.0  # residual: stages 1, 2; never 3
    assert doc["ratios"] == expected and cr[0] == 0.0  # the stem entry (left out) is 0
    model = registry.architectures.get("resnet56").build()
    names = dict(model.named_modules())
    assert all(isinstance(names[k], torch.nn.Conv2d) for k in doc["ratios"])


@pytest.mark.parametrize("i", [1, 2, 3])
def test_vgg16_mapping(i):
    doc = named_profile(f"hrank-vgg16-{i}")
    cr = expand(doc["list"])
    arch = registry.architectures.get("vgg16_bn")
    convs = arch.prunable(arch.build())
    assert len(cr) == 12 and len(convs) == 13
    assert doc["ratios"] == {**dict(zip(convs[:12], cr, strict=True)), convs[12]: 0.0}


def test_loading_files_and_names(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"layer1.0.conv1": 0.5}))
    assert load_profile(path) == {"layer1.0.conv1": 0.5}
    assert load_profile("r.json", base=tmp_path) == {"layer1.0.conv1": 0.5}
    assert load_profile("hrank-resnet56-1", arch="resnet56")["layer2.0.conv2"] == 0.18
    with pytest.raises(ConfigError, match="is for architecture 'resnet56', not 'resnet20'"):
        load_profile("hrank-resnet56-1", arch="resnet20")
    with pytest.raises(ConfigError, match="is no named profile. Did you mean 'hrank-vgg16-"):
        load_profile("hrank-vgg16-l")
    path.write_text(json.dumps({"layer1.0.conv1": 1.5}))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\]"):
        load_profile(path)


def test_a_named_profile_drives_a_run_in_both_scopes():
    """Inner scope ignores the residual entries, scope all applies them (stage 3 stays whole)."""
    import copy

    from prunebench.pipeline.compress import compress
    from prunebench.pipeline.meter import Meter
    from prunebench.protocols import CompressionContext, EpochLedger, Target

    arch = registry.architectures.get("resnet56")
    profile = load_profile("hrank-resnet56-3", arch="resnet56")
    for scope in ("inner", "all"):
        model = arch.build().eval()
        example = torch.zeros(1, 3, 8, 8)
        target = Target("macs", 0.5)
        meter = Meter(copy.deepcopy(model), example, target)
        ctx = CompressionContext(
            example_inputs=example, calibration=None, target=target, device=torch.device("cpu"), seed=0,
            prunable=arch.prunable_layers(model, scope), protected=["fc"], ledger=EpochLedger(0.0),
            reduction=meter.reduction, reduction_of=lambda kept, m=model, mt=meter: mt.reduction_of(m, kept),
            train=lambda *a, **k: None, log=lambda msg: None,
        )
        result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter,
                          allocation="profile", profile=profile)
        assert meter.within(result.achieved)
        assert model.layer3[0].conv2.out_channels == 64  # ratio 0: never pruned
        if scope == "inner":
            assert len(result.knob["profile_ignored"]) == 27 and model.layer2[0].conv2.out_channels == 32
        else:
            assert "profile_ignored" not in result.knob
            assert model.layer1[0].conv2.out_channels < 16 and model.layer2[0].conv2.out_channels < 32
            # stages 1 and 2 lose residual channels in the list's proportion (0.4 each)
            assert model.layer1[0].conv2.out_channels / 16 == pytest.approx(model.layer2[0].conv2.out_channels / 32, abs=0.07)


@pytest.mark.parametrize("criterion", ["hbgs", "ht2"])
def test_a_profile_is_refused_for_criteria_that_would_ignore_it(criterion):
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig
    from prunebench.config.validation import check_run

    cfg = RunConfig(criterion=criterion, arch="resnet56", dataset="digits", budget=get_budget("smoke"),
                    allocation="profile", layer_ratios=load_profile("hrank-resnet56-2", arch="resnet56"))
    with pytest.raises(ConfigError, match=f"sets the per-layer rates of score criteria; '{criterion}' is a"):
        check_run(cfg)
