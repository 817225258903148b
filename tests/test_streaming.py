"""Streamed datasets: layout errors, tar and directory sources, the ImageNet recipe, batches."""

from __future__ import annotations

import random
import tarfile

import pytest
import torch

from prunebench.datasets.imagenet import load_imagenet
from prunebench.datasets.streaming import ImageFiles, Preprocess, StreamedSplits, crop_box, scan
from prunebench.errors import ConfigError, DataNotFoundError
from prunebench.training.streaming import TEST, TRAIN, StreamData, epoch_batches, eval_batches
from tests._folders import make_folder, make_tar


def test_missing_imagenet_root_names_the_expected_layout(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_imagenet(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "imagenet") in msg and "train/<wnid>/*.JPEG" in msg and "val/<wnid>/*.JPEG" in msg


@pytest.mark.parametrize("problem, expected", [
    ("no-val", "no val/"),
    ("no-train", "no train/"),
    ("empty-class", "c1/ holds no images"),
    ("extra-class", "classes that train/ lacks (zz)"),
    ("no-classes", "val/ has no class folders"),
])
def test_malformed_roots_give_one_line_errors_naming_the_layout(tmp_path, problem, expected):
    import shutil

    root = make_folder(tmp_path / "imagenet", classes=2, train=1, test=1)
    if problem == "no-val":
        shutil.rmtree(root / "val")
    elif problem == "no-train":
        shutil.rmtree(root / "train")
    elif problem == "empty-class":
        for f in (root / "train" / "c1").iterdir():
            f.unlink()
    elif problem == "extra-class":
        shutil.copytree(root / "val" / "c0", root / "val" / "zz")
    elif problem == "no-classes":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_imagenet(tmp_path)
    msg = str(info.value)
    assert expected in msg and "\n" not in msg
    assert "train/<class>/<image>.JPEG" in msg  # the expected layout


def test_a_plain_tar_streams_the_same_images_as_the_directory(tmp_path):
    folder = make_folder(tmp_path / "tree")
    tar = make_tar(folder, tmp_path / "tree.tar")
    d_train, d_test, d_classes, _ = scan(folder)
    t_train, t_test, t_classes, _ = scan(tar)
    assert d_classes == t_classes == ["c0", "c1", "c2"]
    assert d_train.names == t_train.names and d_train.labels == t_train.labels == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert len(d_test) == len(t_test) == 6
    pre = Preprocess(24, 28, 24)
    from_dir, from_tar = ImageFiles(d_train, d_test, pre), ImageFiles(t_train, t_test, pre)
    for key in ((TRAIN, 5, 123), (TEST, 3, None)):
        a, la = from_dir[key]
        b, lb = from_tar[key]
        assert torch.equal(a, b) and la == lb


def test_a_compressed_tar_is_refused_with_the_reason(tmp_path):
    folder = make_folder(tmp_path / "tree", classes=2, train=1, test=1)
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname=".")
    with pytest.raises(DataNotFoundError, match="uncompressed tar"):
        scan(tmp_path / "tree.tar.gz")


def test_the_recipe_gives_the_configured_sizes_and_is_seeded(tmp_path):
    train, test, _, _ = scan(make_folder(tmp_path / "tree"))
    files = ImageFiles(train, test, Preprocess(train_size=16, eval_resize=20, eval_crop=18))
    a, label = files[(TRAIN, 4, 7)]
    assert a.dtype == torch.uint8 and a.shape == (3, 16, 16) and label == 1
    assert torch.equal(a, files[(TRAIN, 4, 7)][0])  # same seed, same crop and flip
    assert any(not torch.equal(a, files[(TRAIN, 4, s)][0]) for s in range(8, 12))
    e, _ = files[(TEST, 0, None)]
    assert e.shape == (3, 18, 18)
    with pytest.raises(ConfigError, match="eval_crop"):
        Preprocess(eval_resize=16, eval_crop=20)


def test_random_resized_crop_boxes_lie_inside_the_image():
    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(1, 60), rng.randint(1, 60)
        top, left, ch, cw = crop_box(rng, h, w)
        assert 0 <= top and 0 <= left and 0 < ch and 0 < cw and top + ch <= h and left + cw <= w


