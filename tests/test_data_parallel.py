"""Data-parallel training over two gloo processes computes what one process computes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from prunebench.datasets.streaming import Preprocess, StreamedSplits, scan
from prunebench.training.steps import Recipe, TrainOptions
from prunebench.training.streaming import StreamData, train_streamed
from tests._folders import make_folder

RECIPE = Recipe(epochs=2, lr=0.05, batch_size=8, momentum=0.9, weight_decay=5e-4, schedule="cosine")


def _data(root: Path) -> StreamData:
    train, test, classes, _ = scan(root)
    splits = StreamedSplits("t", train, test, classes, (0.5,) * 3, (0.25,) * 3, Preprocess(16, 18, 16))
    return StreamData(splits, torch.device("cpu"), torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))


def _model() -> nn.Module:
    torch.manual_seed(0)  # no BatchNorm: per-process statistics would differ from one process's
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 3))


def _rank(rank: int, port: int, root: Path, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from prunebench.training import distributed

    world = distributed.init(torch.device("cpu"))
    try:
        data = _data(root)
        model = _model()
        stats = train_streamed(model, data, RECIPE, seed=3, options=TrainOptions(precision="fp32"))
        result = {"state": model.state_dict(), "stats": stats, "acc": data.evaluate(model, (1,)),
                  "world": world.describe()}
        torch.manual_seed(100 + rank)  # same architecture, other weights: rank 0's win
        same = nn.Linear(4, 2)
        distributed.agree_on_model(same, "test")
        result["agreed"] = same.state_dict()
        try:  # another architecture on rank 1: refused on every rank
            distributed.agree_on_model(nn.Linear(4, 2 + rank), "test")
        except RuntimeError as exc:
            result["refused"] = str(exc)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_weights_as_one(tmp_path):
    root = make_folder(tmp_path / "tree", classes=3, train=8, test=5)  # 24 images: 3 global batches of 8
    torch.multiprocessing.start_processes(_rank, args=(_free_port(), root, tmp_path), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    data, model = _data(root), _model()
    stats = train_streamed(model, data, RECIPE, seed=3, options=TrainOptions(precision="fp32"))
    for r in ranks:
        assert r["world"] == {"world_size": 2, "backend": "gloo"}
        for name, value in model.state_dict().items():  # the mean of the halves' gradients is the batch's
            torch.testing.assert_close(r["state"][name], value, rtol=1e-4, atol=1e-5)
        assert r["stats"]["steps"] == stats["steps"] == 6  # global epochs: 2 epochs of 3 steps
        assert r["stats"]["loss"] == pytest.approx(stats["loss"], rel=1e-4)
        assert r["stats"]["train_top1"] == pytest.approx(stats["train_top1"])
        assert r["acc"] == pytest.approx(data.evaluate(model, (1,)))  # 15 test images, sharded 8 + 7
        assert "ranks [1] computed another architecture" in r["refused"]
    torch.testing.assert_close(ranks[1]["agreed"], ranks[0]["agreed"], rtol=0, atol=0)
