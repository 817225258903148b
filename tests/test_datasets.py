"""Tests for the built-in datasets (prunebench.datasets)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

from prunebench.datasets import cache_dir, channel_stats, data_root
from prunebench.datasets import cifar as cifar_mod
from prunebench.datasets import imagefolder as imagefolder_mod
from prunebench.datasets.base import Dataset, DataSplits
from prunebench.datasets.cifar import CIFAR10, CIFAR100
from prunebench.datasets.digits import DIGITS
from prunebench.datasets.imagefolder import CIFAR10_JPEG, IMAGEFOLDER
from prunebench.datasets.synthetic import SYNTHETIC
from prunebench.errors import ConfigError, DataNotFoundError


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache directory, so nothing is written to the home folder."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(path))
    return path


def check_splits(d: DataSplits) -> None:
    """Invariants every dataset must satisfy."""
    assert d.train_x.dtype == torch.uint8 and d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == torch.int64 and d.test_y.dtype == torch.int64
    assert d.train_x.ndim == 4 and d.test_x.shape[1:] == d.train_x.shape[1:]
    assert len(d.train_x) == len(d.train_y) and len(d.test_x) == len(d.test_y)
    assert len(d.mean) == len(d.std) == d.in_channels
    assert all(0.0 <= m <= 1.0 for m in d.mean) and all(0.0 < s <= 1.0 for s in d.std)
    for y in (d.train_y, d.test_y):
        assert int(y.min()) >= 0 and int(y.max()) < d.num_classes


# --------------------------------------------------------------------------- paths, options


def test_data_root_and_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PRUNEBENCH_DATA", raising=False)
    monkeypatch.delenv("PRUNEBENCH_CACHE", raising=False)
    assert data_root(None) == tmp_path / "home" / ".cache" / "prunebench" / "data"
    assert cache_dir() == tmp_path / "home" / ".cache" / "prunebench"
    monkeypatch.setenv("PRUNEBENCH_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "env-cache"))
    assert data_root(None) == tmp_path / "env-data"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"  # the argument wins
    assert cache_dir() == tmp_path / "env-cache"


def test_package_import_is_light() -> None:
    code = "import sys, prunebench.datasets; print(sorted({'torch', 'sklearn', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_entry_points_name_the_dataset_objects() -> None:
    eps = {ep.name: ep for ep in entry_points(group="prunebench.datasets")}
    expected = {"digits", "synthetic", "cifar10", "cifar100", "imagefolder", "cifar10-jpeg"}
    assert expected <= eps.keys()
    for name in expected:
        obj = eps[name].load()
        assert isinstance(obj, Dataset) and obj.name == name and obj.description
    assert not DIGITS.needs_files and not SYNTHETIC.needs_files
    assert (
        CIFAR10.needs_files and CIFAR100.needs_files and IMAGEFOLDER.needs_files and CIFAR10_JPEG.needs_files
    )


@pytest.mark.parametrize("dataset", [DIGITS, SYNTHETIC, CIFAR10, CIFAR100, IMAGEFOLDER, CIFAR10_JPEG])
def test_unknown_option_is_a_config_error(dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no option 'n_trian'"):
        dataset.load(tmp_path, n_trian=10)


def test_unknown_option_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'n_train'"):
        SYNTHETIC.load(None, n_trian=10)


def test_option_strings_are_converted_and_checked() -> None:
    d = SYNTHETIC.load(None, n_train="20", n_test="10", size="8")
    assert d.train_x.shape == (20, 3, 8, 8)
    with pytest.raises(ConfigError, match="must be an integer"):
        SYNTHETIC.load(None, n_train="many")
    with pytest.raises(ConfigError, match="at least"):
        SYNTHETIC.load(None, num_classes=1)


def test_channel_stats_match_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (37, 3, 5, 4), generator=gen, dtype=torch.uint8)
    x[:, 1] //= 4  # channels must differ
    mean, std = channel_stats(x, chunk=8)  # several chunks
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean(dim=(0, 2, 3)), atol=1e-6)
    assert np.allclose(std, xf.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    assert mean[1] < 0.2 < mean[0]


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_classes() -> None:
    d = DIGITS.load(None)
    check_splits(d)
    assert d.name == "digits"
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert d.classes == [str(i) for i in range(10)]
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    assert d.hflip is False
    # stratified: every class has 35..37 test images
    counts = torch.bincount(d.test_y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    # train and test are disjoint images of the 1,797
    assert len(d.train_y) + len(d.test_y) == 1797


def test_digits_is_deterministic() -> None:
    a, b = DIGITS.load(None), DIGITS.load(Path("/nonexistent"))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.mean == b.mean and a.std == b.std


# --------------------------------------------------------------------------- synthetic


def test_synthetic_defaults_and_determinism() -> None:
    a = SYNTHETIC.load(None)
    check_splits(a)
    assert a.train_x.shape == (512, 3, 16, 16) and a.test_x.shape == (256, 3, 16, 16)
    assert a.num_classes == 10 and torch.bincount(a.train_y).tolist() == [52] * 2 + [51] * 8
    b = SYNTHETIC.load(None, seed=0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.test_y, b.test_y)
    c = SYNTHETIC.load(None, seed=1)
    assert not torch.equal(a.train_x, c.train_x)
    d = SYNTHETIC.load(None, n_train=64, n_test=32, num_classes=4, size=8, channels=1)
    check_splits(d)
    assert d.train_x.shape == (64, 1, 8, 8) and d.num_classes == 4


def nearest_class_mean_accuracy(d: DataSplits) -> float:
    """Estimate each class template as the mean train image; classify test by nearest mean."""
    x_train = d.train_x.flatten(1).double()
    x_test = d.test_x.flatten(1).double()
    means = torch.stack([x_train[d.train_y == k].mean(0) for k in range(d.num_classes)])
    pred = torch.cdist(x_test, means).argmin(1)
    return float((pred == d.test_y).double().mean())


def test_synthetic_is_learnable() -> None:
    assert nearest_class_mean_accuracy(SYNTHETIC.load(None)) > 0.9
    # the proxy can fail: with overwhelming noise the classes are no longer separable
    assert nearest_class_mean_accuracy(SYNTHETIC.load(None, noise=20.0, size=4, channels=1)) < 0.5


# --------------------------------------------------------------------------- imagefolder

CLASSES = ["cat", "dog", "frog"]
H, W = 6, 10  # not square, to catch H/W mix-ups


def class_image(k: int, i: int) -> torch.Tensor:
    """A flat-coloured image per class (with a per-image brightness step), [3, H, W] uint8."""
    img = torch.zeros(3, H, W, dtype=torch.uint8)
    img[k] = 200
    img[(k + 1) % 3] = 10 * i
    return img


def encode(img: torch.Tensor, kind: str) -> bytes:
    from torchvision.io import encode_jpeg, encode_png

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its codecs
        data = encode_png(img) if kind == "png" else encode_jpeg(img, quality=95)
    return data.numpy().tobytes()


def make_tree(root: Path, test_split: str = "test", n_train: int = 4, n_test: int = 2) -> Path:
    """train/<class>/*.png|jpg and <test_split>/<class>/*.png under root; PNGs are exact."""
    for split, n in (("train", n_train), (test_split, n_test)):
        for k, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = class_image(k, i)
                if split == "train" and i == n - 1:  # one JPEG per class: mixed formats
                    (folder / f"{i:03d}.jpg").write_bytes(encode(img, "jpeg"))
                else:
                    (folder / f"{i:03d}.png").write_bytes(encode(img, "png"))
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # ignored: not an image
    (root / "README.txt").write_text("ignored")
    return root


def make_targz(tree: Path, dest: Path, prefix: str = "") -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        for p in sorted(tree.rglob("*")):
            tf.add(p, arcname=prefix + p.relative_to(tree).as_posix(), recursive=False)
    return dest


def check_tree_splits(d: DataSplits, n_train: int = 4, n_test: int = 2) -> None:
    check_splits(d)
    assert d.classes == CLASSES
    assert d.train_x.shape == (3 * n_train, 3, H, W) and d.test_x.shape == (3 * n_test, 3, H, W)
    assert d.train_y.tolist() == [k for k in range(3) for _ in range(n_train)]
    assert d.test_y.tolist() == [k for k in range(3) for _ in range(n_test)]
    for k in range(3):
        for i in range(n_test):
            assert torch.equal(d.test_x[k * n_test + i], class_image(k, i))  # PNG: lossless
        for i in range(n_train - 1):
            assert torch.equal(d.train_x[k * n_train + i], class_image(k, i))
        jpeg = d.train_x[k * n_train + n_train - 1].int()
        assert (jpeg - class_image(k, n_train - 1).int()).abs().max() <= 8  # JPEG: close


def test_imagefolder_directory(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    d = IMAGEFOLDER.load(tmp_path, path=str(tree))
    check_tree_splits(d)
    assert d.name == "imagefolder" and d.hflip is True


def test_imagefolder_targz_matches_directory(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = make_targz(tree, tmp_path / "tree.tar.gz", prefix="./")
    a = IMAGEFOLDER.load(tmp_path, path=str(archive))
    check_tree_splits(a)
    b = IMAGEFOLDER.load(tmp_path, path=str(tree), cache=False)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert a.mean == b.mean and a.std == b.std


def test_imagefolder_plain_tar_with_top_folder_and_val(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", test_split="val")
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tree, arcname="mydata")  # everything under mydata/train, mydata/val
    check_tree_splits(IMAGEFOLDER.load(tmp_path, path="data.tar"))  # relative: against root


def test_imagefolder_second_load_uses_cache(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "tree")
    archive = make_targz(tree, tmp_path / "tree.tar.gz")
    first = IMAGEFOLDER.load(tmp_path, path=str(archive))
    cached = list((tmp_cache / "datasets").glob("*.pt"))
    assert len(cached) == 1 and not list((tmp_cache / "datasets").glob("*.tmp"))

    def no_decoding(*args: object, **kwargs: object) -> list[torch.Tensor]:
        raise AssertionError("decoded although a cache entry exists")

    monkeypatch.setattr(imagefolder_mod, "_decode_batch", no_decoding)
    second = IMAGEFOLDER.load(tmp_path, path=str(archive), hflip=False)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert first.classes == second.classes and first.mean == second.mean
    assert second.hflip is False  # not cached: an option of this load

    # a changed archive (new size and mtime) is decoded again, not served stale
    (tree / "test" / "dog" / "extra.png").write_bytes((tree / "test" / "dog" / "000.png").read_bytes())
    make_targz(tree, archive)
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(AssertionError, match="decoded although"):
        IMAGEFOLDER.load(tmp_path, path=str(archive))


def test_imagefolder_directory_cache_sees_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path / "tree")
    IMAGEFOLDER.load(tmp_path, path=str(tree))
    calls: list[int] = []
    real = imagefolder_mod._decode_batch

    def counting(encoded: list[torch.Tensor], names: list[str]) -> list[torch.Tensor]:
        calls.append(len(encoded))
        return real(encoded, names)

    monkeypatch.setattr(imagefolder_mod, "_decode_batch", counting)
    IMAGEFOLDER.load(tmp_path, path=str(tree))
    assert calls == []  # cache hit
    shutil.copy(tree / "test" / "cat" / "000.png", tree / "test" / "cat" / "009.png")
    d = IMAGEFOLDER.load(tmp_path, path=str(tree))
    assert calls and len(d.test_y) == 7


def test_imagefolder_corrupt_cache_is_rebuilt(tmp_path: Path, tmp_cache: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    IMAGEFOLDER.load(tmp_path, path=str(tree))
    (entry,) = (tmp_cache / "datasets").glob("*.pt")
    entry.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        check_tree_splits(IMAGEFOLDER.load(tmp_path, path=str(tree)))


def test_imagefolder_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        IMAGEFOLDER.load(tmp_path, path="nowhere.tar.gz")
    assert str(tmp_path / "nowhere.tar.gz") in str(err.value)
    with pytest.raises(ConfigError, match="needs the option path"):
        IMAGEFOLDER.load(tmp_path)


def test_imagefolder_missing_test_split(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    shutil.rmtree(tree / "test")
    with pytest.raises(DataNotFoundError) as err:
        IMAGEFOLDER.load(tmp_path, path=str(tree))
    msg = str(err.value)
    assert "no test/ or val/" in msg and "found train/ (3 classes, 12 images)" in msg


def test_imagefolder_missing_train_split(tmp_path: Path) -> None:
    tree = tmp_path / "flat"
    (tree / "images").mkdir(parents=True)
    (tree / "labels.csv").write_text("a,b\n")
    with pytest.raises(DataNotFoundError) as err:
        IMAGEFOLDER.load(tmp_path, path=str(tree))
    msg = str(err.value)
    assert "no train/" in msg and "images/" in msg and "labels.csv" in msg


def test_imagefolder_mixed_sizes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    big = torch.zeros(3, H + 1, W, dtype=torch.uint8)
    (tree / "test" / "frog" / "big.png").write_bytes(encode(big, "png"))
    with pytest.raises(ConfigError, match=r"different sizes.*big\.png is 7x10"):
        IMAGEFOLDER.load(tmp_path, path=str(tree))


def test_imagefolder_grey_and_alpha(tmp_path: Path) -> None:
    from PIL import Image  # torchvision's encode_png cannot write an alpha channel

    tree = make_tree(tmp_path / "tree")
    grey = torch.full((1, H, W), 77, dtype=torch.uint8)
    Image.new("L", (W, H), 77).save(tree / "train" / "dog" / "grey.png")
    Image.new("RGBA", (W, H), (99, 99, 99, 128)).save(tree / "test" / "dog" / "rgba.png")
    d = IMAGEFOLDER.load(tmp_path, path=str(tree))
    assert d.train_x.shape[1] == 3 and d.test_x.shape[1] == 3
    names = sorted(p.name for p in (tree / "train" / "dog").iterdir())
    assert torch.equal(d.train_x[4 + names.index("grey.png")], grey.expand(3, H, W))
    assert bool((d.test_x[d.test_y == 1][-1] == 99).all())


def test_cifar10_jpeg_missing_names_the_archive(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10_JPEG.load(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar10-jpeg.tar.gz") in msg and "PRUNEBENCH_DATA" in msg and "--data-dir" in msg


def test_cifar10_jpeg_reads_the_archive_in_root(tmp_path: Path) -> None:
    make_targz(make_tree(tmp_path / "tree"), tmp_path / "cifar10-jpeg.tar.gz")
    d = CIFAR10_JPEG.load(tmp_path)
    assert d.name == "cifar10-jpeg"
    check_tree_splits(d)


# --------------------------------------------------------------------------- cifar (python version)


def write_pickle(path: Path, obj: dict[bytes, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """The official layout with tiny batches; returns the train/test data and labels written."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_pickle(
            folder / f"data_batch_{i}",
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
             b"filenames": [b"x.png"] * per_batch},
        )  # fmt: skip
        xs.append(data)
        ys += labels
    test = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
    write_pickle(
        folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [9, 0], b"data": test}
    )
    write_pickle(
        folder / "batches.meta",
        {b"label_names": [c.encode() for c in cifar_mod.CIFAR10_CLASSES], b"num_cases_per_batch": per_batch},
    )
    return np.concatenate(xs), ys, test, [9, 0]


def test_cifar10_python_round_trip(tmp_path: Path) -> None:
    train, train_labels, test, test_labels = fake_cifar10(tmp_path)
    d = CIFAR10.load(tmp_path)
    check_splits(d)
    assert d.name == "cifar10" and d.classes == cifar_mod.CIFAR10_CLASSES and d.hflip
    assert d.train_x.shape == (15, 3, 32, 32) and d.test_x.shape == (2, 3, 32, 32)
    assert torch.equal(d.train_x, torch.from_numpy(train.reshape(-1, 3, 32, 32)))
    assert torch.equal(d.test_x, torch.from_numpy(test.reshape(-1, 3, 32, 32)))
    assert d.train_y.tolist() == train_labels and d.test_y.tolist() == test_labels
    # channel-major layout: the first 1024 values are the red plane
    assert torch.equal(d.train_x[0, 0].flatten(), torch.from_numpy(train[0, :1024]))
    expected_mean = train.reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1).mean(1) / 255
    assert np.allclose(d.mean, expected_mean, atol=1e-5)


def test_cifar10_extracts_archive_in_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    train, *_ = fake_cifar10(src)
    (tmp_path / "root").mkdir()
    with tarfile.open(tmp_path / "root" / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar_mod, "_download", lambda *a, **k: pytest.fail("tried to download"))
    # a local archive is extracted only when its md5 is the published one: publish this one
    md5 = cifar_mod.md5sum(tmp_path / "root" / "cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar_mod, "_C10", dataclasses.replace(cifar_mod._C10, md5=md5))
    d = CIFAR10.load(tmp_path / "root")
    assert torch.equal(d.train_x, torch.from_numpy(train.reshape(-1, 3, 32, 32)))
    assert (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_cifar100_python_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    train = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    names = [f"class_{i:02d}" for i in range(100)]
    write_pickle(
        folder / "train", {b"data": train, b"fine_labels": [0, 99, 5, 5, 42], b"coarse_labels": [0] * 5}
    )
    write_pickle(folder / "test", {b"data": test, b"fine_labels": [1, 2, 3], b"coarse_labels": [0] * 3})
    write_pickle(
        folder / "meta", {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}
    )
    d = CIFAR100.load(tmp_path)
    check_splits(d)
    assert d.name == "cifar100" and d.classes == names and d.num_classes == 100
    assert d.train_y.tolist() == [0, 99, 5, 5, 42] and d.test_y.tolist() == [1, 2, 3]
    assert torch.equal(d.test_x, torch.from_numpy(test.reshape(-1, 3, 32, 32)))


def test_cifar_missing_files_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, dest: Path, md5: str, timeout: float = 0.0) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar_mod, "_download", offline)
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10.load(tmp_path)
    msg = str(err.value)
    for part in (
        str(tmp_path / "cifar-10-batches-py"),
        "data_batch_1",
        "data_batch_5",
        "test_batch",
        str(tmp_path / "cifar-10-python.tar.gz"),
        "--data-dir",
        "PRUNEBENCH_DATA",
        "network is unreachable",
    ):
        assert part in msg, part
    with pytest.raises(DataNotFoundError) as err100:
        CIFAR100.load(tmp_path)
    msg100 = str(err100.value)
    assert str(tmp_path / "cifar-100-python") in msg100 and "train, test, meta" in msg100


def test_cifar_download_false_does_not_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(cifar_mod, "_download", lambda url, *a, **k: calls.append(url))
    with pytest.raises(DataNotFoundError, match="download=False"):
        CIFAR10.load(tmp_path, download=False)
    assert calls == []


def test_cifar_partial_folder_names_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    monkeypatch.setattr(cifar_mod, "_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        CIFAR10.load(tmp_path)


# --------------------------------------------------------------------------- real data


@pytest.mark.data
def test_real_cifar10_jpeg(real_data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEBENCH_DATA", str(real_data_root))
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    d = CIFAR10_JPEG.load(None)  # the root comes from PRUNEBENCH_DATA
    check_splits(d)
    assert d.name == "cifar10-jpeg"
    assert d.train_x.shape == (50_000, 3, 32, 32) and d.test_x.shape == (10_000, 3, 32, 32)
    assert d.num_classes == 10 and d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert torch.bincount(d.train_y).tolist() == [5000] * 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    assert np.allclose(d.mean, (0.491, 0.482, 0.447), atol=0.01)

    def decoded_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second load read the archive instead of the cache")

    monkeypatch.setattr(imagefolder_mod, "_read_archive", decoded_again)
    again = CIFAR10_JPEG.load(None)  # from the decoded cache
    assert torch.equal(again.test_x, d.test_x) and torch.equal(again.train_y, d.train_y)