def test_ranks_split_each_global_batch_and_together_read_it_whole():
    one = list(epoch_batches(50, 8, seed=3, epoch=2))
    two = [list(epoch_batches(50, 8, seed=3, epoch=2, rank=r, size=2)) for r in range(2)]
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    for b, (r0, r1) in enumerate(zip(*two, strict=True)):
        assert len(r0) == len(r1) == 4
        assert sorted(r0 + r1) == sorted(one[b])  # same images, same augmentation seeds
    assert list(epoch_batches(50, 8, seed=3, epoch=3)) != one  # a new permutation each epoch
    assert [k for batch in eval_batches(TEST, list(range(5)), batch_size=2) for k in batch] == \
        [(TEST, i, None) for i in range(5)]


def test_streamed_evaluation_and_calibration_match_the_decoded_images(tmp_path):
    train, test, classes, _ = scan(make_folder(tmp_path / "tree"))
    pre = Preprocess(16, 16, 16)
    splits = StreamedSplits("t", train, test, classes, (0.5,) * 3, (0.25,) * 3, pre)
    data = StreamData(splits, torch.device("cpu"), torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25),
                      workers=0)
    files = ImageFiles(train, test, pre)
    images = torch.stack([files[(TEST, i, None)][0] for i in range(len(test))])
    labels = torch.tensor(test.labels)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    expected = (model(data.normalise(images)).argmax(1) == labels).float().mean().item() * 100
    assert data.evaluate(model, (1,))[1] == pytest.approx(expected)
    cal, cal_labels = data.calibration([5, 0, 7])
    assert torch.equal(cal, data.normalise(torch.stack([files[(TRAIN, i, None)][0] for i in (5, 0, 7)])))
    assert cal_labels.tolist() == [1, 0, 1]


def test_a_run_on_a_streamed_dataset_completes_in_one_process(tmp_path):
    """The whole protocol on streamed data: baseline, calibration, compression, fine-tune, record."""
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig
    from prunebench.pipeline.runner import execute
    from prunebench.progress import Reporter

    make_folder(tmp_path / "data" / "imagenet", classes=3, train=8, test=4)
    budget = get_budget("smoke").override(baseline_epochs=1, finetune_epochs=1, train_subset=16, test_subset=9,
                                          calibration_size=8, latency_repeats=1, batch_size=8)
    cfg = RunConfig(criterion="l1", arch="tv_resnet18", dataset="imagenet", budget=budget, data_dir=tmp_path / "data",
                    results_dir=tmp_path / "results", device="cpu", precision="fp32", workers=0,
                    dataset_options={"train_size": 32, "eval_resize": 36, "eval_crop": 32})
    record, path = execute(cfg, Reporter(quiet=True))
    assert record["status"] == "complete" and path.is_file()
    assert record["data"] == {"train_images": 16, "test_images": 9, "input_shape": [3, 32, 32], "num_classes": 3}
    assert record["ledger"]["spent"] == {"finetune": 1.0} and "distributed" not in record
    assert abs(record["achieved"]["macs_reduction"] - 0.5) <= 0.01
    assert record["baseline_info"]["steps"] == 2.0  # 16 images, batch 8: two steps per epoch


def test_any_image_folder_streams_from_a_tar_with_a_test_split(tmp_path):
    from prunebench.datasets.imagenet import load_imagefolder_stream

    make_tar(make_folder(tmp_path / "tree", classes=2, train=3, test=2, test_name="test"), tmp_path / "mine.tar")
    splits = load_imagefolder_stream(tmp_path, path="mine.tar", train_size="24", hflip="false")
    assert splits.classes == ["c0", "c1"] and len(splits.train) == 6 and len(splits.test) == 4
    assert splits.train.is_tar and splits.preprocess.train_size == 24 and splits.hflip is False
    with pytest.raises(DataNotFoundError, match="needs the option path="):
        load_imagefolder_stream(tmp_path)


def test_the_listing_is_cached_and_follows_changes(tmp_path, monkeypatch):
    from prunebench.datasets import streaming

    folder = make_folder(tmp_path / "tree", classes=2, train=2, test=1)
    first = scan(folder)
    calls = []
    monkeypatch.setattr(streaming, "_scan_split_dir", lambda *a: calls.append(a) or {})
    assert scan(folder) == first and not calls  # from the cached index
    monkeypatch.undo()
    (folder / "train" / "c1" / "0001.jpg").rename(folder / "train" / "c1" / "extra.jpg")
    (folder / "train" / "c0" / "0000.jpg").unlink()
    train, _, _, _ = scan(folder)
    assert len(train) == 3 and train.names[-1].endswith("c1/extra.jpg")
