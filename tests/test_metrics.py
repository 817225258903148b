import time

import pytest
import torch
from torch import nn

from prunebench.pipeline import metrics
from prunebench.pipeline.metrics import (
    accuracy,
    count_macs,
    count_params,
    measure_latency,
    measure_latency_pair,
)


def test_macs_count_conv_and_linear_with_bias_adds_only():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=True),  # 4*8*8 outputs * (3*3*3) + 4*8*8 bias
        nn.BatchNorm2d(4), nn.ReLU(),  # not MACs
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise: 4*8*8 * 9
        nn.Flatten(), nn.Linear(256, 10),  # 256*10 + 10
    )
    expected = 256 * 27 + 256 + 256 * 9 + 2560 + 10
    assert count_macs(model, torch.zeros(1, 3, 8, 8)) == expected
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_macs_count_is_per_image():
    model = nn.Conv2d(1, 2, 1, bias=False)
    assert count_macs(model, torch.zeros(5, 1, 4, 4)) == 2 * 16


class Shared(nn.Module):
    """One conv applied twice, a non-square strided dilated conv, a bias-free linear layer,
    and a Conv2d subclass (as factorised layers are built)."""

    class MyConv(nn.Conv2d):
        pass

    def __init__(self):
        super().__init__()
        self.twice = nn.Conv2d(2, 2, 3, padding=1, bias=True)
        self.odd = nn.Conv2d(2, 6, (3, 1), stride=(2, 1), padding=(2, 0), dilation=(2, 1), groups=2, bias=False)
        self.sub = self.MyConv(6, 4, 1)
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        x = self.twice(self.twice(x))
        x = self.sub(self.odd(x))
        return self.fc(x.mean((2, 3)))


def test_macs_count_by_hand():
    model = Shared().train()
    x = torch.zeros(3, 2, 6, 5)
    twice = 2 * (2 * 6 * 5 * (2 * 3 * 3) + 2 * 6 * 5)  # called twice: counted twice, bias adds included
    # height: (6 + 2*2 - 2*(3-1) - 1) // 2 + 1 = 3; width 5; 6 outputs of (2/2) * 3*1 weights
    odd = 6 * 3 * 5 * (1 * 3 * 1)
    sub = 4 * 3 * 5 * 6 + 4 * 3 * 5
    fc = 4 * 3
    assert count_macs(model, x) == twice + odd + sub + fc
    assert model.training  # counted in eval mode, mode restored
    assert count_params(model) == (2 * 2 * 9 + 2) + (6 * 1 * 3) + (4 * 6 + 4) + 4 * 3


def test_accuracy_is_the_same_in_any_batch_size_and_leaves_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5)).train()
    x, y = torch.randn(7, 4), torch.randint(0, 5, (7,))
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    ranked = logits.argsort(1, descending=True)
    expected = {k: 100.0 * sum(int(y[i]) in ranked[i, :k].tolist() for i in range(7)) / 7 for k in (1, 2, 5, 10)}
    for batch_size in (1, 2, 3, 512):
        assert accuracy(model, x, y, batch_size=batch_size, topk=(1, 2, 5, 10)) == pytest.approx(expected)
    assert expected[5] == expected[10] == 100.0  # k beyond the number of classes counts every class
    assert model.training


class Recorder(nn.Module):
    """A model that notes the batch it sees and whether it ran in training mode."""

    def __init__(self, tag):
        super().__init__()
        self.tag, self.seen = tag, []

    def forward(self, x):
        self.seen.append((tuple(x.shape), self.training, torch.is_grad_enabled()))
        return x


def scripted_timer(monkeypatch, times):
    """Replace the clock by a script: each timed forward pass runs the model and takes the next time."""
    calls = []
    script = iter(times)

    def timed(model, x):
        model(x)
        calls.append(model.tag)
        return next(script)

    monkeypatch.setattr(metrics, "_timed_forward", timed)
    return calls


def test_latency_is_the_median_of_the_timed_repeats(monkeypatch):
    model = Recorder("m").train()
    calls = scripted_timer(monkeypatch, [5.0, 1.0, 9.0, 3.0, 4.0])
    lat = measure_latency(model, torch.zeros(1, 8), batch_size=4, repeats=5, warmup=2)
    assert lat.median_ms == 4.0 and lat.repeats == 5 and lat.batch_size == 4 and lat.device
    assert len(calls) == 5  # the two warm-up passes are not timed
    assert model.seen == [((4, 8), False, False)] * 7  # the batch size asked for, eval mode, no autograd
    assert model.training


def test_interleaved_latency_alternates_the_two_models(monkeypatch):
    first, second = Recorder("a"), Recorder("b")
    calls = scripted_timer(monkeypatch, [2.0, 20.0, 1.0, 10.0, 3.0, 30.0])
    a, b = measure_latency_pair(first, second, torch.zeros(1, 3), batch_size=2, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]  # A, B, A, B: load hits both alike
    assert (a.median_ms, b.median_ms) == (2.0, 20.0)
    assert first.seen[0] == ((2, 3), False, False) and len(first.seen) == len(second.seen) == 4  # 1 warm-up


def test_cpu_forward_time_is_in_milliseconds():
    class Sleeper(nn.Module):
        def forward(self, x):
            time.sleep(0.03)
            return x

    assert metrics._timed_forward(Sleeper(), torch.zeros(1)) >= 30.0  # a lower bound: load only adds


def test_interleaved_latency_ranks_a_bigger_model_slower():
    small = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    big = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(12)])
    a, b = measure_latency_pair(small, big, torch.zeros(1, 8, 32, 32), batch_size=4, repeats=15)
    assert a.batch_size == b.batch_size == 4 and a.device == b.device
    assert b.median_ms > 2 * a.median_ms
