"""--round-to N: kept channel counts are multiples of N (torch-pruning's round_to idea), the
target is still met within its tolerance, and the option enters the run id and the record
only when given."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_sweep import invoke, write_config
from torch import nn

from prunebench import registry
from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.pipeline.allocation import removable_counts
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target
from prunebench.sweep.spec import load_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"baseline_epochs": 1, "finetune_epochs": 1, "train_subset": 128, "test_subset": 64, "batch_size": 16,
        "latency_repeats": 1, "calibration_size": 32}
TINY_SETS = [f"--set={k}={v}" for k, v in TINY.items()]


def _compress(criterion="l1", allocation="uniform", scope=None, round_to=None, ratio=0.5, arch_name="resnet20",
              profile=None):
    arch = registry.architectures.get(arch_name)
    torch.manual_seed(0)
    model = arch.build(num_classes=10, in_channels=3).eval()
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    example = images[:1]
    target = Target("macs", ratio)
    meter = Meter(copy.deepcopy(model), example, target)
    layers = arch.prunable_layers(model, scope)
    ctx = CompressionContext(
        example_inputs=example, calibration=Calibration(images, torch.zeros(32, dtype=torch.long), 32),
        target=target, device=torch.device("cpu"), seed=0, prunable=layers, protected=arch.protected(model),
        ledger=EpochLedger(0.0), reduction=meter.reduction, reduction_of=lambda kept: meter.reduction_of(model, kept),
        train=lambda *a, **k: None, log=lambda msg: None,
    )
    result = compress(registry.criteria.get(criterion).from_kwargs(), model, ctx, meter, allocation=allocation,
                      profile=profile, round_to=round_to)
    return model, result, meter, layers


def _widths(model: nn.Module, layers) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {n: modules[n].out_channels for n in layers}


def test_only_widths_that_are_multiples_of_n_are_allowed():
    assert removable_counts(16, 14, 8) == [0, 8]
    assert removable_counts(20, 18, 8) == [0, 4, 12]
    assert removable_counts(6, 5, 8) == [0]  # narrower than N: kept whole
    assert removable_counts(16, 14, None) == removable_counts(16, 14, 1) == list(range(15))


@pytest.mark.parametrize("criterion, allocation, scope, n", [
    ("l1", "uniform", None, 8), ("l1", "global", None, 8), ("random", "uniform", None, 8),
    ("l1", "uniform", None, 4), ("l1", "uniform", "all", 8), ("coring", "global", "all", 4),
])
def test_round_to_meets_the_target_with_widths_that_are_multiples_of_n(criterion, allocation, scope, n):
    model, result, meter, layers = _compress(criterion, allocation, scope, round_to=n)
    assert meter.within(result.achieved)
    widths = _widths(model, layers)
    assert all(w % n == 0 for w in widths.values()), widths
    assert any(w < full for w, full in zip(widths.values(), _widths(_fresh(), layers).values(), strict=True))
    assert result.knob["round_to"] == n


def test_round_to_with_a_profile_meets_the_target():
    profile = {f"layer{s}.{b}.conv1": 0.3 * s for s in (1, 2, 3) for b in range(3)}
    model, result, meter, layers = _compress(allocation="profile", profile=profile, round_to=8)
    assert meter.within(result.achieved)
    assert all(w % 8 == 0 for w in _widths(model, layers).values())


def _fresh() -> nn.Module:
    return registry.architectures.get("resnet20").build(num_classes=10, in_channels=3)


def test_without_round_to_the_plan_is_what_it_was():
    _, plain, _, _ = _compress()
    _, one, _, _ = _compress(round_to=1)
    assert plain.plan == one.plan and "round_to" not in plain.knob
    widths = [s["keep"] for s in plain.plan]
    assert any(len(k) % 8 for k in widths)  # unrounded widths exist, so rounding above changed something


def test_round_to_enters_the_run_id_only_when_given():
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"))
    rounded = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), round_to=8)
    assert "round_to" not in cfg.identity()
    assert RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), round_to=1).identity() == cfg.identity()
    assert rounded.identity() == {**cfg.identity(), "round_to": 8}
    assert run_id(rounded.identity()) != run_id(cfg.identity())
    with pytest.raises(Exception, match="round_to must be a whole number >= 1"):
        RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke"), round_to=0)


def test_a_run_with_round_to_records_it_and_keeps_rounded_widths(tmp_path):
    results = tmp_path / "r"
    res = invoke("run", "-c", "l1", "-a", "resnet20", "-d", "digits", "--budget", "smoke", *TINY_SETS,
                 "--results-dir", results, "-q", "--round-to", "8")
    assert res.exit_code == 0, res.output + repr(res.exception)
    [path] = Path(results).glob("*.json")
    record = json.loads(path.read_text())
    assert record["round_to"] == 8 and record["identity"]["round_to"] == 8 and record["knob"]["round_to"] == 8
    assert record["achieved"]["within_tolerance"] is True
    assert all(w % 8 == 0 for w in record["widths"].values()), record["widths"]


def test_round_to_with_a_criterion_that_chooses_no_widths_is_refused(tmp_path):
    res = invoke("run", "-c", "ht2", "-a", "resnet20", "-d", "digits", "--budget", "smoke",
                 "--results-dir", tmp_path / "r", "--round-to", "8")
    assert res.exit_code != 0 and "would ignore it" in str(res.exception)
    assert not (tmp_path / "r").exists()


def test_the_sweep_key_round_to_reaches_every_run(tmp_path):
    spec = load_sweep(write_config(tmp_path / "s.toml", criteria=["l1"], controls=["random", "scratch"], round_to=8))
    assert {cfg.round_to for cfg in spec.runs()} == {8}
    assert all(cfg.identity()["round_to"] == 8 for cfg in spec.runs())
    plain = load_sweep(write_config(tmp_path / "p.toml", criteria=["l1"], controls=["random", "scratch"]))
    assert all("round_to" not in cfg.identity() for cfg in plain.runs())
