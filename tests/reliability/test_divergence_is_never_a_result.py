"""Promise: a diverged run is never recorded as a result.

Non-finite losses or weights after any training stage (baseline, K-shot, criterion training,
fine-tune, scratch) or after compression fail the run with status ``diverged``; a diverged
baseline is never cached, and a cached or given baseline with non-finite weights is never
used.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from _support import TINY, invoke, records, run_args

from prunebench import registry
from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig
from prunebench.datasets import cache_dir
from prunebench.errors import DivergedError, PrunebenchError
from prunebench.pipeline.baseline import baseline_key
from prunebench.pipeline.data import load_data
from prunebench.protocols import ScoreCriterion


def test_a_fine_tune_that_diverges_is_recorded_as_diverged_not_complete(tmp_path):
    results = tmp_path / "r"
    res = invoke(*run_args(results, "--set", "finetune_lr=1e30"))
    assert isinstance(res.exception, DivergedError), repr(res.exception)
    assert "finetune training diverged" in str(res.exception) and "finetune_lr" in str(res.exception)
    (rec,) = records(results).values()
    assert rec["status"] == "diverged" and "final" not in rec
    assert not list((results / "models").glob("*.pt"))


def test_a_scratch_control_that_diverges_is_recorded_as_diverged(tmp_path):
    from prunebench.pipeline.runner import execute

    good = tmp_path / "baseline.pt"  # a finite baseline, so that only the scratch training diverges
    torch.save(registry.architectures.get("resnet20").build(num_classes=10, in_channels=1).state_dict(), good)
    cfg = RunConfig(criterion="random", arch="resnet20", scratch=True, results_dir=tmp_path / "r",
                    budget=get_budget("smoke", {**TINY, "lr": 1e30}), baseline=good)
    with pytest.raises(DivergedError, match="scratch training diverged"):
        execute(cfg)
    (rec,) = records(tmp_path / "r").values()
    assert rec["status"] == "diverged"


def test_a_diverged_baseline_is_never_cached_and_never_used(tmp_path):
    sets = ("--set", "lr=1e30")
    before = set((cache_dir() / "baselines").glob("*.pt")) if (cache_dir() / "baselines").exists() else set()
    res = invoke(*run_args(tmp_path / "r", *sets))
    assert isinstance(res.exception, DivergedError) and "baseline training diverged" in str(res.exception)
    assert set((cache_dir() / "baselines").glob("*.pt")) == before  # nothing cached
    # the random control is not rescued by a cached NaN baseline either: it diverges too
    args = run_args(tmp_path / "r", *sets)
    args[args.index("l1")] = "random"
    res = invoke(*args)
    assert isinstance(res.exception, DivergedError) and "baseline" in str(res.exception)
    assert {r["status"] for r in records(tmp_path / "r").values()} == {"diverged"}


def nan_checkpoint(model: torch.nn.Module) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    return {"state_dict": state, "seconds": 1.0}


def test_a_cached_baseline_with_non_finite_weights_is_named_set_aside_and_retrained(tmp_path):
    budget = get_budget("smoke", {**TINY, "lr": 0.0123})  # a baseline no other test caches
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=budget, results_dir=tmp_path / "r")
    splits, _ = load_data(cfg, torch.device("cpu"))
    path = cache_dir() / "baselines" / f"{baseline_key(cfg, splits)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    torch.save(nan_checkpoint(model), path)
    res = invoke(*run_args(tmp_path / "r", "--set", "lr=0.0123"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    (rec,) = records(tmp_path / "r").values()
    assert rec["status"] == "complete" and rec["baseline_info"]["source"] == "trained"
    assert path.with_name(path.name + ".corrupt").is_file()  # kept aside, named in the log
    assert torch.isfinite(torch.load(path, weights_only=True)["state_dict"]["conv1.weight"]).all()


def test_a_given_baseline_with_non_finite_weights_is_refused_with_its_path(tmp_path):
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    path = tmp_path / "nan.pt"
    torch.save(nan_checkpoint(model), path)
    res = invoke(*run_args(tmp_path / "r", "--baseline", path))
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert str(path) in str(res.exception) and "non-finite" in str(res.exception)


class NaNCompensation(ScoreCriterion):
    """Scores like l1, then 'compensates' by writing NaN into the kept weights."""

    summary = "test criterion that breaks the weights"

    def scores(self, model, layers, calibration):
        modules = dict(model.named_modules())
        return {n: modules[n].weight.detach().abs().sum((1, 2, 3)) for n in layers}

    def compensate(self, model, removal, calibration):
        with torch.no_grad():
            for name in removal:
                model.get_submodule(name).weight.fill_(float("nan"))


@pytest.fixture
def nan_criterion():
    module = types.ModuleType("reliability_nan_criterion")
    module.NaNCompensation = NaNCompensation
    sys.modules[module.__name__] = module
    registry.criteria.register("nancomp", f"{module.__name__}:NaNCompensation")
    yield "nancomp"
    registry.criteria._extra.pop("nancomp", None)
    del sys.modules[module.__name__]


def test_a_compression_that_leaves_non_finite_weights_is_recorded_as_diverged(tmp_path, nan_criterion):
    results = tmp_path / "r"
    args = run_args(results)
    args[args.index("l1")] = nan_criterion
    res = invoke(*args)
    assert isinstance(res.exception, DivergedError), repr(res.exception)
    assert "compression diverged" in str(res.exception) and nan_criterion in str(res.exception)
    (rec,) = records(results).values()
    assert rec["status"] == "diverged"


# --- non-finite numbers are never published -----------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_dataset_option_is_refused_before_any_work(tmp_path, monkeypatch, value):
    import prunebench.pipeline.runner as runner_mod

    monkeypatch.setattr(runner_mod, "load_data", lambda *a, **k: pytest.fail("work started before the error"))
    args = run_args(tmp_path / "r", "--dataset-option", f"noise={value}")
    args[args.index("digits")] = "synthetic"
    res = invoke(*args)
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert str(res.exception) == f"dataset 'synthetic': option noise={value!r} must be a finite number"
    assert not (tmp_path / "r").exists()


def test_a_non_finite_number_in_a_sweep_file_is_refused(tmp_path):
    (tmp_path / "s.toml").write_text('criteria = ["l1"]\narchitectures = ["resnet20"]\nbudget = "smoke"\n'
                                     'dataset = { name = "synthetic", options = { noise = inf } }\n')
    res = invoke("sweep", tmp_path / "s.toml", "--dry-run", "--results-dir", tmp_path / "r")
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert str(res.exception) == "dataset 'synthetic': option noise=inf must be a finite number"


class Unchecked(ScoreCriterion):
    """A plug-in that does not check its own hyper-parameter."""

    @dataclasses.dataclass(frozen=True)
    class Params:
        weight: float = 1.0

    def scores(self, model, layers, calibration):  # pragma: no cover - never reached
        raise AssertionError("scored")


def test_a_non_finite_hyper_parameter_of_a_plugin_is_refused_before_any_work(tmp_path, monkeypatch):
    import prunebench.pipeline.runner as runner_mod

    monkeypatch.setattr(registry.criteria, "_extra", dict(registry.criteria._extra))
    monkeypatch.setattr(registry.criteria, "_loaded", dict(registry.criteria._loaded))
    registry.criteria.register("unchecked", f"{__name__}:Unchecked", "some-plugin")
    monkeypatch.setattr(runner_mod, "load_data", lambda *a, **k: pytest.fail("work started before the error"))
    args = run_args(tmp_path / "r", "-p", "weight=nan")
    args[args.index("l1")] = "unchecked"
    res = invoke(*args)
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert str(res.exception) == "criterion 'unchecked': hyper-parameter 'weight' must be a finite number, got nan"
    assert not (tmp_path / "r").exists()


def test_a_run_whose_record_would_hold_a_non_finite_number_fails_and_writes_valid_json(tmp_path, monkeypatch):
    import json

    import prunebench.pipeline.runner as runner_mod

    monkeypatch.setattr(runner_mod, "peak_memory_mb", lambda device: float("nan"))
    res = invoke(*run_args(tmp_path / "r"))
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert "compress_peak_memory_mb is not a finite number" in str(res.exception)
    (path,) = (tmp_path / "r").glob("*.json")

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the record")

    rec = json.loads(path.read_text(), parse_constant=refuse)  # strict JSON: no NaN, no Infinity
    assert rec["status"] == "failed" and rec["compress_peak_memory_mb"] is None
    assert not list((tmp_path / "r" / "models").glob("*.pt"))
