"""The command line, end to end, as a user runs it (smoke budget on digits)."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from prunebench.cli import app
from prunebench.errors import ConfigError, TargetMissedError
from prunebench.pipeline.surgery import load_compressed
from prunebench.results.records import validate

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    res = invoke("run", "--criterion", "l1", "--arch", "resnet20", "--dataset", "digits", "--budget", "smoke",
                 "--target-macs", "0.5", "--results-dir", results, "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    return results, res.output


def test_run_writes_a_complete_valid_record(smoke_run):
    results, output = smoke_run
    files = list(results.glob("*.json"))
    assert len(files) == 1 and "record:" in output
    rec = json.loads(files[0].read_text())
    assert rec["status"] == "complete" and validate(rec) == []
    assert abs(rec["achieved"]["macs_reduction"] - 0.5) <= 0.01
    assert rec["macs"]["after"] < rec["macs"]["before"]
    assert rec["ledger"]["spent"] == {"finetune": 2.0}
    assert 0 <= rec["oneshot"]["top1"] <= 100 and 0 <= rec["final"]["top1"] <= 100
    assert 0 <= rec["oneshot_bn"]["top1"] <= 100 and "BN re-estimated" in output
    assert "adapt_epochs" not in rec["budget"]  # adaptation fields belong to runs from pretrained baselines
    assert rec["baseline"]["top1"] > 30  # digits is learnable even on the smoke budget
    assert rec["latency"]["before"]["batch1_ms"] > 0
    from prunebench.training.precision import resolve_precision

    assert rec["precision"] == resolve_precision("auto", "cpu")  # bf16 where the CPU computes it natively
    assert rec["sharing"] == {"runs_per_device": 1, "executor": "run"}
    assert rec["latency"]["measured_under_sharing"] is False
    assert set(rec["widths"]) == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    model, info = load_compressed(results / rec["model_file"])
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert info["meta"]["run_id"] == rec["run_id"]


def test_the_saved_model_is_the_one_the_record_scores(smoke_run):
    """Reloaded from its file and evaluated on the run's test split, the compressed model
    scores exactly the record's final top-1."""
    from prunebench.config.budgets import BUDGETS
    from prunebench.config.run import RunConfig
    from prunebench.pipeline.data import load_data

    results, _ = smoke_run
    rec = json.loads(next(results.glob("*.json")).read_text())
    model, _ = load_compressed(results / rec["model_file"])
    model.eval()
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=BUDGETS["smoke"], dataset="digits")
    _, data = load_data(cfg, torch.device("cpu"))
    assert data.test_x.shape[0] == rec["data"]["test_images"]
    correct = 0
    with torch.no_grad():
        for start in range(0, data.test_x.shape[0], 512):
            logits = model(data.normalise(data.test_x[start:start + 512]))
            correct += int((logits.argmax(1) == data.test_y[start:start + 512]).sum())
    assert round(100.0 * correct / data.test_x.shape[0], 4) == rec["final"]["top1"]


def test_rerun_skips_complete_record(smoke_run):
    results, _ = smoke_run
    res = invoke("run", "--criterion", "l1", "--arch", "resnet20", "--dataset", "digits", "--budget", "smoke",
                 "--target-macs", "0.5", "--results-dir", results)
    assert res.exit_code == 0
    assert "already complete" in res.output or "already complete" in (res.stderr if res.stderr_bytes else "")
    assert len(list(results.glob("*.json"))) == 1


def test_leaderboard_from_run(smoke_run, tmp_path):
    results, _ = smoke_run
    res = invoke("leaderboard", "--records", results, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    md = (tmp_path / "digits-resnet20.md").read_text()  # README.md is the index of the pages
    assert "digits · resnet20 · macs -50% · budget `smoke`" in md and "| l1" in md
    assert invoke("leaderboard", "--records", results, "--out", tmp_path, "--check").exit_code == 0


def test_failed_run_leaves_a_failed_record(tmp_path):
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--budget", "smoke", "--target-macs", "0.97",
                 "--results-dir", tmp_path, "-q")
    assert isinstance(res.exception, TargetMissedError)
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rec["status"] == "failed" and "TargetMissedError" in rec["error"] and validate(rec) == []
    assert not list(tmp_path.glob(".*tmp"))


