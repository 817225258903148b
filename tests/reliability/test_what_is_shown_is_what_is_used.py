"""Promise: what prunebench shows and records is what it uses.

Records name the installed version of each library (the distribution's metadata, not a
module's stale ``__version__``); ``prunebench list budgets`` shows the settings each stage of
a budget uses; ``prunebench --version`` says which prunebench runs.
"""

from __future__ import annotations

from importlib import metadata

from _support import invoke, records

import prunebench


def test_a_record_names_the_installed_torch_pruning_version(complete_run):
    (rec,) = records(complete_run).values()
    assert rec["versions"]["torch_pruning"] == metadata.version("torch-pruning")


def test_list_budgets_shows_the_fine_tune_and_adaptation_settings_not_an_unused_baseline_lr(monkeypatch):
    from prunebench import cli

    monkeypatch.setattr(cli.out, "width", 200)  # one line per budget
    res = invoke("list", "budgets")
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in res.output.splitlines() if line.startswith("│")}
    baseline, finetune, adaptation = rows["cpu-pretrained"][:3]
    assert baseline.startswith("none") and "0.1" not in baseline  # trains no baseline: its lr 0.1 is unused
    assert finetune == "0.25 ep, lr 0.01, cosine" and adaptation == "4 ep, lr 0.02, cosine"
    assert rows["imagenet-short"][1] == "4 ep, lr 0.01, cosine"
    assert rows["standard"][0] == "200 ep, lr 0.1, step" and rows["standard"][1] == "100 ep, lr 0.01, step"


def test_the_command_line_says_its_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"prunebench {prunebench.__version__}"
