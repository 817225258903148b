"""Promise: what a run id names is the content the run started from, not a path.

``--baseline FILE`` enters the run id as the sha256 of the file's content, so a file replaced
at the same path is another run (and a file changed while the run starts fails it). Cached
baselines carry the sha256 written beside them; one whose content no longer matches is set
aside and trained again. Every record holds a digest of the baseline weights it started from
and of the images it trained and evaluated on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from _support import TINY, invoke, records, run_args

from prunebench import registry
from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig
from prunebench.datasets import cache_dir
from prunebench.errors import CheckpointError
from prunebench.pipeline.baseline import get_baseline
from prunebench.pipeline.data import load_data
from prunebench.progress import Reporter
from prunebench.storage import checkpoints


def save_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    torch.save(model.state_dict(), path)
    return path


def test_a_baseline_file_replaced_at_the_same_path_is_another_run(tmp_path):
    path = save_weights(tmp_path / "baseline.pt", seed=1)
    first = invoke(*run_args(tmp_path / "r", "--baseline", path))
    assert first.exit_code == 0, first.output + repr(first.exception)
    save_weights(path, seed=2)  # same path, other weights
    second = invoke(*run_args(tmp_path / "r", "--baseline", path))
    assert second.exit_code == 0, second.output + repr(second.exception)
    recs = sorted(records(tmp_path / "r").values(), key=lambda r: r["started"])
    assert len(recs) == 2 and all(r["status"] == "complete" for r in recs)
    digests = [r["baseline_info"]["file_sha256"] for r in recs]
    assert digests[1] == hashlib.sha256(path.read_bytes()).hexdigest() != digests[0]
    assert [r["identity"]["baseline_file"] for r in recs] == [f"sha256:{d}" for d in digests]
    assert recs[0]["baseline_info"]["weights_sha256"] != recs[1]["baseline_info"]["weights_sha256"]


def test_a_baseline_file_changed_after_the_run_started_fails_naming_it(tmp_path):
    path = save_weights(tmp_path / "baseline.pt", seed=1)
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY), baseline=path)
    named = cfg.identity()["baseline_file"].removeprefix("sha256:")
    save_weights(path, seed=2)
    splits, data = load_data(cfg, torch.device("cpu"))
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError, match="was changed after the run started") as exc:
        get_baseline(cfg, model, splits, data, Reporter(quiet=True), expect_file_sha256=named)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_a_cached_baseline_changed_after_it_was_written_is_set_aside_and_retrained(tmp_path):
    lr = 0.0203  # a cache entry of its own
    args = [a for a in run_args(tmp_path / "r", "--set", f"lr={lr}") if a != "-q"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output + repr(first.exception)
    (rec,) = records(tmp_path / "r").values()
    assert rec["baseline_info"]["source"] == "trained"
    cached = cache_dir() / "baselines" / f"{rec['baseline_info']['key']}.pt"
    save_weights(cached, seed=5)  # finite, well shaped, and not what was trained
    tampered = cached.read_bytes()
    second = invoke(*args, "--force")
    assert second.exit_code == 0, second.output + repr(second.exception)
    (rec,) = records(tmp_path / "r").values()
    assert rec["baseline_info"]["source"] == "trained"  # not the tampered file
    assert cached.with_name(cached.name + ".unverified").read_bytes() == tampered
    assert "doesnotmatchthedigeststored" in "".join(second.stderr.split())  # said in the log (rich may wrap)


def test_every_record_holds_digests_of_its_baseline_weights_and_data(complete_run):
    (rec,) = records(complete_run).values()
    cached = cache_dir() / "baselines" / f"{rec['baseline_info']['key']}.pt"
    state = torch.load(cached, weights_only=True)["state_dict"]
    assert rec["baseline_info"]["weights_sha256"] == checkpoints.weights_sha256(state)
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY))
    _, data = load_data(cfg, torch.device("cpu"))
    assert rec["data"]["sha256"] == checkpoints.weights_sha256(
        {"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x, "test_y": data.test_y})
