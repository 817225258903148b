"""Promise: bad input is a one-line error before any work, never a traceback or a failed record.

The whole configuration of `prunebench run` is checked before data is loaded or a file is
written, as `prunebench sweep` checks every run of its grid; misspelt names get suggestions.
Messages are printed verbatim (rich markup never eats "[dataset]" or "[targets]").
"""

from __future__ import annotations

import json
import sys

import pytest
from _support import invoke, one_line_error, prunebench, run_args

import prunebench.pipeline.runner as runner_mod
from prunebench.cli import main
from prunebench.errors import PrunebenchError


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a run gets as far as loading data."""
    monkeypatch.setattr(runner_mod, "load_data", lambda *a, **k: pytest.fail("work started before the error"))


def profile(tmp_path, text: str):
    path = tmp_path / "ratios.json"
    path.write_text(text)
    return path


RUN_CASES = [
    (["--max-layer-ratio", "0"], "max_layer_ratio"),
    (["--max-layer-ratio", "-0.5"], "must lie in (0, 1]"),
    (["--max-layer-ratio", "1.5"], "must lie in (0, 1]"),
    (["--tolerance", "-0.01"], "tolerance"),
    (["--set", "finetune_epochs=-1"], "finetune_epochs must be >= 0"),
    (["--set", "batch_size=0"], "batch_size must be an integer >= 1"),
    (["--set", "schedule=bogus"], "unknown schedule 'bogus'"),
    (["--set", "lr=nan"], "lr must be a finite number"),
    (["--set", "milestones=0.9,0.5"], "milestones must be increasing"),
    (["-c", "qsfm", "--set", "calibration_size=0"], "calibration_size must be an integer >= 1"),
    (["--device", "gpu"], "For a GPU use 'cuda'"),
    (["--allocation", "globl"], "unknown allocation 'globl'. Did you mean 'global'?"),
    (["--dataset-option", "sed=1"], "dataset 'digits' has no option 'sed'"),
    (["--shots", "0"], "shots must be an integer of at least 1"),
    (["--shots", "3", "--shot-epochs", "1"], "need 2 epochs, but the budget's ledger holds 1"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
]


@pytest.mark.parametrize("extra, message", RUN_CASES, ids=[" ".join(a) for a, _ in RUN_CASES])
def test_a_bad_run_option_fails_before_any_work_and_writes_nothing(tmp_path, no_work, extra, message):
    args = run_args(tmp_path / "r", *extra)
    if "-c" in extra:  # the case names its own criterion
        i = args.index("-c")
        del args[i:i + 2]
    res = invoke(*args)
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert message in str(res.exception)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("*.json"))


PROFILE_CASES = [
    ('{"layer1.0.conv1": 0.5', "is not valid JSON"),
    ('[0.5, 0.5]', "must be a JSON object"),
    ('{"layer1.0.conv1": "half"}', "must be a number in [0, 1], got 'half'"),
    ('{"layer1.0.conv1": -0.5}', "must lie in [0, 1], got -0.5"),
    ('{"layer1.0.conv1": 0, "layer2.0.conv1": 0}', "every ratio is 0"),
    ('{"layer1.0.conv9": 0.5}', "names layers that resnet20 cannot prune: layer1.0.conv9"),
]


@pytest.mark.parametrize("text, message", PROFILE_CASES, ids=[m for _, m in PROFILE_CASES])
def test_a_bad_layer_ratio_profile_is_a_one_line_error(tmp_path, no_work, text, message):
    res = invoke(*run_args(tmp_path / "r", "--layer-ratios", profile(tmp_path, text)))
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert message in str(res.exception) and "\n" not in str(res.exception)


def write_sweep(path, **over):
    doc = {"criteria": '["l1"]', "architectures": '["resnet20"]', "dataset": '"digits"', "budget": '"smoke"'}
    doc.update(over)
    path.write_text("".join(f"{k} = {v}\n" for k, v in doc.items()))
    return path


SWEEP_CASES = [
    ({"max_layer_ratio": "-1"}, "max_layer_ratio"),
    ({"device": '"gpu"'}, "unknown device 'gpu'"),
    ({"layer_ratios": '"ratios.json"'}, "is not valid JSON"),
    ({"shots": "0"}, "shots must be an integer of at least 1"),
    ({"budget": '{ name = "smoke", schedule = "bogus" }'}, "unknown schedule 'bogus'"),
    ({"budget": '{ name = "smoke", batch_size = 0 }'}, "batch_size must be an integer >= 1"),
    ({"results_dir": "3"}, "'results_dir' expects a string"),
]


@pytest.mark.parametrize("over, message", SWEEP_CASES, ids=[m for _, m in SWEEP_CASES])
def test_a_bad_sweep_file_is_a_one_line_error_before_any_work(tmp_path, no_work, over, message):
    profile(tmp_path, '{"layer1.0.conv1": ')
    config = write_sweep(tmp_path / "s.toml", **over)
    where = [] if "results_dir" in over else ["--results-dir", tmp_path / "r"]
    res = invoke("sweep", config, *where)
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert message in str(res.exception)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("over, shown", [
    ({"dataset": '{ nmae = "digits" }'}, "unknown key 'nmae' in [dataset]. Did you mean 'name'?"),
    ({"targets": "{ }"}, "[targets] names no target"),
])
def test_error_messages_are_printed_verbatim(tmp_path, monkeypatch, capsys, over, shown):
    config = write_sweep(tmp_path / "s.toml", **over)
    monkeypatch.setattr(sys, "argv", ["prunebench", "sweep", str(config), "--dry-run"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert shown in capsys.readouterr().err


def test_a_bad_device_is_one_line_on_the_command_line(tmp_path):
    line = one_line_error(prunebench(*run_args(tmp_path / "r", "--device", "gpu")))
    assert "unknown device 'gpu'" in line
    assert not (tmp_path / "r").exists()


def test_errors_longer_than_the_terminal_stay_on_one_line(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 6) / "ratios.json"
    deep.parent.mkdir(parents=True)
    deep.write_text(json.dumps([1, 2]))
    line = one_line_error(prunebench(*run_args(tmp_path / "r", "--layer-ratios", deep)))
    assert str(deep) in line


def synthetic_args(results, *extra):
    args = run_args(results, *extra)
    args[args.index("digits")] = "synthetic"
    return args


@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2**64)], "seed must be at most 2^63 - 1"),
    (["--seed", str(2**63)], "seed must be at most 2^63 - 1"),
    (["--dataset-option", "n_train=0"], "dataset 'synthetic': option n_train=0 must be at least 1"),
    (["--dataset-option", "num_classes=1"], "dataset 'synthetic': option num_classes=1 must be at least 2"),
    (["--dataset-option", "noise=-0.1"], "dataset 'synthetic': option noise=-0.1 must be at least 0.0"),
], ids=["seed 2^64", "seed 2^63", "n_train=0", "num_classes=1", "noise<0"])
def test_seeds_and_dataset_option_ranges_fail_before_any_work(tmp_path, no_work, extra, message):
    res = invoke(*synthetic_args(tmp_path / "r", *extra))
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert message in str(res.exception) and "\n" not in str(res.exception)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("dataset, options", [
    ("cifar10", ["--dataset-option", "download=false"]),
    ("cifar100", ["--dataset-option", "download=no"]),
    ("cifar10-jpeg", []),
    ("imagefolder", ["--dataset-option", "path=nowhere"]),
    ("imagenet", []),
    ("cifar10-folder", []),
    ("imagefolder-stream", ["--dataset-option", "path=nowhere"]),
])
def test_a_missing_dataset_fails_before_any_work_naming_where_it_looked(tmp_path, no_work, dataset, options):
    args = run_args(tmp_path / "r", "--data-dir", tmp_path / "empty", *options)
    args[args.index("digits")] = dataset
    if dataset in ("imagenet", "cifar10-folder", "imagefolder-stream"):
        args[args.index("resnet20")] = "resnet18"
    res = invoke(*args)
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert str(tmp_path / "empty") in str(res.exception) and "\n" not in str(res.exception)
    assert not (tmp_path / "r").exists()  # no record, no models/ folder


@pytest.mark.parametrize("content, message", [
    (b'criteria = ["l1"]\narchitectures = ["resnet20"]\n# caf\xe9 (latin-1)\n', "is not UTF-8 text"),
    (b'criteria = ["l1"]\narchitectures = ["resnet20"]\ndataset = { name = "synthetic", options = 3 }\n',
     "dataset.options must be a table of dataset options"),
    (b'criteria = ["l1"]\narchitectures = ["resnet20"]\ndataset = { name = "synthetic", options = [1, 2] }\n',
     "dataset.options must be a table of dataset options"),
], ids=["not utf-8", "options a number", "options a list"])
def test_a_sweep_file_that_is_not_utf8_or_has_bad_dataset_options_is_one_line(tmp_path, no_work, content, message):
    (tmp_path / "s.toml").write_bytes(content)
    res = invoke("sweep", tmp_path / "s.toml", "--dry-run", "--results-dir", tmp_path / "r")
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert message in str(res.exception) and "\n" not in str(res.exception)


def test_a_cache_folder_that_is_a_file_is_one_line_before_any_work(tmp_path):
    (tmp_path / "cache").write_text("not a folder\n")
    for cache in (tmp_path / "cache", tmp_path / "cache" / "below"):
        line = one_line_error(prunebench(*run_args(tmp_path / "r"), env={"PRUNEBENCH_CACHE": str(cache)}))
        assert str(cache) in line and "not a folder" in line
    assert not (tmp_path / "r").exists()


def test_an_ascii_only_terminal_gets_the_result_and_exit_code_0(tmp_path):
    proc = prunebench(*run_args(tmp_path / "r"), env={"LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final" in proc.stdout and "record:" in proc.stdout
    assert [json.loads(p.read_text())["status"] for p in (tmp_path / "r").glob("*.json")] == ["complete"]


def test_an_unwritable_leaderboard_folder_is_one_line(tmp_path, complete_run):
    (tmp_path / "file").write_text("a file where a folder should be\n")
    res = invoke("leaderboard", "--records", complete_run, "--out", tmp_path / "file" / "pages")
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    assert "cannot write the leaderboard to" in str(res.exception) and str(tmp_path / "file") in str(res.exception)
    assert "\n" not in str(res.exception)
