"""The latency protocol (prunebench.latency.protocol): interleaved timing, the bootstrap interval of the
speed-up, the quiet-machine rule, and the latency records beside the accuracy records. Every
clock and load here is synthetic: no test measures real time."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _records import put, rec
from torch import nn

from prunebench import registry
from prunebench.latency import protocol as lat
from prunebench.latency import quiet as lat_quiet
from prunebench.latency import subjects as lat_subjects
from prunebench.latency import timing as lat_timing
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.record import widths
from prunebench.pipeline.surgery import load_compressed, save_compressed
from prunebench.protocols import CompressionContext, EpochLedger, Target

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """Time moves only when a fake model runs (or by ``tick`` per reading)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.t = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def fake_machine(loads=(0.0,), cpus: int = 4, probes=None) -> lat_quiet.Machine:
    """A machine whose load average reads ``loads`` in turn (the last one repeats) and whose
    probe kernel takes exactly 1 ms (or ``probes`` in turn)."""
    loads, probes = list(loads), list(probes or [[0.001] * 15])
    pauses: list[float] = []

    def load() -> float:
        return loads.pop(0) if len(loads) > 1 else loads[0]

    def probe() -> list[float]:
        return probes.pop(0) if len(probes) > 1 else probes[0]

    return lat_quiet.Machine(load=load, cpus=lambda: cpus, probe=probe, pause=pauses.append)


# --- timing and the interval ---------------------------------------------------------------


def test_baseline_and_compressed_are_timed_alternately_after_a_warm_up():
    clock, calls = FakeClock(), []

    def baseline():
        calls.append("baseline")
        clock.advance(0.004)

    def compressed():
        calls.append("compressed")
        clock.advance(0.001)

    a, b = lat_timing.interleaved(baseline, compressed, repeats=30, warmup=3, clock=clock)
    assert calls == ["baseline", "compressed"] * 33  # warm-up alternated too
    assert a == pytest.approx([0.004] * 30) and b == pytest.approx([0.001] * 30)


def test_the_speed_up_is_the_ratio_of_medians_with_a_seeded_95_percent_interval():
    g = torch.Generator().manual_seed(0)
    base = (2.0 + 0.2 * torch.rand(40, generator=g)).tolist()
    comp = (1.0 + 0.1 * torch.rand(40, generator=g)).tolist()
    s = lat_timing.speedup_interval(base, comp)
    assert s["median"] == round(_median(base) / _median(comp), 4)
    lo, hi = s["ci95"]
    assert lo < s["median"] < hi and 1.6 < lo and hi < 2.4
    assert lat_timing.speedup_interval(base, comp) == s  # deterministic
    assert lat_timing.speedup_interval(base, comp, seed=1)["ci95"] != s["ci95"]  # the seed is what fixes it
    with pytest.raises(ValueError):
        lat_timing.speedup_interval(base, comp[:-1])  # repeats are paired


