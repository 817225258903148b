"""Promise: a record says exactly which run it is, and a run finds its record.

The run id hashes the run's resolved identity (criterion hyper-parameters with defaults
filled in and typed), the record stores that identity and the layer-ratio profile, so a run
can be reproduced from its record; records written under the older rule are migrated
explicitly by `prunebench records migrate`, and the committed records follow the current rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _support import PROFILE, copy_results, invoke, records

from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.pipeline.surgery import load_compressed

REPO = Path(__file__).resolve().parents[2]


def rid(**kw) -> str:
    return run_id(RunConfig(arch="resnet20", budget=get_budget("smoke"), **kw).identity())


def test_a_run_given_its_default_hyper_parameters_is_the_same_run():
    assert rid(criterion="coring") == rid(criterion="coring", criterion_params={"distance": "vbd"})
    assert rid(criterion="coring") == rid(criterion="coring", criterion_params={"rank": 1})
    assert rid(criterion="coring", criterion_params={"rank": "2"}) == rid(criterion="coring",
                                                                          criterion_params={"rank": 2})
    assert rid(criterion="coring") != rid(criterion="coring", criterion_params={"rank": 2})


def test_the_record_stores_the_identity_hashed_into_its_id_and_the_profile(complete_run):
    (rec,) = records(complete_run).values()
    assert run_id(rec["identity"]) == rec["run_id"]
    assert rec["layer_ratios"] == PROFILE and rec["identity"]["layer_ratios"] == PROFILE
    assert rec["allocation"] == "profile"
    assert rec["identity"]["criterion_params"] == rec["criterion_params"]


def old_rule_copy(results: Path, tmp_path: Path, given: dict) -> tuple[Path, str, str]:
    """The complete run recorded as the older rule recorded a coring run given ``given``: its id
    hashed the hyper-parameters as given, and the record had no identity."""
    out = copy_results(results, tmp_path / "old")
    (path,) = out.glob("*.json")
    rec = json.loads(path.read_text())
    path.unlink()
    resolved = {"distance": "vbd", "rank": 1}  # coring's defaults, as its record stores them
    identity = {**rec["identity"], "criterion": "coring", "criterion_params": resolved}
    new_id, old_id = run_id(identity), run_id({**identity, "criterion_params": given})
    assert old_id != new_id
    old = {k: v for k, v in rec.items() if k != "identity"}
    old.update(criterion="coring", criterion_params=resolved, run_id=old_id, model_file=f"models/{old_id}.pt")
    (out / f"{old_id}.json").write_text(json.dumps(old, indent=2))
    payload = torch.load(out / "models" / f"{rec['run_id']}.pt", weights_only=True)
    torch.save({**payload, "meta": json.dumps({"run_id": old_id})}, out / "models" / f"{old_id}.pt")
    (out / "models" / f"{rec['run_id']}.pt").unlink()
    return out, old_id, new_id


def test_records_of_the_older_id_rule_are_migrated_explicitly(complete_run, tmp_path):
    results, old_id, new_id = old_rule_copy(complete_run, tmp_path, {"distance": "vbd"})
    before = {p.name: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    res = invoke("records", "migrate", results, "--dry-run")
    assert res.exit_code == 0, res.output
    assert f"rename   {old_id} -> {new_id}" in res.output and "would change 1" in res.output
    assert {p.name: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before  # dry run
    res = invoke("records", "migrate", results)
    assert res.exit_code == 0, res.output
    (rec,) = records(results).values()
    assert rec["run_id"] == new_id and rec["migrated_from"] == old_id and run_id(rec["identity"]) == new_id
    _, info = load_compressed(results / rec["model_file"])
    assert info["meta"]["run_id"] == new_id and not (results / "models" / f"{old_id}.pt").exists()
    assert "1 current, 0 left as they are" in invoke("records", "migrate", results, "--dry-run").output


def test_a_record_whose_fields_do_not_reproduce_its_id_is_left_alone(complete_run, tmp_path):
    results, old_id, _ = old_rule_copy(complete_run, tmp_path, {"distance": "cosine"})  # edited since
    res = invoke("records", "migrate", results)
    assert res.exit_code == 0 and "do not reproduce its run id" in res.output
    assert [p.stem for p in results.glob("*.json")] == [old_id]


def test_the_committed_leaderboard_records_follow_the_current_id_rule():
    from prunebench.results.migrate import plan

    changes = plan(REPO / "leaderboard" / "records")
    assert changes and {c.action for c in changes} == {"current"}, [c.line() for c in changes if c.action != "current"]


def test_a_record_describes_its_scope_precision_and_pretrained_baseline():
    """What `records migrate` reads back from a record is the run that wrote it."""
    import dataclasses

    from prunebench.config.run import PRETRAINED
    from prunebench.results.migrate import config_from_record

    cfg = RunConfig(criterion="l1", arch="resnet56", dataset="cifar10-jpeg", budget=get_budget("cpu-pretrained"),
                    scope="all", precision="bf16", baseline=PRETRAINED)
    identity = cfg.identity()
    rec = {"criterion": "l1", "arch": "resnet56", "dataset": "cifar10-jpeg", "budget": cfg.budget_fields(),
           "target": dataclasses.asdict(cfg.target), "seed": 0, "criterion_params": identity["criterion_params"],
           "scope": "all", "precision": "bf16", "baseline_info": {"source": "pretrained"}}
    assert config_from_record(rec).identity() == identity
    old = {k: v for k, v in rec.items() if k not in ("scope", "precision")}  # written before either existed
    assert config_from_record({**old, "baseline_info": {"source": "trained"}}).identity() == \
        dataclasses.replace(cfg, scope=None, precision="fp32", baseline=None).identity()


def test_the_same_settings_typed_on_the_command_line_or_in_a_sweep_file_are_one_configuration(tmp_path):
    """Options and hyper-parameters are typed in one place: the baseline cache key, the record
    and the run id are the same whether they came as strings or as TOML numbers."""
    from types import SimpleNamespace

    from prunebench.pipeline.baseline import baseline_key
    from prunebench.pipeline.record import base_record
    from prunebench.sweep.spec import load_sweep

    (tmp_path / "s.toml").write_text(
        'criteria = [{ name = "coring", params = { rank = 2 } }]\narchitectures = ["resnet20"]\nbudget = "smoke"\n'
        'dataset = { name = "synthetic", options = { n_train = 64, noise = 0.5, seed = 3 } }\n')
    (swept,) = load_sweep(tmp_path / "s.toml").runs()
    typed = RunConfig(criterion="coring", criterion_params={"rank": "2"}, arch="resnet20", budget=get_budget("smoke"),
                      dataset="synthetic", dataset_options={"n_train": "64", "noise": "0.5", "seed": "3"})
    assert typed.dataset_options == swept.dataset_options == {"n_train": 64, "noise": 0.5, "seed": 3}
    assert [type(v) for v in typed.dataset_options.values()] == [int, float, int]
    assert typed.criterion_params == swept.criterion_params == {"rank": 2}
    splits = SimpleNamespace(input_shape=(3, 16, 16))
    assert baseline_key(typed, splits) == baseline_key(swept, splits)  # one cached baseline, not two
    assert run_id(typed.identity()) == run_id(swept.identity())
    cpu = torch.device("cpu")
    assert base_record(typed, "x", {}, cpu)["dataset_options"] == base_record(swept, "x", {}, cpu)["dataset_options"]
