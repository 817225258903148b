"""Promise: no code runs from data, and unusable files are named in one line.

CIFAR batch files are unpickled admitting only numpy's array reconstruction; a local CIFAR
archive is extracted only when its md5 is the published one. Checkpoints (``--baseline``,
cached baselines, compressed models) load as plain tensors and are checked before use; a
cached baseline that cannot be used is set aside and retrained. Every refusal is a
one-line error naming the file, and torch's advice to load with ``weights_only=False`` is
never passed on.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import TINY, invoke, one_line_error, prunebench, records, run_args

from prunebench import registry
from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig
from prunebench.datasets import cache_dir
from prunebench.datasets import cifar as cifar_mod
from prunebench.errors import PrunebenchError
from prunebench.pipeline.baseline import baseline_key
from prunebench.pipeline.data import load_data
from prunebench.pipeline.surgery import load_compressed, save_compressed

# --- CIFAR python-version files ------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way the released CIFAR files were written (Python 2, protocol 2):
    strings as BINSTRING, numpy under ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_str
    dispatch[bytes] = save_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def genuine_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    """The released layout and pickle format, with tiny batches; returns the training images."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {"batch_label": f"{name} of 5", "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 "data": data, "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(py2_pickle(batch))
        xs.append(data)
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": cifar_mod.CIFAR10_CLASSES,
                                                      "num_cases_per_batch": per_batch, "num_vis": 3072}))
    return np.concatenate(xs[:5])


def test_genuine_cifar_files_load_through_the_restricted_unpickler(tmp_path):
    train = genuine_cifar10(tmp_path)
    d = cifar_mod.CIFAR10.load(tmp_path, download=False)
    assert torch.equal(d.train_x, torch.from_numpy(train.reshape(-1, 3, 32, 32)))
    assert d.classes == cifar_mod.CIFAR10_CLASSES and len(d.test_y) == 4


class RunsCode:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
def test_a_crafted_cifar_batch_cannot_run_code(tmp_path, how):
    genuine_cifar10(tmp_path / "root")
    marker = tmp_path / "ran"
    batch = tmp_path / "root" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": RunsCode(marker, how), b"labels": [0]}, protocol=2))
    with pytest.raises(PrunebenchError) as exc:
        cifar_mod.CIFAR10.load(tmp_path / "root", download=False)
    assert not marker.exists()  # nothing ran
    assert str(batch) in str(exc.value) and "refused" in str(exc.value)


def test_a_truncated_cifar_batch_is_a_one_line_error_naming_it(tmp_path):
    genuine_cifar10(tmp_path / "root")
    batch = tmp_path / "root" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:200])
    proc = prunebench("run", "-c", "l1", "-a", "resnet20", "-d", "cifar10", "--dataset-option", "download=false",
                      "--data-dir", tmp_path / "root", "--results-dir", tmp_path / "r", "-q")
    line = one_line_error(proc)
    assert str(batch) in line and "truncated or corrupt" in line


def test_a_local_cifar_archive_with_the_wrong_md5_is_not_extracted(tmp_path, monkeypatch):
    genuine_cifar10(tmp_path / "src")
    (tmp_path / "root").mkdir()
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar_mod, "_download", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(PrunebenchError) as exc:
        cifar_mod.CIFAR10.load(tmp_path / "root")
    assert "md5" in str(exc.value) and cifar_mod._C10.md5 in str(exc.value) and str(archive) in str(exc.value)
    assert not (tmp_path / "root" / "cifar-10-batches-py").exists()  # nothing was unpacked


# --- checkpoints ------------------------------------------------------------------------------


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def resnet(name: str = "resnet20") -> torch.nn.Module:
    return registry.architectures.get(name).build(num_classes=10, in_channels=1)


def bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    files = {name: d / f"{name}.pt" for name in ("text", "other-arch", "other-classes", "malicious", "truncated",
                                                  "list", "empty")}
    files["text"].write_text("these are my notes, not weights\n")
    torch.save({"state_dict": resnet("resnet32").state_dict()}, files["other-arch"])
    other = registry.architectures.get("resnet20").build(num_classes=100, in_channels=1)
    torch.save(other.state_dict(), files["other-classes"])
    torch.save({"state_dict": {"x": Evil(tmp_path / "ran")}}, files["malicious"])
    torch.save({"state_dict": resnet().state_dict()}, d / "good.pt")
    files["truncated"].write_bytes((d / "good.pt").read_bytes()[:5000])
    torch.save([torch.ones(3)], files["list"])
    files["empty"].write_bytes(b"")
    files["a folder"] = d
    good = resnet().state_dict()
    odd = {
        "meta": lambda v: v.to("meta"),
        "sparse": lambda v: v.to_sparse(),
        "complex": lambda v: v.to(torch.complex64),
        "integer": lambda v: (v * 100).round().to(torch.int64),
    }
    for name, change in odd.items():
        files[name] = d / f"{name}.pt"
        torch.save({**good, "conv1.weight": change(good["conv1.weight"])}, files[name])
    files["all zero"] = d / "zero.pt"
    torch.save({k: torch.zeros_like(v) for k, v in good.items()}, files["all zero"])
    return files


ODD_WEIGHTS = {"meta": "meta tensor", "sparse": "sparse_coo tensor", "complex": "complex numbers",
               "integer": "int64 values in 'conv1.weight'", "all zero": "only zeros"}


@pytest.mark.parametrize("kind", ["text", "other-arch", "other-classes", "malicious", "truncated", "list", "empty",
                                  "a folder", *ODD_WEIGHTS])
def test_an_unusable_baseline_file_is_a_one_line_error_naming_it(tmp_path, kind):
    path = bad_checkpoints(tmp_path)[kind]
    res = invoke(*run_args(tmp_path / "r", "--baseline", path))
    assert isinstance(res.exception, PrunebenchError), repr(res.exception)
    msg = str(res.exception)
    assert str(path) in msg and "\n" not in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    assert not (tmp_path / "ran").exists()
    if kind == "other-arch":
        assert "does not fit" in msg and "unexpected: layer1.3." in msg
    if kind == "other-classes":
        assert "does not fit" in msg and "wrong shape (file vs model): fc.weight (100, 64) vs (10, 64)" in msg
    if kind in ODD_WEIGHTS:
        assert ODD_WEIGHTS[kind] in msg, msg


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_meta_or_sparse_weights_are_a_one_line_error_from_the_command_line(tmp_path, kind):
    path = bad_checkpoints(tmp_path)[kind]
    line = one_line_error(prunebench(*run_args(tmp_path / "r", "--baseline", path)))
    assert str(path) in line


