"""`prunebench sweep`: config validation, dry-run, local and Ray executors, resume, crash safety,
concurrent sweeps on one results directory, and the scratch control (digits, resnet20, tiny budget)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunebench.cli import app
from prunebench.errors import ConfigError
from prunebench.results.records import validate
from prunebench.storage.locks import FileLock
from prunebench.sweep.execute import run_one
from prunebench.sweep.spec import load_sweep

runner = CliRunner()

# the smoke budget, smaller still: every run takes about a second here
TINY = {"name": "smoke", "baseline_epochs": 1, "train_subset": 256, "test_subset": 128, "latency_repeats": 2,
        "calibration_size": 64}


def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"


def write_config(path: Path, **over) -> Path:
    doc = {"criteria": ["l1", {"name": "ht2", "params": {"include_linear": False}}], "architectures": ["resnet20"],
           "dataset": "digits", "targets": [0.5], "seeds": [0], "controls": ["random", "scratch"], "budget": TINY}
    doc.update(over)
    path.write_text("".join(f"{k} = {toml(v)}\n" for k, v in doc.items() if v is not None))
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def dry_run_ids(config: Path, results: Path) -> list[str]:
    res = invoke("sweep", config, "--dry-run", "--results-dir", results)
    assert res.exit_code == 0, res.output
    return [line.split()[1] for line in res.stdout.splitlines() if line.startswith(("pending ", "complete "))]


def records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")}


def leftovers(results: Path) -> list[str]:
    """Temp files, lock files, partial records: anything but complete records and models."""
    bad = [p.name for p in results.rglob("*") if p.name.endswith((".tmp", ".lock")) or p.name.startswith(".")]
    return bad + [name for name, rec in records(results).items() if rec["status"] != "complete"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """2 criteria × 1 arch × 1 target × 1 seed + both controls, local executor."""
    d = tmp_path_factory.mktemp("sweep")
    config = write_config(d / "sweep.toml")
    results = d / "results"
    res = invoke("sweep", config, "--results-dir", results)
    return config, results, res


def test_dry_run_lists_runs_with_status(tmp_path):
    config = write_config(tmp_path / "s.toml", seeds=[0, 1], targets={"macs": [0.3, 0.5], "params": [0.4]})
    res = invoke("sweep", config, "--dry-run", "--results-dir", tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert "24 runs in" in res.stdout and "0 complete, 24 pending" in res.stdout  # 3 targets × 2 seeds × (2 + 2)
    ids = dry_run_ids(config, tmp_path / "r")
    assert len(ids) == len(set(ids)) == 24
    assert sum("-scratch-" in i for i in ids) == 6 and sum("-random-" in i for i in ids) == 6
    assert sum("-params40-" in i for i in ids) == 8
    assert "criteria: l1, ht2(include_linear=False)" in res.stdout and "budget: smoke baseline_epochs=1" in res.stdout
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_dry_run_shows_complete_runs(smoke):
    config, results, _ = smoke
    res = invoke("sweep", config, "--dry-run", "--results-dir", results)
    assert "4 complete, 0 pending" in res.stdout
    assert sorted(dry_run_ids(config, results)) == sorted(records(results))


def test_a_random_criterion_and_the_random_control_are_one_run(tmp_path):
    config = write_config(tmp_path / "s.toml", criteria=["l1", "random"], controls=["random"])
    assert len(dry_run_ids(config, tmp_path / "r")) == 2


@pytest.mark.parametrize("over, message", [
    ({"seed": [0]}, "unknown key 'seed' in the sweep config. Did you mean 'seeds' or 'baseline'? Allowed keys: description, "),
    ({"criteria": ["l2"]}, "unknown criterion 'l2'. Did you mean 'l1'"),
    ({"criteria": [{"name": "l1", "parms": {}}]}, "unknown key 'parms' in criteria[0]. Did you mean 'params'?"),
    ({"criteria": [{"name": "ht2", "params": {"energi": 0.5}}]}, "no hyper-parameter 'energi'. Did you mean 'energy'"),
    ({"architectures": ["resnet21"]}, "unknown architecture 'resnet21'. Did you mean"),
    ({"dataset": "digit"}, "unknown dataset 'digit'. Did you mean 'digits'"),
    ({"dataset": {"name": "digits", "option": {}}}, "unknown key 'option' in [dataset]. Did you mean 'options'?"),
    ({"budget": "smok"}, "unknown budget 'smok'. Did you mean 'smoke'"),
    ({"budget": {"name": "smoke", "finetune_epoch": 2}}, "budget has no field 'finetune_epoch'. Did you mean"),
    ({"targets": [1.5]}, "must lie in (0, 1)"),
    ({"targets": {"mac": [0.5]}}, "unknown key 'mac' in [targets]. Did you mean 'macs'?"),
    ({"controls": ["scrach"]}, "unknown control 'scrach'. Did you mean 'scratch'?"),
    ({"allocation": "globl"}, "unknown allocation 'globl'. Did you mean 'global'?"),
    ({"architectures": None}, "needs 'architectures'"),
    ({"seeds": []}, "'seeds' must be a non-empty list"),
    ({"runs_per_gpu": 0}, "'runs_per_gpu' must be at least 1, got 0"),
    ({"runs_per_gpu": 1.5}, "'runs_per_gpu' expects an integer"),
    ({"precision": "bf61"}, "unknown precision 'bf61'. Did you mean 'bf16'"),
    ({"scope": "al"}, "architecture 'resnet20' has no scope 'al'. Did you mean 'all'?"),
    ({"layer_ratios": "hrank-resnet65-1"}, "is no named profile. Did you mean 'hrank-resnet56-1'"),
])
def test_config_errors_name_the_problem_before_anything_runs(tmp_path, over, message):
    config = write_config(tmp_path / "s.toml", **over)
    with pytest.raises(ConfigError) as exc:
        load_sweep(config)
    assert message in str(exc.value)
    res = invoke("sweep", config, "--results-dir", tmp_path / "r")
    assert isinstance(res.exception, ConfigError)
    assert not (tmp_path / "r").exists()


def test_scope_key_reaches_every_run_and_its_id(tmp_path):
    default = {cfg.criterion: cfg for cfg in load_sweep(write_config(tmp_path / "a.toml")).runs()}
    wide = {cfg.criterion: cfg for cfg in load_sweep(write_config(tmp_path / "b.toml", scope="all")).runs()}
    assert all(cfg.scope is None and "scope" not in cfg.identity() for cfg in default.values())
    assert all(cfg.scope == "all" and cfg.identity()["scope"] == "all" for cfg in wide.values())
    assert not set(dry_run_ids(tmp_path / "a.toml", tmp_path / "r")) & set(dry_run_ids(tmp_path / "b.toml", tmp_path / "r"))
    res = invoke("sweep", tmp_path / "b.toml", "--dry-run", "--results-dir", tmp_path / "r")
    assert "scope: all" in res.stdout
    # naming the default scope is the same run as naming none
    assert dry_run_ids(write_config(tmp_path / "c.toml", scope="inner"), tmp_path / "r") == dry_run_ids(
        tmp_path / "a.toml", tmp_path / "r")


def test_named_layer_ratio_profile_in_a_sweep(tmp_path):
    spec = load_sweep(write_config(tmp_path / "s.toml", criteria=["l1"], architectures=["resnet56"],
                                   layer_ratios="hrank-resnet56-2"))
    assert spec.allocation == "profile" and spec.layer_ratios["layer2.3.conv1"] == 0.4
    with pytest.raises(ConfigError, match="is for architecture 'resnet56', not 'resnet20'"):
        load_sweep(write_config(tmp_path / "t.toml", criteria=["l1"], layer_ratios="hrank-resnet56-2"))
    # a criterion that would ignore the profile (ht2 removes no channel) is refused with it
    with pytest.raises(ConfigError, match="'ht2' is a transform criterion and would ignore it"):
        load_sweep(write_config(tmp_path / "u.toml", architectures=["resnet56"], layer_ratios="hrank-resnet56-2"))


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("criteria = [l1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sweep(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.toml")
    res = invoke("sweep", write_config(tmp_path / "s.toml"), "--executor", "dask")
    assert "unknown executor 'dask'" in str(res.exception)


def test_local_sweep_end_to_end(smoke):
    config, results, res = smoke
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "4 complete, 0 failed, 0 skipped (4 runs)" in res.stdout
    # trained here, or by an earlier test of this session that shares the baseline cache
    assert re.search(r"baseline resnet20/digits/smoke/seed 0: (trained in|loaded from the cache)", res.stderr)
    recs = records(results)
    assert len(recs) == 4 and all(r["status"] == "complete" and validate(r) == [] for r in recs.values())
    assert all(r["sharing"] == {"runs_per_device": 1, "executor": "local"} for r in recs.values())
    assert not any(r["latency"]["measured_under_sharing"] for r in recs.values())
    assert sorted(r["criterion"] for r in recs.values()) == ["ht2", "l1", "random", "scratch"]
    assert all(r["baseline_info"]["source"] == "cache" for r in recs.values())  # trained once, before the grid
    assert len({r["baseline"]["top1"] for r in recs.values()}) == 1
    assert leftovers(results) == []
    assert sorted(p.stem for p in (results / "models").glob("*.pt")) == sorted(recs)


def test_scratch_control_record(smoke):
    _, results, _ = smoke
    (scratch,) = [r for r in records(results).values() if r["criterion"] == "scratch"]
    (rand,) = [r for r in records(results).values() if r["criterion"] == "random"]
    assert "-scratch-" in scratch["run_id"] and scratch["architecture_from"] == "random"
    assert scratch["oneshot"] is None and scratch["oneshot_bn"] is None and "no one-shot stage" in scratch["note"]
    assert rand["oneshot_bn"]["top1"] >= 0  # BN re-estimated on the calibration images, before fine-tuning
    total = scratch["budget"]["baseline_epochs"] + scratch["budget"]["finetune_epochs"]  # the whole budget
    assert scratch["ledger"]["spent"] == {"scratch": total} and scratch["ledger"]["total_epochs"] == total
    assert scratch["widths"] == rand["widths"]  # the same compressed architecture (random, same seed)
    assert scratch["macs"] == rand["macs"] and scratch["final"] != rand["final"]


def test_a_sweep_run_equals_the_same_prunebench_run(smoke, tmp_path, monkeypatch):
    """The baseline trained before the grid is the one `prunebench run` trains: same numbers."""
    _, results, _ = smoke
    (sweep_l1,) = [r for r in records(results).values() if r["criterion"] == "l1"]
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "fresh-cache"))  # the run trains its own baseline
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k != "name"]
    res = invoke("run", "-c", "l1", "-a", "resnet20", "--budget", "smoke", *sets, "--results-dir", tmp_path / "r", "-q")
    assert res.exit_code == 0, res.output
    (alone,) = records(tmp_path / "r").values()
    assert alone["run_id"] == sweep_l1["run_id"] and alone["baseline_info"]["source"] == "trained"
    assert (alone["baseline"], alone["oneshot"], alone["final"]) == (
        sweep_l1["baseline"], sweep_l1["oneshot"], sweep_l1["final"])


def test_resume_skips_complete_runs(smoke):
    config, results, _ = smoke
    before = {p.name: p.read_bytes() for p in results.glob("*.json")}
    res = invoke("sweep", config, "--results-dir", results)
    assert res.exit_code == 0
    assert "0 complete, 0 failed, 4 skipped (4 runs)" in res.stdout and "already complete" in res.stdout
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == before


def test_leaderboard_from_a_sweep(smoke, tmp_path):
    _, results, _ = smoke
    res = invoke("leaderboard", "--records", results, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    page = (tmp_path / "digits-resnet20.md").read_text()
    for label in ("| l1", "| ht2(include_linear=False)", "| random", "| scratch"):
        assert label in page
    assert invoke("leaderboard", "--records", results, "--out", tmp_path, "--check").exit_code == 0


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    config = write_config(tmp_path / "s.toml", criteria=["l1"], controls=[], targets=[0.97, 0.3])
    res = invoke("sweep", config, "--results-dir", tmp_path / "r")
    assert res.exit_code == 1
    assert "1 complete, 1 failed, 0 skipped (2 runs)" in res.stdout and "TargetMissedError" in res.stdout
    by_target = {r["target"]["ratio"]: r for r in records(tmp_path / "r").values()}
    assert by_target[0.97]["status"] == "failed" and by_target[0.3]["status"] == "complete"


def test_a_run_locked_by_another_process_is_not_executed(tmp_path):
    sweep = load_sweep(write_config(tmp_path / "s.toml", criteria=["l1"], controls=[]), results_dir=tmp_path / "r")
    (cfg,) = sweep.runs()
    lock = FileLock(tmp_path / "probe.lock")
    assert lock.acquire(blocking=False)
    assert not FileLock(lock.path).acquire(blocking=False)  # held: a second holder is refused
    lock.release()
    assert not lock.path.exists()

    from prunebench.config.run import cfg_run_id

    other = FileLock(tmp_path / "r" / f"{cfg_run_id(cfg)}.lock")
    assert other.acquire(blocking=False)
    try:
        outcome = run_one(cfg)
        assert outcome.status == "busy" and not list((tmp_path / "r").glob("*.json"))
        # a blocking attempt waits for the holder, then runs it
        threading.Timer(1.0, other.release).start()
        t0 = time.monotonic()
        assert run_one(cfg, blocking=True).status == "complete" and time.monotonic() - t0 >= 0.9
    finally:
        other.release()


# --- processes --------------------------------------------------------------------------------


def sweep_process(config: Path, results: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # PRUNEBENCH_CACHE comes from conftest
    return subprocess.Popen([sys.executable, "-m", "prunebench", "sweep", str(config), "--results-dir", str(results),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# longer runs (a few seconds each) so that a kill lands inside one
SLOW = {**TINY, "train_subset": 512, "finetune_epochs": 3}


def test_sigkill_mid_run_then_resume(tmp_path):
    config = write_config(tmp_path / "s.toml", criteria=["l1"], budget=SLOW)  # l1, random, scratch
    results = tmp_path / "r"
    ids = dry_run_ids(config, results)
    assert len(ids) == 3
    proc = sweep_process(config, results)
    seen = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [p.stem for p in results.glob("*.json")]
            running = [p.name[:-5] for p in results.glob("*.lock")]
            if len(done) == 1 and running and running[0] != done[0]:
                seen = (done[0], running[0])
                first_bytes = (results / f"{done[0]}.json").read_bytes()
                os.kill(proc.pid, signal.SIGKILL)  # in the middle of the second run
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and seen is None:
            proc.kill()
        proc.communicate()
    assert seen is not None, "the sweep finished or stalled before the second run could be interrupted"
    assert proc.returncode == -signal.SIGKILL
    first, second = seen
    assert first == ids[0] and second == ids[1]
    assert [p.stem for p in results.glob("*.json")] == [first]  # no record, not even a partial one, of the killed run
    print(f"killed while {second} ran; {first} was complete; left behind: "
          f"{sorted(p.name for p in results.rglob('*') if p.is_file() and p.suffix != '.pt')}")

    res = invoke("sweep", config, "--results-dir", results)
    assert res.exit_code == 0, res.output
    assert "2 complete, 0 failed, 1 skipped (3 runs)" in res.stdout
    print(res.stdout)
    recs = records(results)
    assert sorted(recs) == sorted(ids) and all(r["status"] == "complete" for r in recs.values())
    assert (results / f"{first}.json").read_bytes() == first_bytes  # not re-run
    assert leftovers(results) == []
    assert sorted(p.stem for p in (results / "models").glob("*.pt")) == sorted(ids)


def test_two_concurrent_sweeps_share_the_work(tmp_path):
    # a baseline that no other test trains, so that exactly one of the two sweeps trains it
    config = write_config(tmp_path / "s.toml", criteria=["l1", "ht2"], budget={**SLOW, "baseline_epochs": 2})
    results = tmp_path / "r"
    ids = dry_run_ids(config, results)
    procs = [sweep_process(config, results) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    recs = records(results)
    assert sorted(recs) == sorted(ids) and all(r["status"] == "complete" for r in recs.values())
    assert leftovers(results) == []
    rows = [line.split() for out, _ in outputs for line in out.splitlines()]
    executed = [row[0] for row in rows if len(row) > 1 and row[1] == "complete"]
    assert sorted(executed) == sorted(ids)  # every run executed exactly once, by one of the two
    print("\n".join(out for out, _ in outputs))
    trained = sum(err.count("trained in") for _, err in outputs)
    assert trained == 1  # the shared baseline was trained once; the other sweep waited and loaded it


def test_ray_executor(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray executor needs `pip install prunebench[ray]`")
    config = write_config(tmp_path / "s.toml", criteria=["l1"], controls=["random"])
    results = tmp_path / "r"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = invoke("sweep", config, "--executor", "ray", "--results-dir", results, "--max-parallel", "2")
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "(ray executor)" in res.stderr and "2 complete, 0 failed, 0 skipped (2 runs)" in res.stdout
    recs = records(results)
    assert len(recs) == 2 and all(r["status"] == "complete" for r in recs.values())
    assert leftovers(results) == []


# --- precision and packing ---------------------------------------------------------------------


def test_precision_and_runs_per_gpu_from_the_file_and_the_command_line(tmp_path):
    config = write_config(tmp_path / "s.toml", runs_per_gpu=3, precision="fp32")
    sweep = load_sweep(config)
    assert sweep.runs_per_gpu == 3 and {cfg.precision for cfg in sweep.runs()} == {"fp32"}
    over = load_sweep(config, runs_per_gpu=2, precision="bf16")
    assert over.runs_per_gpu == 2 and {cfg.precision for cfg in over.runs()} == {"bf16"}
    auto = load_sweep(write_config(tmp_path / "a.toml"))
    assert auto.precision == "auto" and {cfg.precision for cfg in auto.runs()} <= {"bf16", "fp32"}  # resolved here
    res = invoke("sweep", config, "--dry-run", "--results-dir", tmp_path / "r", "--runs-per-gpu", "2",
                 "--precision", "bf16")
    assert res.exit_code == 0, res.output
    assert "precision: bf16" in res.stdout and "runs_per_gpu: 2" in res.stdout
    fp32_ids = dry_run_ids(config, tmp_path / "r")
    bf16 = invoke("sweep", config, "--dry-run", "--results-dir", tmp_path / "r", "--precision", "bf16")
    bf16_ids = [line.split()[1] for line in bf16.stdout.splitlines() if line.startswith("pending ")]
    assert len(bf16_ids) == len(fp32_ids) and not set(bf16_ids) & set(fp32_ids)  # precision is in the run id


def test_slots_per_device(monkeypatch):
    from prunebench.sweep import packing
    from prunebench.sweep.packing import Slots, plan_slots

    monkeypatch.setattr(packing, "_cpu_count", lambda: 16)
    assert plan_slots(4, "cpu") == Slots(total=4, gpus=(), per_device=4, threads=4)
    assert plan_slots(4, "cpu", max_parallel=2) == Slots(total=2, gpus=(), per_device=2, threads=8)
    monkeypatch.setattr(packing, "_cuda_device_count", lambda: 1)
    assert plan_slots(8, "cuda") == Slots(total=8, gpus=(), per_device=8, threads=2)  # one GPU: left alone
    monkeypatch.setattr(packing, "_cuda_device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert plan_slots(4, "cuda") == Slots(total=8, gpus=("3", "5"), per_device=4, threads=2)
    assert plan_slots(4, "cuda", max_parallel=3) == Slots(total=3, gpus=("3", "5"), per_device=2, threads=5)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert plan_slots(1, "cuda").gpus == ("0", "1")
    import multiprocessing

    counter = multiprocessing.get_context("spawn").Value("i", 0)
    assert [packing.next_gpu(counter, ("3", "5")) for _ in range(5)] == ["3", "5", "3", "5", "3"]


def test_several_gpus_need_an_unpinned_device(tmp_path, monkeypatch):
    from prunebench.sweep import packing

    monkeypatch.setattr(packing, "_cuda_device_count", lambda: 2)
    monkeypatch.setattr("prunebench.sweep.engines.device_type", lambda device: "cuda")
    sweep = load_sweep(write_config(tmp_path / "s.toml", device="cuda:1", runs_per_gpu=2), results_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="with several GPUs the local executor gives each worker its own GPU"):
        from prunebench.sweep.run import run_sweep

        run_sweep(sweep, log=lambda line: None)


class FakeRay:
    """Just enough of Ray to see what its tasks ask for."""

    def __init__(self):
        self.asked = []

    def is_initialized(self):
        return True

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 6.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]

    def remote(self, **resources):
        self.asked.append(resources)
        return lambda fn: fn


@pytest.mark.parametrize("cuda, runs_per_gpu, max_parallel, asked, per_device", [
    (True, 4, None, {"num_gpus": 0.25}, 4),
    (True, 1, None, {"num_gpus": 1.0}, 1),
    (True, 4, 2, {"num_gpus": 0.25}, 2),
    (False, 4, None, {"num_cpus": 1}, 6),  # CPU tasks share a node's cores
    (False, 1, 1, {"num_cpus": 1}, 1),
])
def test_ray_tasks_ask_for_a_fraction_of_a_gpu(monkeypatch, cuda, runs_per_gpu, max_parallel, asked, per_device):
    import torch

    from prunebench.config.run import Sharing
    from prunebench.sweep.engines import _RayEngine

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    engine = _RayEngine(None, max_parallel, False, runs_per_gpu=runs_per_gpu)
    assert fake.asked == [asked, asked]  # runs and baselines alike
    assert engine.sharing == Sharing(per_device, "ray")


def test_packed_local_sweep_runs_side_by_side_dies_with_its_sweep_and_resumes(tmp_path):
    config = write_config(tmp_path / "s.toml", criteria=["l1"], runs_per_gpu=2)  # l1, random, scratch
    results = tmp_path / "r"
    ids = dry_run_ids(config, results)
    proc = sweep_process(config, results)
    held: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            locks = [p.name for p in results.glob("*.lock")]
            if len(locks) >= 2:  # two runs at once, each holding its own lock
                held = locks
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and not held:
            proc.kill()
        proc.communicate()
    assert held, "the packed sweep never ran two runs at once"
    # its workers die with it: the locks they held are free again within seconds
    for name in held:
        lock = FileLock(results / name)
        t0 = time.monotonic()
        while not lock.acquire(blocking=False):
            assert time.monotonic() - t0 < 15, f"{name} is still held after the sweep was killed"
            time.sleep(0.1)
        lock.release()
    assert not any(rec["status"] == "complete" for name, rec in records(results).items()
                   if f"{name}.lock" in held)  # killed mid-run: no record

    res = invoke("sweep", config, "--results-dir", results)  # resumed, packed again
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "runs at once: 2 per device" in res.stderr
    recs = records(results)
    assert sorted(recs) == sorted(ids) and all(r["status"] == "complete" for r in recs.values())
    assert leftovers(results) == []
    for rec in recs.values():
        if rec["run_id"] + ".lock" in held:  # ran in the resumed, packed sweep
            assert rec["sharing"] == {"runs_per_device": 2, "executor": "local"}
            assert rec["latency"]["measured_under_sharing"] is True