def _median(values):
    v = sorted(values)
    n = len(v)
    return (v[n // 2 - 1] + v[n // 2]) / 2 if n % 2 == 0 else v[n // 2]


def test_the_bootstrap_resamples_pairs_so_load_common_to_both_cancels():
    # the machine slows down and speeds up; each compressed repeat takes half its baseline's time
    drift = [1.0 + (i % 7) * 0.5 for i in range(30)]
    base = [2.0 * d for d in drift]
    comp = [1.0 * d for d in drift]
    s = lat_timing.speedup_interval(base, comp)
    assert s["median"] == 2.0 and s["ci95"] == [2.0, 2.0]


# --- the quiet rule ------------------------------------------------------------------------


def test_a_loaded_machine_is_not_quiet():
    probe = [0.001] * 15
    assert lat_quiet.Quiet(load=0.4, cpus=2, threads=1, probe_before=probe).problems() == []
    loaded = lat_quiet.Quiet(load=2.1, cpus=2, threads=1, probe_before=probe).problems()
    assert len(loaded) == 1 and "load average 2.10 before timing on 2 CPUs" in loaded[0]
    # our own threads are allowed for
    assert lat_quiet.Quiet(load=2.1, cpus=16, threads=2, probe_before=probe).problems() == []
    during = lat_quiet.Quiet(load=0.2, cpus=2, threads=1, probe_before=probe, probe_after=probe, load_after=3.0)
    assert ["during" in p for p in during.problems()] == [True]


def test_a_probe_kernel_that_spreads_or_drifts_means_a_noisy_machine():
    steady = [0.001] * 15
    spread = [0.001, 0.0015] * 7 + [0.001]
    assert lat_quiet.Quiet(0.0, 4, 1, steady, steady, 0.0).problems() == []
    assert "probe-kernel spread" in lat_quiet.Quiet(0.0, 4, 1, spread).problems()[0]
    drift = lat_quiet.Quiet(0.0, 4, 1, steady, [0.0012] * 15, 0.0)
    assert drift.spread == pytest.approx(0.2) and drift.problems()


# --- a results directory -------------------------------------------------------------------


def _compressed(criterion: str = "l1", ratio: float = 0.5, seed: int = 0):
    arch = registry.architectures.get("resnet20")
    torch.manual_seed(seed)
    model = arch.build(num_classes=10, in_channels=1).eval()
    example = torch.randn(1, 1, 8, 8)
    target = Target("macs", ratio)
    meter = Meter(copy.deepcopy(model), example, target)
    ctx = CompressionContext(
        example_inputs=example, calibration=None, target=target, device=torch.device("cpu"), seed=seed,
        prunable=arch.prunable(model), protected=arch.protected(model), ledger=EpochLedger(0.0),
        reduction=meter.reduction, reduction_of=lambda kept: meter.reduction_of(model, kept),
        train=lambda *a, **k: None, log=lambda msg: None,
    )
    result = compress(registry.criteria.get(criterion).from_kwargs(), model, ctx, meter)
    return model.eval(), result.plan, arch.prunable(model)


def add_run(results: Path, rid: str, criterion: str = "l1", seed: int = 0, kind: str = "score") -> dict:
    model, plan, prunable = _compressed(criterion, seed=seed)
    save_compressed(results / "models" / f"{rid}.pt", "resnet20", {"num_classes": 10, "in_channels": 1}, plan,
                    model, [1, 1, 8, 8], meta={"run_id": rid})
    record = rec(criterion, seed=seed, run_id=rid, criterion_kind=kind, model_file=f"models/{rid}.pt",
                 data={"input_shape": [1, 8, 8], "num_classes": 10}, widths=widths(model, prunable))
    put(results, rid, record)
    return record


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    add_run(folder, "digits-resnet20-l1-a")
    return folder


def options(**over) -> lat.Options:
    base = {"runtimes": ["torch"], "settings": [(1, 1)], "repeats": 30, "warmup": 1,
            "machine": fake_machine(), "clock": FakeClock(tick=0.0005)}
    return lat.Options(**{**base, **over})


def test_the_defaults_are_batch_1_on_one_thread_and_batch_64_on_every_cpu():
    o = lat.Options(machine=fake_machine(cpus=6))
    assert [(s.batch, s.threads) for s in lat.resolve_settings(o, 6)] == [(1, 1), (64, 6)]
    assert o.repeats >= 30


def test_a_loaded_machine_is_refused_before_any_model_is_built(results, monkeypatch):
    monkeypatch.setattr(lat, "load_subject", lambda *a: pytest.fail("built a model on a loaded machine"))
    with pytest.raises(lat_quiet.NoisyMachineError, match=r"not quiet.*load average 5.00 .* --allow-noisy"):
        lat.run_latency(results, options(machine=fake_machine(loads=[5.0], cpus=2)))
    assert not (results / "latency").exists()


def test_load_that_rises_during_every_timing_is_refused_and_nothing_is_written(results):
    # start, then (before timing, after timing) for each of the attempts
    machine = fake_machine(loads=[0.1] + [0.1, 4.0] * lat_quiet.QUIET_ATTEMPTS, cpus=2)
    with pytest.raises(lat_quiet.NoisyMachineError, match="during timing"):
        lat.run_latency(results, options(machine=machine))
    assert not list(results.glob("latency/*.json"))


def test_allow_noisy_records_the_result_marked_unreliable_with_the_measured_spread(results):
    noisy = fake_machine(probes=[[0.001] * 15] + [[0.001] * 15, [0.0013] * 15] * lat_quiet.QUIET_ATTEMPTS)
    [outcome] = lat.run_latency(results, options(machine=noisy, allow_noisy=True))
    record = json.loads(outcome.path.read_text())
    assert record["unreliable"] is True
    assert record["quiet"]["probe_spread"] == pytest.approx(0.3)
    assert "probe-kernel spread 30.0%" in record["quiet"]["problems"][0]


def test_a_blip_after_a_timing_discards_it_and_a_quiet_second_timing_is_recorded_reliable(results):
    clock = FakeClock(tick=0.0005)
    # start, before, after (30 % drift: discarded), before, after: quiet
    blip = fake_machine(probes=[[0.001] * 15, [0.001] * 15, [0.0013] * 15, [0.001] * 15, [0.001] * 15])
    [outcome] = lat.run_latency(results, options(machine=blip, clock=clock))
    record = json.loads(outcome.path.read_text())
    assert record["unreliable"] is False and record["quiet"]["attempts"] == 2
    assert record["quiet"]["problems"] == [] and len(record["baseline_ms"]["repeats_ms"]) == 30


def test_a_noisy_check_before_timing_is_repeated_after_a_pause_and_never_times_meanwhile(results):
    clock = FakeClock(tick=0.0005)
    busy_then_quiet = fake_machine(loads=[0.1, 5.0, 5.0, 0.1], cpus=2)  # start, before (x2 noisy), before: quiet
    [outcome] = lat.run_latency(results, options(machine=busy_then_quiet, clock=clock))
    record = json.loads(outcome.path.read_text())
    assert record["quiet"]["attempts"] == 3 and record["unreliable"] is False
    assert busy_then_quiet.pause.__self__ == [lat_quiet.QUIET_PAUSE_S] * 2


def test_a_quiet_machine_writes_one_record_per_setting_beside_the_untouched_accuracy_records(results):
    before = {p.name: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    outcomes = lat.run_latency(results, options(settings=[(1, 1), (4, 2)]))
    assert [o.status for o in outcomes] == ["measured", "measured"]
    after = {p.name: p.read_bytes() for p in results.rglob("*") if p.is_file() and "latency" not in p.parts}
    assert after == before  # accuracy record and model file byte for byte
    files = sorted((results / "latency").glob("*.json"))
    assert len(files) == 2
    for o in outcomes:
        r = json.loads(o.path.read_text())
        assert r["schema"] == "prunebench-latency/1" and r["unreliable"] is False
        assert r["run_ids"] == ["digits-resnet20-l1-a"] and len(r["digest"]) == 64
        assert o.path.name.startswith(r["digest"][:16])
        assert (r["runtime"], r["batch"], r["threads"]) == ("torch", o.setting.batch, o.setting.threads)
        assert len(r["baseline_ms"]["repeats_ms"]) == len(r["compressed_ms"]["repeats_ms"]) == 30
        assert r["speedup"]["median"] == 1.0 and r["speedup"]["ci95"] == [1.0, 1.0]  # the fake clock
        assert r["model_source"] == "model file" and r["hardware"]["cpus"] >= 1


def test_a_second_run_skips_what_is_measured_unless_forced(results):
    lat.run_latency(results, options())
    [again] = lat.run_latency(results, options())
    assert again.status == "skipped"
    [forced] = lat.run_latency(results, options(force=True))
    assert forced.status == "measured"


def test_runs_with_the_same_widths_share_one_record_that_names_both(results):
    lat.run_latency(results, options())
    add_run(results, "digits-resnet20-l1-b")  # the same plan: another run, the same architecture
    outcomes = lat.run_latency(results, options())
    assert sorted(o.status for o in outcomes) == ["skipped", "skipped"]
    [record] = [json.loads(p.read_text()) for p in (results / "latency").glob("*.json")]
    assert record["run_ids"] == ["digits-resnet20-l1-a", "digits-resnet20-l1-b"]


def test_a_model_whose_file_is_gone_is_rebuilt_from_its_record_to_the_same_architecture(results):
    record = json.loads((results / "digits-resnet20-l1-a.json").read_text())
    from_file = lat.load_subject(results, record)
    (results / "models" / "digits-resnet20-l1-a.pt").unlink()
    rebuilt = lat.load_subject(results, record)
    assert rebuilt.source == "record widths" and from_file.source == "model file"
    assert rebuilt.digest == from_file.digest
    assert repr(rebuilt.model) == repr(from_file.model)


def test_a_factorised_model_whose_file_is_gone_is_a_one_line_error_and_the_others_are_measured(results):
    add_run(results, "digits-resnet20-trp-a", criterion="trp", kind="transform")
    (results / "models" / "digits-resnet20-trp-a.pt").unlink()
    lines: list[str] = []
    outcomes = lat.run_latency(results, options(), log=lines.append)
    assert {o.run_id: o.status for o in outcomes} == {"digits-resnet20-trp-a": "failed",
                                                      "digits-resnet20-l1-a": "measured"}
    [error] = [line for line in lines if line.startswith("error:")]
    assert "its record holds no replace steps" in error and "restore the file" in error and "\n" not in error


def test_a_factorised_model_whose_file_is_gone_is_rebuilt_from_the_replace_steps_of_its_record(results):
    record = add_run(results, "digits-resnet20-trp-a", criterion="trp", kind="transform")
    from_file = lat.load_subject(results, record)
    _, info = load_compressed(results / "models" / "digits-resnet20-trp-a.pt")
    (results / "models" / "digits-resnet20-trp-a.pt").unlink()
    steps = [s for s in info["plan"] if s["op"] == "replace"]
    assert steps
    rebuilt = lat.load_subject(results, {**record, "replacements": steps})
    assert rebuilt.source == "record plan" and rebuilt.digest == from_file.digest
    assert repr(rebuilt.model) == repr(from_file.model)
    broken = [{**steps[0], "module": "no.such.module"}]
    with pytest.raises(lat_subjects.RebuildError, match="its replace steps do not apply to resnet20"):
        lat.load_subject(results, {**record, "replacements": broken})


def test_a_factorised_run_records_its_replace_steps_and_latency_rebuilds_it_without_its_file(tmp_path):
    from test_round_to import TINY_SETS
    from test_sweep import invoke

    results = tmp_path / "r"
    res = invoke("run", "-c", "ht2", "-a", "resnet20", "-d", "digits", "--budget", "smoke", *TINY_SETS,
                 "--results-dir", results, "-q")
    assert res.exit_code == 0, res.output + repr(res.exception)
    [path] = results.glob("*.json")
    record = json.loads(path.read_text())
    _, info = load_compressed(results / record["model_file"])
    assert record["replacements"] == [s for s in info["plan"] if s["op"] == "replace"] != []
    from_file = lat.load_subject(results, record)
    (results / record["model_file"]).unlink()
    rebuilt = lat.load_subject(results, record)
    assert (rebuilt.source, rebuilt.digest) == ("record plan", from_file.digest)


def _twin_runs(results: Path, **second) -> tuple[dict, dict]:
    """Two ht2 runs of one baseline at one knob (seeds 0 and 1); the second without its model file."""
    base = {"criterion_params": {"energy": 0.8}, "knob": {"energy": 0.9},
            "baseline_info": {"adaptation": {"key": "resnet20-digits-adapted-0123"}}}
    a = add_run(results, "digits-resnet20-ht2-s0", criterion="ht2", kind="transform")
    b = add_run(results, "digits-resnet20-ht2-s1", criterion="ht2", kind="transform", seed=1)
    a.update(base, identity={"criterion": "ht2", "seed": 0})
    b.update(base, identity={"criterion": "ht2", "seed": 1})
    b.update(second)
    put(results, a["run_id"], a)
    put(results, b["run_id"], b)
    (results / "models" / "digits-resnet20-ht2-s1.pt").unlink()
    return a, b


def test_a_factorised_run_without_file_or_steps_takes_the_architecture_of_its_twin(results):
    a, b = _twin_runs(results)
    subject = lat.load_subject(results, b, [a, b])
    assert subject.source == "architecture of digits-resnet20-ht2-s0"
    assert subject.digest == lat.load_subject(results, a).digest
    lat.run_latency(results, options())
    names = sorted(r for p in (results / "latency").glob("*.json") for r in json.loads(p.read_text())["run_ids"])
    assert names == ["digits-resnet20-ht2-s0", "digits-resnet20-ht2-s1", "digits-resnet20-l1-a"]


@pytest.mark.parametrize("differs", [
    {"knob": {"energy": 0.85}},                                              # another knob value
    {"baseline_info": {"adaptation": {"key": "resnet20-digits-adapted-4567"}}},  # other baseline weights
    {"macs": {"before": 100, "after": 51}},                                  # counted otherwise
    {"identity": {"criterion": "ht2", "seed": 1, "budget": "long"}},         # another run but the seed
])
def test_no_twin_unless_baseline_knob_identity_and_counts_all_agree(results, differs):
    a, b = _twin_runs(results, **differs)
    with pytest.raises(lat_subjects.RebuildError, match="no run with a model file shares its architecture"):
        lat.load_subject(results, b, [a, b])


def test_a_criterion_whose_shapes_depend_on_training_has_no_twin(results):
    a, b = _twin_runs(results)
    a, b = {**a, "criterion": "trp"}, {**b, "criterion": "trp"}  # trp: ranks of trained weights
    assert registry.criteria.get("ht2").weights_decide_shapes and not registry.criteria.get("trp").weights_decide_shapes
    with pytest.raises(lat_subjects.RebuildError):
        lat.load_subject(results, b, [a, b])


@pytest.mark.parametrize("over, message", [
    ({"repeats": 29}, "at least 30"),
    ({"runtimes": ["tensorrt"]}, "unknown runtime 'tensorrt'"),
    ({"settings": [(0, 1)]}, "--batch must be >= 1"),
])
def test_bad_options_are_refused_before_any_timing(results, over, message):
    from prunebench.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        lat.run_latency(results, options(**over))


def test_the_architecture_digest_follows_the_shapes_not_the_weights():
    a = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    b = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    digest = lat_subjects.architecture_digest
    assert digest(a, "resnet20", {"num_classes": 10}, [1, 1, 8, 8]) == digest(b, "resnet20", {"num_classes": 10},
                                                                              [64, 1, 8, 8])
    b.fc = nn.Linear(64, 10, bias=False)
    assert digest(a, "resnet20", {"num_classes": 10}, [1, 1, 8, 8]) != digest(b, "resnet20", {"num_classes": 10},
                                                                              [1, 1, 8, 8])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA device")
def test_the_cuda_runtime_without_a_cuda_device_is_a_one_line_error_before_any_timing(results):
    from prunebench.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime 'torch-cuda' needs a CUDA device") as info:
        lat.run_latency(results, options(runtimes=["torch", "torch-cuda"]))
    assert "\n" not in str(info.value) and not (results / "latency").exists()


def test_cpu_records_keep_their_hardware_key_and_a_cuda_record_names_its_gpu(monkeypatch):
    cpu = lat.hardware_key("torch")
    assert "gpu" not in cpu and lat.hardware_key() == cpu
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert lat.hardware_key("torch-cuda") == {**cpu, "gpu": "Some GPU"}
    setting = lat.Setting("torch-cuda", 1, 1)
    assert lat.record_name("ab" * 32, setting, cpu) != lat.record_name("ab" * 32, setting, lat.hardware_key("torch-cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_runtime_times_both_models_on_the_gpu(results):
    [outcome] = lat.run_latency(results, options(runtimes=["torch-cuda"], clock=None))
    record = outcome.record
    assert outcome.status == "measured" and record["runtime"] == "torch-cuda"
    assert record["hardware"]["gpu"] == torch.cuda.get_device_name() and record["speedup"]["median"] > 0