def test_a_checkpoint_without_batchnorm_counters_loads_as_torch_loads_it(tmp_path):
    """The published CIFAR ResNets were saved before BatchNorm counted its batches."""
    state = {k: v for k, v in resnet().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "old.pt")
    res = invoke(*run_args(tmp_path / "r", "--baseline", tmp_path / "old.pt"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    (rec,) = records(tmp_path / "r").values()
    assert rec["status"] == "complete" and rec["baseline_info"]["source"] == str(tmp_path / "old.pt")


def test_a_malicious_baseline_is_refused_without_a_traceback_or_torchs_hint(tmp_path):
    path = bad_checkpoints(tmp_path)["malicious"]
    proc = prunebench(*run_args(tmp_path / "r", "--baseline", path))
    line = one_line_error(proc)
    assert str(path) in line and "refused" in line and "weights_only" not in proc.stderr
    assert not (tmp_path / "ran").exists()


def cached_baseline_path(lr: float) -> Path:
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", {**TINY, "lr": lr}))
    splits, _ = load_data(cfg, torch.device("cpu"))
    path = cache_dir() / "baselines" / f"{baseline_key(cfg, splits)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_corrupt_cached_baseline_is_named_set_aside_and_retrained(tmp_path):
    lr = 0.0201  # a cache entry of its own
    path = cached_baseline_path(lr)
    path.write_bytes(b"\x00\x17" * 999)
    args = [a for a in run_args(tmp_path / "r", "--set", f"lr={lr}") if a != "-q"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    (rec,) = records(tmp_path / "r").values()
    assert rec["status"] == "complete" and rec["baseline_info"]["source"] == "trained"
    assert str(path) in "".join(res.stderr.split())  # the log names the file (rich may wrap the line)
    assert path.with_name(path.name + ".corrupt").read_bytes() == b"\x00\x17" * 999
    assert torch.load(path, weights_only=True)["state_dict"]  # the new one is usable


@pytest.mark.parametrize("damage", ["truncated", "empty", "other architecture", "a list"])
def test_every_kind_of_damaged_cached_baseline_is_detected_and_set_aside(tmp_path, damage):
    from prunebench.pipeline.baseline import _load_cached_baseline
    from prunebench.progress import Reporter

    path = tmp_path / "baseline.pt"
    torch.save({"state_dict": resnet().state_dict(), "seconds": 1.0}, path)
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other architecture":
        torch.save({"state_dict": resnet("resnet32").state_dict()}, path)
    else:
        torch.save([1, 2], path)
    damaged = path.read_bytes()
    assert _load_cached_baseline(resnet(), path, Reporter(quiet=True)) is None
    assert not path.exists() and path.with_name("baseline.pt.corrupt").read_bytes() == damaged


# --- compressed models -------------------------------------------------------------------------


def compressed_variants(tmp_path: Path) -> dict[str, Path]:
    model = resnet()
    good = tmp_path / "good.pt"
    save_compressed(good, "resnet20", {"num_classes": 10, "in_channels": 1}, [], model, [1, 1, 8, 8])
    payload = torch.load(good, weights_only=True)
    out = {}

    def variant(name: str, **changes) -> None:
        out[name] = tmp_path / f"{name}.pt"
        torch.save({**payload, **changes}, out[name])

    variant("plan for a missing layer", plan=json.dumps([{"op": "prune", "layer": "nope", "keep": [0]}]))
    variant("plan step without keep", plan=json.dumps([{"op": "prune", "layer": "layer1.0.conv1"}]))
    variant("weights of another shape", plan=json.dumps([{"op": "prune", "layer": "layer1.0.conv1", "keep": [0, 1]}]))
    variant("malformed json", plan="[{")
    variant("no input shape", input_shape=None)
    variant("arch a list", arch=["resnet20"])
    payload.pop("plan")
    variant("no plan")
    out["truncated"] = tmp_path / "truncated.pt"
    out["truncated"].write_bytes(good.read_bytes()[:3000])
    out["text"] = tmp_path / "text.pt"
    out["text"].write_text("hello\n")
    return out


@pytest.mark.parametrize("kind", ["plan for a missing layer", "plan step without keep", "weights of another shape",
                                  "malformed json", "no input shape", "no plan", "truncated", "text", "arch a list"])
def test_load_compressed_on_a_bad_file_is_a_one_line_error_naming_it(tmp_path, kind):
    path = compressed_variants(tmp_path)[kind]
    with pytest.raises(PrunebenchError) as exc:
        load_compressed(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_a_malicious_dataset_cache_entry_is_ignored_without_torchs_hint(tmp_path):
    from prunebench.datasets import cache

    path = tmp_path / "entry.pt"
    torch.save({"train_x": Evil(tmp_path / "ran")}, path)
    with pytest.warns(UserWarning) as warned:
        assert cache.load(path, "stamp") is None  # rebuilt from the source instead
    message = str(warned[0].message)
    assert str(path) in message and "refused" in message and "weights_only" not in message
    assert not (tmp_path / "ran").exists()
