"""The model zoo: entries, file resolution and verification, key mapping, and pretrained
baselines in runs (preprocessing, adaptation, records). Tiny checkpoints written here, each
registered as a test entry with its own sha256; the real files only in the data-marked test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prunebench import registry, zoo
from prunebench.cli import app
from prunebench.config.budgets import get_budget
from prunebench.config.run import PRETRAINED, RunConfig
from prunebench.errors import CheckpointError, ConfigError, DataNotFoundError
from prunebench.pipeline.adaptation import adaptation_key
from prunebench.pipeline.data import load_data
from prunebench.pipeline.runner import execute
from prunebench.progress import Reporter
from prunebench.results.records import validate
from prunebench.zoo.files import digests, resolve

FILE = "tiny20-0000.th"
SMOKE = {"baseline_epochs": 1, "finetune_epochs": 1, "train_subset": 256, "test_subset": 128,
         "latency_repeats": 2, "calibration_size": 64}


def idelbayev_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A digits-shaped ResNet-20 saved the way pytorch_resnet_cifar10 saved its checkpoints."""
    torch.manual_seed(seed)
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    return {"module." + k.replace("fc.", "linear.", 1): v.clone() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def write_checkpoint(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"best_prec1": 12.5, "state_dict": idelbayev_state(seed)}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def entry_for(sha256: str, **over) -> zoo.ZooEntry:
    fields = dict(
        name="tiny20-test", arch="resnet20", trained_on="digits", datasets=("digits",), adapt_to=(),
        num_classes=10, file=FILE, url="file:///nonexistent/tiny20-0000.th", sha256=sha256,
        mean=(0.25,), std=(0.5,), reported_top1=12.5, reported_source="written by this test",
        license="MIT", license_file=None, key_map="idelbayev",
    )
    fields.update(over)
    return zoo.ZooEntry(**fields)


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    return root


@pytest.fixture
def registered(data_root, monkeypatch):
    """A tiny checkpoint in <data root>/pretrained/, registered as the zoo entry for resnet20 on digits."""
    sha = write_checkpoint(data_root / "pretrained" / FILE)
    entry = entry_for(sha)
    monkeypatch.setitem(zoo.ENTRIES, entry.name, entry)
    return entry


# --- entries and lookup ---------------------------------------------------------------------


def test_builtin_cifar_entries_name_real_architectures_and_their_licence():
    for depth in (20, 32, 44, 56, 110):
        entry = zoo.lookup(f"resnet{depth}", "cifar10-jpeg")
        registry.architectures.get(entry.arch)
        assert entry.trained_on == "cifar10" and entry.needs_adaptation("cifar10-jpeg")
        assert not entry.needs_adaptation("cifar10") and entry.serves("cifar10")
        assert entry.mean == (0.485, 0.456, 0.406) and entry.std == (0.229, 0.224, 0.225)
        assert entry.license == "BSD-2-Clause" and entry.license_file == "LICENSE-pytorch_resnet_cifar10"
        assert entry.file.startswith(f"resnet{depth}-") and entry.file[len(f"resnet{depth}-"):][:8] == entry.sha256[:8]
        assert entry.url.endswith("/pretrained_models/" + entry.file)
    assert zoo.lookup("resnet56", "cifar10").reported_top1 == 93.39  # 100 - 6.61
    r110 = zoo.lookup("resnet110", "cifar10")
    assert r110.user_supplied and not r110.sha256_complete and r110.sha256 == "1d1ed7c2"


def test_torchvision_entries_match_the_installed_torchvision():
    from torchvision.models import get_weight

    for arch in ("tv_resnet18", "tv_resnet50", "tv_mobilenet_v2", "tv_vgg16_bn"):
        entry = zoo.lookup(arch, "imagefolder")
        weights = get_weight(entry.torchvision_weights)
        assert weights.url == entry.url and weights.url.endswith(entry.file)
        assert weights.meta["_metrics"]["ImageNet-1K"]["acc@1"] == entry.reported_top1
        assert tuple(weights.transforms().mean) == entry.mean and tuple(weights.transforms().std) == entry.std
        assert entry.num_classes == len(weights.meta["categories"]) == 1000
        model = registry.architectures.get(arch).build(num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]


def test_unknown_combination_lists_what_exists():
    with pytest.raises(ConfigError) as err:
        zoo.lookup("resnet56", "digits")
    message = str(err.value)
    assert "no pretrained baseline for resnet56 on digits" in message and "\n" not in message
    assert "resnet56 on cifar10, cifar10-jpeg" in message and "tv_resnet50 on imagefolder" in message


# --- resolution and verification ------------------------------------------------------------


def test_found_in_the_data_root_and_verified(registered, data_root):
    found = resolve(registered, data_root)
    assert found.path == data_root / "pretrained" / FILE and found.origin == "data root"
    assert found.verified == "sha256" and found.sha256 == registered.sha256


def test_found_in_the_cache(tmp_path, data_root, monkeypatch):
    cached = tmp_path / "cache" / "pretrained" / FILE
    entry = entry_for(write_checkpoint(cached))
    found = resolve(entry, data_root)
    assert found.path == cached and found.origin == "cache"


def test_missing_names_the_exact_path_and_url(data_root):
    entry = entry_for("0" * 64)
    with pytest.raises(DataNotFoundError) as err:
        resolve(entry, data_root)
    message = str(err.value)
    assert str(data_root / "pretrained" / FILE) in message and entry.url in message and "\n" not in message
    assert "downloading failed" in message


def test_torchvision_weights_are_expected_where_torchvision_keeps_them(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    entry = zoo.lookup("tv_resnet18", "imagefolder")
    with pytest.raises(DataNotFoundError) as err:
        resolve(entry, data_root, download=False)
    hub = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(hub) in str(err.value) and entry.url in str(err.value)
    assert str(data_root / "pretrained" / "resnet18-f37072fd.pth") in str(err.value)


def test_downloaded_into_the_cache_with_its_licence_then_found_there(tmp_path, data_root):
    source = tmp_path / "server" / FILE
    (tmp_path / "server" / "LICENSE").parent.mkdir(parents=True)
    (tmp_path / "server" / "LICENSE").write_text("the licence")
    entry = entry_for(write_checkpoint(source), url=source.as_uri(), license_file="LICENSE-tiny",
                      license_url=(tmp_path / "server" / "LICENSE").as_uri())
    first = resolve(entry, data_root)
    assert first.origin == "download" and first.path == tmp_path / "cache" / "pretrained" / FILE
    assert (tmp_path / "cache" / "pretrained" / "LICENSE-tiny").read_text() == "the licence"
    assert resolve(entry, data_root).origin == "cache"


def test_a_wrong_download_never_lands_in_the_cache(tmp_path, data_root):
    source = tmp_path / "server" / FILE
    write_checkpoint(source)
    with pytest.raises(DataNotFoundError, match="does not match"):
        resolve(entry_for("f" * 64, url=source.as_uri()), data_root)
    assert not (tmp_path / "cache" / "pretrained" / FILE).exists()


def test_wrong_sha256_is_refused_every_time(registered, data_root):
    wrong = dataclasses.replace(registered, sha256="0" * 64)
    with pytest.raises(ConfigError) as err:
        resolve(wrong, data_root)
    assert f"sha256 {registered.sha256}, expected {'0' * 64}" in str(err.value)
    # a file changed after a first successful use is caught too
    assert resolve(registered, data_root).verified == "sha256"
    write_checkpoint(data_root / "pretrained" / FILE, seed=1)
    with pytest.raises(ConfigError, match="is not tiny20-test's file"):
        resolve(registered, data_root)


def test_prefix_only_entries_check_the_prefix_and_the_git_object_id(registered, data_root):
    path = data_root / "pretrained" / FILE
    sha, blob = digests(path)
    prefix = dataclasses.replace(registered, sha256=sha[:8], git_blob=blob)
    assert not prefix.sha256_complete
    assert resolve(prefix, data_root).verified == "sha256 prefix + git object id"
    with pytest.raises(ConfigError, match="git object id"):
        resolve(dataclasses.replace(prefix, git_blob="0" * 40), data_root)
    with pytest.raises(ConfigError, match="expected 00000000..."):
        resolve(dataclasses.replace(prefix, sha256="00000000"), data_root)


def test_git_object_id_is_what_git_computes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello\n")
    assert digests(path)[1] == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object of "hello\n"


# --- key mapping and loading ----------------------------------------------------------------


def test_key_mapping_strips_module_renames_linear_and_fills_batch_counters():
    raw = idelbayev_state()
    mapped = zoo.map_keys(raw, "idelbayev")
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    assert set(mapped) == set(model.state_dict())
    assert torch.equal(mapped["fc.weight"], raw["module.linear.weight"])
    assert torch.equal(mapped["layer2.1.conv1.weight"], raw["module.layer2.1.conv1.weight"])
    assert mapped["layer1.0.bn1.num_batches_tracked"].dtype == torch.long
    assert zoo.map_keys(mapped, "none") == mapped


def test_load_pretrained_loads_every_tensor(registered, data_root):
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    info = zoo.load_pretrained(registered, model, data_root, num_classes=10)
    assert info["stored_best_prec1"] == 12.5 and info["sha256"] == registered.sha256
    raw = idelbayev_state()
    assert torch.equal(model.fc.bias, raw["module.linear.bias"])
    assert torch.equal(model.layer3[2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])
    with pytest.raises(ConfigError, match="has 10 classes; the dataset has 100"):
        zoo.load_pretrained(registered, model, data_root, num_classes=100)


def test_a_checkpoint_of_another_architecture_fails_in_one_line(registered, data_root):
    model = registry.architectures.get("resnet32").build(num_classes=10, in_channels=1)
    with pytest.raises(CheckpointError) as err:
        zoo.load_pretrained(registered, model, data_root)
    assert "does not fit the model (CifarResNet): missing: layer1.3" in str(err.value)
    assert "\n" not in str(err.value)


# --- runs from a pretrained baseline --------------------------------------------------------


def run_config(tmp_path: Path, data_root: Path, seed: int = 0, **budget) -> RunConfig:
    return RunConfig(criterion="l1", arch="resnet20", dataset="digits",
                     budget=get_budget("smoke", {**SMOKE, **budget}), seed=seed, baseline=PRETRAINED,
                     data_dir=data_root, results_dir=tmp_path / "results", device="cpu")


def test_the_run_uses_the_checkpoints_preprocessing(registered, data_root, tmp_path, monkeypatch):
    import prunebench.pipeline.runner as runner

    cfg = run_config(tmp_path, data_root)
    _, data = load_data(cfg, torch.device("cpu"))
    assert data.mean.flatten().tolist() == [0.25] and data.std.flatten().tolist() == [0.5]

    seen = {"evaluate": [], "train": [], "calibration": []}
    evaluate, train, compress = runner.evaluate, runner.train, runner.compress

    def spy_evaluate(model, data, num_classes):
        seen["evaluate"].append((data.mean.item(), data.std.item()))
        return evaluate(model, data, num_classes)

    def spy_train(model, data, *args, **kwargs):
        seen["train"].append((data.mean.item(), data.std.item()))
        return train(model, data, *args, **kwargs)

    def spy_compress(criterion, model, ctx, *args, **kwargs):
        seen["calibration"].append(ctx.calibration.images)
        return compress(criterion, model, ctx, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", spy_evaluate)
    monkeypatch.setattr(runner, "train", spy_train)
    monkeypatch.setattr(runner, "compress", spy_compress)
    record, _ = execute(cfg, Reporter(quiet=True))
    assert seen["evaluate"] and set(seen["evaluate"]) == {(0.25, 0.5)}
    assert seen["train"] and set(seen["train"]) == {(0.25, 0.5)}
    # calibration images, un-normalised with the checkpoint's mean/std, are exactly the uint8 pixels / 255
    pixels = (seen["calibration"][0] * 0.5 + 0.25) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3) and float(pixels.min()) >= -1e-3
    info = record["baseline_info"]
    assert info["source"] == "pretrained" and info["adaptation"] is None
    assert info["zoo"]["name"] == "tiny20-test" and info["zoo"]["mean"] == [0.25]
    assert info["checkpoint"]["verified"] == "sha256" and info["checkpoint"]["found_in"] == "data root"
    assert record["status"] == "complete" and validate(record) == []
    assert record["budget"]["adapt_epochs"] == 4.0  # recorded for runs from a pretrained baseline only

def test_the_adaptation_is_recorded_cached_and_shared_by_seeds(data_root, tmp_path, monkeypatch):
    entry = entry_for(write_checkpoint(data_root / "pretrained" / FILE), datasets=(), adapt_to=("digits",),
                      trained_on="digits-elsewhere")
    monkeypatch.setitem(zoo.ENTRIES, entry.name, entry)
    first, _ = execute(run_config(tmp_path, data_root, seed=0, adapt_epochs=1, adapt_lr=0.05), Reporter(quiet=True))
    adaptation = first["baseline_info"]["adaptation"]
    assert set(adaptation) >= {"epochs", "recipe", "top1_before", "top1_after", "seconds", "key", "cached"}
    assert adaptation["epochs"] == 1 and adaptation["recipe"]["lr"] == 0.05 and not adaptation["cached"]
    assert adaptation["recipe"]["schedule"] == "cosine" and adaptation["seed"] == 0
    assert adaptation["top1_after"] == first["baseline"]["top1"] and adaptation["seconds"] > 0
    assert (tmp_path / "cache" / "baselines" / f"{adaptation['key']}.pt").is_file()

    second, _ = execute(run_config(tmp_path, data_root, seed=1, adapt_epochs=1, adapt_lr=0.05), Reporter(quiet=True))
    again = second["baseline_info"]["adaptation"]
    assert again["cached"] and again["key"] == adaptation["key"]
    assert {k: again[k] for k in ("top1_before", "top1_after", "seconds")} == \
        {k: adaptation[k] for k in ("top1_before", "top1_after", "seconds")}
    assert second["baseline"] == first["baseline"]  # both seeds prune the same adapted baseline

    other = run_config(tmp_path, data_root, adapt_epochs=2, adapt_lr=0.05)
    assert execute(other, Reporter(quiet=True))[0]["baseline_info"]["adaptation"]["key"] != adaptation["key"]
    assert adaptation["precision"] == first["precision"]
    for precision in ("bf16", "fp32"):  # the adapted weights depend on the training precision
        cfg = dataclasses.replace(run_config(tmp_path, data_root, adapt_epochs=1, adapt_lr=0.05), precision=precision)
        keyed = adaptation_key(cfg, entry, load_data(cfg, torch.device("cpu"))[0])
        assert (keyed == adaptation["key"]) == (precision == first["precision"])

    # a damaged cache file is moved aside and the adaptation runs again, to the same result
    cached = tmp_path / "cache" / "baselines" / f"{adaptation['key']}.pt"
    cached.write_bytes(b"not a checkpoint")
    third, _ = execute(run_config(tmp_path, data_root, seed=2, adapt_epochs=1, adapt_lr=0.05), Reporter(quiet=True))
    redone = third["baseline_info"]["adaptation"]
    assert not redone["cached"] and redone["top1_after"] == adaptation["top1_after"]
    assert cached.is_file() and cached.with_name(cached.name + ".corrupt").read_bytes() == b"not a checkpoint"


def test_adaptation_fields_leave_other_runs_ids_alone():
    plain = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("cpu"), dataset="cifar10-jpeg")
    changed = dataclasses.replace(plain, budget=plain.budget.override(adapt_epochs=5))
    assert plain.identity() == changed.identity() and "adapt_epochs" not in plain.budget_fields()
    pretrained = dataclasses.replace(plain, baseline=PRETRAINED)
    assert pretrained.identity()["pretrained"] == "resnet20-cifar10-idelbayev@12fca82f"
    assert pretrained.identity() != dataclasses.replace(pretrained, budget=changed.budget).identity()
    assert pretrained.budget_fields()["adapt_epochs"] == 4.0


def test_cli_without_the_file_names_the_exact_path(registered, data_root, tmp_path):
    (data_root / "pretrained" / FILE).unlink()
    res = CliRunner().invoke(app, ["run", "-c", "l1", "-a", "resnet20", "-d", "digits", "--budget", "smoke",
                                   "--baseline", "pretrained", "--data-dir", str(data_root),
                                   "--results-dir", str(tmp_path / "r"), "-q"])
    assert isinstance(res.exception, DataNotFoundError)
    assert f"expected {data_root / 'pretrained' / FILE}" in str(res.exception)
    assert registered.url in str(res.exception)


def test_cli_unknown_combination_fails_before_running(tmp_path):
    res = CliRunner().invoke(app, ["run", "-c", "l1", "-a", "resnet56", "-d", "digits", "--baseline", "pretrained",
                                   "--results-dir", str(tmp_path)])
    assert isinstance(res.exception, ConfigError) and "Available:" in str(res.exception)
    assert not list(tmp_path.glob("*.json"))


def test_sweep_files_accept_baseline_pretrained(registered, tmp_path):
    from prunebench.sweep.execute import baseline_groups
    from prunebench.sweep.spec import parse_sweep

    doc = {"criteria": ["l1"], "architectures": ["resnet20"], "dataset": "digits", "seeds": [0, 1],
           "baseline": "pretrained"}
    sweep = parse_sweep(doc)
    assert sweep.baseline == PRETRAINED and all(cfg.pretrained for cfg in sweep.runs())
    assert len(baseline_groups(sweep.runs())) == 1  # one adapted baseline for both seeds
    with pytest.raises(ConfigError, match="no pretrained baseline for resnet56 on digits"):
        parse_sweep({**doc, "architectures": ["resnet56"]})
    with pytest.raises(ConfigError, match="baseline file .* does not exist"):
        parse_sweep({**doc, "baseline": "missing.pt"}, base=tmp_path)


def test_a_budget_that_trains_no_baseline_asks_for_one(tmp_path):
    cfg = RunConfig(criterion="l1", arch="resnet20", dataset="digits", device="cpu",
                    budget=get_budget("cpu-pretrained", {"train_subset": 64, "test_subset": 32}),
                    results_dir=tmp_path)
    with pytest.raises(ConfigError, match="trains no baseline .* --baseline pretrained"):
        execute(cfg, Reporter(quiet=True))


@pytest.mark.data
def test_the_real_resnet20_checkpoint(real_data_root, tmp_path, monkeypatch):
    """The published ResNet-20 file: verified, mapped, and about its known accuracy on cifar10-jpeg."""
    from prunebench.pipeline.metrics import accuracy

    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    entry = zoo.lookup("resnet20", "cifar10-jpeg")
    model = registry.architectures.get("resnet20").build(num_classes=10)
    info = zoo.load_pretrained(entry, model, real_data_root, num_classes=10)
    assert info["sha256"] == entry.sha256 and info["found_in"] == "data root"
    assert abs(info["stored_best_prec1"] - entry.reported_top1) < 0.5
    cfg = RunConfig(criterion="l1", arch="resnet20", dataset="cifar10-jpeg", budget=get_budget("cpu-pretrained"),
                    baseline=PRETRAINED, data_dir=real_data_root)
    _, data = load_data(cfg, torch.device("cpu"))
    x, y = data.test_x[::5], data.test_y[::5]  # 2,000 test images
    top1 = accuracy(model, data.normalise(x), y, topk=(1,))[1]
    assert 76.0 < top1 < 86.0, top1  # 81.03 % on all 10,000 (the JPEG shift costs ~11 points)
    json.dumps(entry.describe())  # the record can store the entry
