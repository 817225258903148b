"""The smaller-dense control: a smaller network of the family, started like the run's baseline,
trained for the post-compression epochs and recorded against the larger one (tiny digits runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_sweep import TINY, dry_run_ids, invoke, write_config

from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.config.validation import check_run
from prunebench.errors import ConfigError
from prunebench.leaderboard import build
from prunebench.pipeline.metrics import count_macs
from prunebench.pipeline.surgery import load_compressed

BUDGET = {k: v for k, v in TINY.items() if k != "name"}
SETS = [f"--set={k}={v}" for k, v in BUDGET.items()]


def test_a_dense_run_records_the_smaller_network_against_the_larger(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    res = invoke("run", "--dense", "resnet20", "-a", "resnet32", "-d", "digits", "--budget", "smoke", *SETS,
                 "--results-dir", tmp_path / "r", "-q")
    assert res.exit_code == 0, res.output
    (path,) = (tmp_path / "r").glob("*.json")
    assert path.name.startswith("digits-resnet32-dense-resnet20-smoke-s0-")
    rec = json.loads(path.read_text())
    assert rec["status"] == "complete" and rec["criterion"] == "dense" and rec["dense"] == "resnet20"
    assert rec["identity"]["target"] is None and rec["identity"]["dense"] == "resnet20"
    # counted against the larger network: resnet20 has 3 blocks per stage, resnet32 5
    import torch

    from prunebench import registry

    def macs(name):
        return count_macs(registry.architectures.get(name).build(num_classes=10, in_channels=1),
                          torch.zeros(1, 1, 8, 8))

    assert rec["macs"] == {"before": macs("resnet32"), "after": macs("resnet20")}
    assert rec["achieved"]["macs_reduction"] == round(1 - macs("resnet20") / macs("resnet32"), 6)
    assert rec["target"]["ratio"] == round(rec["achieved"]["macs_reduction"], 4)
    # the same post-compression epochs as a pruned row, and its own baseline beside the reference's
    assert rec["ledger"]["total_epochs"] == BUDGET.get("finetune_epochs", 2)
    assert rec["baseline_info"]["key"].startswith("resnet32-") and rec["dense_info"]["key"].startswith("resnet20-")
    assert rec["oneshot_bn"] is None and rec["widths"] == {}
    # the stored model is the trained smaller network
    model, _ = load_compressed(path.parent / rec["model_file"])
    assert sum(1 for _ in model.modules()) < sum(1 for _ in registry.architectures.get("resnet32").build(
        num_classes=10, in_channels=1).modules())
    # and the leaderboard shows it as a control of resnet32's page
    page = build(tmp_path / "r")["digits-resnet32.md"]
    assert "digits · resnet32 · smaller dense networks (control) · budget `smoke~" in page


def test_dense_runs_do_not_depend_on_the_target_or_the_pruning_options():
    base = dict(criterion="random", arch="resnet56", dataset="digits", budget=get_budget("smoke"), dense="resnet20")
    ids = {run_id(RunConfig(**{**base, **over}).identity()) for over in (
        {}, {"allocation": "profile", "layer_ratios": {"layer1.0.conv1": 0.3}}, {"max_layer_ratio": 0.5},
        {"scope": "all"}, {"criterion": "l1"})}
    assert len(ids) == 1
    assert run_id(RunConfig(**{**base, "dense": "resnet32"}).identity()) not in ids
    assert run_id(RunConfig(**{**base, "seed": 1}).identity()) not in ids


@pytest.mark.parametrize(("dense", "message"), [
    ("resnet21", "unknown dense-control architecture 'resnet21'. Did you mean 'resnet32' or 'resnet20'"),
    ("resnet56", "the dense control of resnet56 must be another, smaller architecture"),
])
def test_a_bad_dense_architecture_is_one_line_before_any_work(dense, message):
    cfg = RunConfig(criterion="random", arch="resnet56", dataset="digits", budget=get_budget("smoke"), dense=dense)
    with pytest.raises(ConfigError, match=message):
        check_run(cfg)


def test_run_needs_a_criterion_or_a_dense_control(tmp_path):
    res = invoke("run", "-a", "resnet20", "--results-dir", tmp_path)
    assert isinstance(res.exception, ConfigError) and "give --criterion NAME" in str(res.exception)
    res = invoke("run", "-c", "l1", "--dense", "resnet20", "-a", "resnet32", "--results-dir", tmp_path)
    assert isinstance(res.exception, ConfigError) and "either --criterion or --dense, not both" in str(res.exception)
    assert not list(Path(tmp_path).glob("*.json"))


def test_a_sweep_adds_one_dense_run_per_architecture_and_seed_whatever_the_targets(tmp_path):
    cfg = write_config(tmp_path / "s.toml", criteria=["l1"], architectures=["resnet32"], targets=[0.3, 0.5],
                       seeds=[0, 1], controls=None, dense=["resnet20"])
    ids = dry_run_ids(cfg, tmp_path / "r")
    assert sorted(i for i in ids if "-dense-" in i) == sorted(
        i for i in ids if i.startswith("digits-resnet32-dense-resnet20-smoke-s")) and \
        len([i for i in ids if "-dense-" in i]) == 2
    assert len(ids) == 2 * 2 + 2
    # a file of dense controls alone lists no criterion
    only = write_config(tmp_path / "d.toml", criteria=[], architectures=["resnet32"], controls=None,
                        dense=["resnet20"])
    assert len(dry_run_ids(only, tmp_path / "r")) == 1
    # ... but an empty criteria list without dense controls is refused
    bad = write_config(tmp_path / "b.toml", criteria=[], controls=None)
    res = invoke("sweep", bad, "--dry-run")
    assert isinstance(res.exception, ConfigError) and "'criteria' must be a non-empty list" in str(res.exception)