def test_unknown_names_suggest_alternatives(tmp_path):
    res = invoke("run", "-c", "l2", "-a", "resnet20", "--budget", "smoke", "--results-dir", tmp_path)
    assert isinstance(res.exception, ConfigError) and "Did you mean 'l1'" in str(res.exception)
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--budget", "smoke", "--set", "finetune_epoch=2",
                 "--results-dir", tmp_path)
    assert "Did you mean 'finetune_epochs'" in str(res.exception)
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--budget", "smoke", "--param", "foo=1", "--results-dir", tmp_path)
    assert "no hyper-parameter 'foo'" in str(res.exception)
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--budget", "smoke", "--target-macs", "1.5",
                 "--results-dir", tmp_path)
    assert "must lie in (0, 1)" in str(res.exception)
    assert not list(tmp_path.glob("*.json"))  # bad input is rejected before a run starts


def test_info_prints_standard_counts():
    res = invoke("info", "--arch", "resnet56")
    assert res.exit_code == 0
    assert "125.49M" in res.output and "0.85M" in res.output
    assert "scope inner (default): 27 prunable convs in 27 pruning units" in res.output
    assert "scope all: 55 prunable convs in 30 pruning units" in res.output


def test_scope_all_run_end_to_end(smoke_run, tmp_path):
    res = invoke("run", "--criterion", "l1", "--arch", "resnet20", "--dataset", "digits", "--budget", "smoke",
                 "--target-macs", "0.5", "--scope", "all", "--results-dir", tmp_path, "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    default = json.loads(next(smoke_run[0].glob("*.json")).read_text())
    assert rec["scope"] == "all" and default["scope"] == "inner"
    assert rec["run_id"] != default["run_id"]
    assert abs(rec["achieved"]["macs_reduction"] - 0.5) <= 0.01
    assert "conv1" in rec["widths"] and "layer2.0.conv2" in rec["widths"]
    model, _ = load_compressed(tmp_path / rec["model_file"])
    assert model.layer3[0].conv2.out_channels == rec["widths"]["layer3.0.conv2"]


def test_info_rejects_an_unknown_scope():
    res = invoke("info", "--arch", "vgg16_bn", "--scope", "inner")
    assert isinstance(res.exception, ConfigError)
    assert "has no scope 'inner'" in str(res.exception) and "Available: all" in str(res.exception)
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--scope", "al")
    assert isinstance(res.exception, ConfigError) and "Did you mean 'all'" in str(res.exception)


def test_list_kinds():
    res = invoke("list", "criteria")
    assert res.exit_code == 0 and "l1" in res.output and "random" in res.output
    assert "smoke" in invoke("list", "budgets").output
    assert "resnet110" in invoke("list", "architectures").output
    bad = invoke("list", "criterias")
    assert "Did you mean 'criteria'" in str(bad.exception)


def test_errors_print_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "prunebench", "info", "--arch", "resnet65"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "resnet56" in proc.stderr and "Traceback" not in proc.stderr


def test_info_lists_criterion_hyper_parameters():
    res = invoke("info", "--criterion", "coring")
    assert res.exit_code == 0, res.output
    assert "distance" in res.output and "'vbd'" in res.output and "rank" in res.output
    assert "Did you mean 'coring'" in str(invoke("info", "--criterion", "corng").exception)


@pytest.mark.slow
def test_the_readme_main_job_starts_from_a_converged_baseline(tmp_path):
    """`prunebench run --criterion l1 --arch resnet56 --dataset digits`, no --budget: the demo budget."""
    res = invoke("run", "--criterion", "l1", "--arch", "resnet56", "--dataset", "digits", "--results-dir", tmp_path, "-q")
    assert res.exit_code == 0, res.output
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rec["budget"]["name"] == "demo" and rec["data"]["train_images"] == 1437
    assert rec["baseline"]["top1"] >= 95.0 and rec["final"]["top1"] >= 90.0


def test_an_unknown_precision_is_a_one_line_error(tmp_path):
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--precision", "bf61", "--results-dir", tmp_path)
    assert isinstance(res.exception, ConfigError) and "Did you mean 'bf16'" in str(res.exception)
    assert not list(tmp_path.glob("*.json"))
