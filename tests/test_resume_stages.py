"""Resumable long stages: an interrupted baseline training or adaptation resumes from its
partial checkpoint and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from prunebench.progress import PlainProgress
from prunebench.training.engine import DeviceData, train
from prunebench.training.resume import StageCheckpoint
from prunebench.training.steps import Recipe, TrainOptions

RECIPE = Recipe(epochs=3, lr=0.05, batch_size=16, momentum=0.9, weight_decay=5e-4, schedule="cosine")


def _data() -> DeviceData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (72, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 3, (72,), generator=g)
    return DeviceData(train_x=x, train_y=y, test_x=x[:8], test_y=y[:8], mean=torch.full((1, 1, 1, 1), 0.5),
                      std=torch.full((1, 1, 1, 1), 0.25), hflip=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


class Killed(Exception):
    pass


def _interrupt_at(step_to_die: int):
    def progress(description, step, total, loss):
        if step == step_to_die:
            raise Killed

    return progress


OPTS = TrainOptions(precision="fp32")


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("interval", [1e9, 0.0], ids=["at-epoch-ends", "every-step"])
def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path, interval):
    data = _data()
    reference = _model()
    stats_ref = train(reference, data, RECIPE, seed=3, options=OPTS)
    model = _model()
    ckpt = StageCheckpoint(tmp_path / "stage", {"stage": "t"}, log=lambda m: None, interval=interval)
    with pytest.raises(Killed):  # 4 steps per epoch: dies in the middle of the second epoch
        train(model, data, RECIPE, seed=3, options=OPTS, checkpoint=ckpt, progress=_interrupt_at(6))
    saved = torch.load(ckpt.current, weights_only=True)
    assert saved["step"] == (4 if interval > 1 else 5)
    fresh = _model()
    log: list[str] = []
    again = StageCheckpoint(tmp_path / "stage", {"stage": "t"}, log=log.append, interval=interval)
    stats = train(fresh, data, RECIPE, seed=3, options=OPTS, checkpoint=again)
    assert log == [f"resuming from stage.partial.pt: step {saved['step']}"]
    assert _same(fresh, reference)
    assert stats == pytest.approx(stats_ref)
    again.clear()
    assert not list(tmp_path.iterdir())


def test_a_corrupt_partial_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
    data = _data()
    reference = _model()
    train(reference, data, RECIPE, seed=3, options=OPTS)
    ckpt = StageCheckpoint(tmp_path / "stage", {"stage": "t"}, log=lambda m: None, interval=1e9)
    with pytest.raises(Killed):
        train(_model(), data, RECIPE, seed=3, options=OPTS, checkpoint=ckpt, progress=_interrupt_at(10))
    assert ckpt.current.exists() and ckpt.previous.exists()  # steps 8 and 4
    ckpt.current.write_bytes(ckpt.current.read_bytes()[:100])  # truncated
    log: list[str] = []
    fresh = _model()
    train(fresh, data, RECIPE, seed=3, options=OPTS,
          checkpoint=StageCheckpoint(tmp_path / "stage", {"stage": "t"}, log=log.append, interval=1e9))
    assert "stage.partial.pt is not usable" in log[0] and "set aside as stage.partial.pt.bad-1" in log[0]
    assert log[1] == "resuming from stage.partial.prev.pt: step 4"
    assert (tmp_path / "stage.partial.pt.bad-1").exists()
    assert _same(fresh, reference)


def test_a_partial_checkpoint_of_another_training_is_never_resumed(tmp_path):
    data = _data()
    ckpt = StageCheckpoint(tmp_path / "stage", {"stage": "t", "lr": 0.05}, log=lambda m: None, interval=1e9)
    with pytest.raises(Killed):
        train(_model(), data, RECIPE, seed=3, options=OPTS, checkpoint=ckpt, progress=_interrupt_at(6))
    log: list[str] = []
    other = StageCheckpoint(tmp_path / "stage", {"stage": "t", "lr": 0.1}, log=log.append, interval=1e9)
    assert other.load() is None
    assert "belongs to another training" in log[0]


def test_plain_progress_lines_every_tenth_and_every_30_seconds_with_an_announced_duration():
    lines: list[str] = []
    now = [0.0]
    plain = PlainProgress(lines.append, batch=128, clock=lambda: now[0])
    for step in range(1, 201):
        now[0] += 1.0  # one step per second: 200 s in all
        plain("adapt", step, 200, 1.5)
    assert lines[0] == "adapt: 200 steps, expected to take 3 min (128 img/s, measured on its first 6 steps)"
    progress = lines[1:]
    # every 10 % (20 steps = 20 s < 30 s), so ten lines, the last one done
    assert len(progress) == 10
    assert progress[0].startswith("adapt: step 20/200 (10 %), loss 1.500, 128 img/s, about 3 min left")
    assert progress[-1] == "adapt: step 200/200 (100 %), loss 1.500, 128 img/s, done"
    # a slow stage: one line at least every 30 s even within a tenth
    lines.clear()
    now[0] = 0.0
    slow = PlainProgress(lines.append, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 20.0  # 1,000 steps would take 5.6 h; 10 steps take 200 s
        slow("baseline", step, 1000, 2.0)
    assert lines[0].startswith("baseline: 1000 steps, expected to take 5.6 h")
    # 30 s or more after the first step (at 20 s): at 60, 100, 140 and 180 s
    assert [line.split(" (")[0] for line in lines[1:]] == [f"baseline: step {s}/1000" for s in (3, 5, 7, 9)]


@pytest.mark.slow
def test_a_killed_baseline_training_resumes_to_the_same_cached_weights(tmp_path):
    """A real process killed (SIGKILL) mid-stage, started again: the same cached baseline."""
    args = [sys.executable, "-m", "prunebench", "baseline", "-a", "resnet20", "-d", "digits", "--budget", "smoke",
            "--set", "baseline_epochs=6", "--set", "train_subset=512", "--set", "batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEBENCH_CHECKPOINT_SECONDS": "0"}
    ref_cache, cache = tmp_path / "ref", tmp_path / "cache"
    subprocess.run(args, env={**env, "PRUNEBENCH_CACHE": str(ref_cache)}, check=True, capture_output=True)
    proc = subprocess.Popen(args, env={**env, "PRUNEBENCH_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.glob("baselines/*.partial.prev.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("baselines/*.partial.pt")), "killed before any checkpoint"
    done = subprocess.run(args, env={**env, "PRUNEBENCH_CACHE": str(cache)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    (a,) = [p for p in Path(ref_cache, "baselines").glob("*.pt")]
    (b,) = [p for p in Path(cache, "baselines").glob("*.pt")]
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(cache.glob("baselines/*.partial*"))  # the completed stage removed them


def test_a_cached_adaptation_s_accuracy_is_not_measured_again():
    from prunebench.pipeline.baseline import known_baseline_accuracy

    cached = {"adaptation": {"cached": True, "top1_after": 89.69, "top1_before": 83.2}}
    assert known_baseline_accuracy(cached, 10) == {"top1": 89.69}
    # adapted in this run: measured just before, on the same split
    assert known_baseline_accuracy({"adaptation": {"cached": False, "top1_after": 89.69}}, 10) == {"top1": 89.69}
    # no adaptation, or top-5 needed: evaluate
    assert known_baseline_accuracy({"source": "trained"}, 10) is None
    assert known_baseline_accuracy(cached, 100) is None
