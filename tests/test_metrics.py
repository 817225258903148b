import torch
from torch import nn

from prunebench.metrics import accuracy, count_macs, count_params, measure_latency


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


def test_accuracy_topk():
    logits_model = nn.Identity()
    x = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    y = torch.tensor([1, 1, 0])
    acc = accuracy(logits_model, x, y, topk=(1, 2))
    assert abs(acc[1] - 100 / 3) < 1e-6
    assert abs(acc[2] - 200 / 3) < 1e-6


def test_latency_is_measured():
    lat = measure_latency(nn.Linear(8, 8), torch.zeros(1, 8), batch_size=4, repeats=3, warmup=1)
    assert lat.median_ms > 0 and lat.batch_size == 4 and lat.device


def test_interleaved_latency_ranks_a_bigger_model_slower():
    from prunebench.metrics import measure_latency_pair

    small = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    big = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(12)])
    a, b = measure_latency_pair(small, big, torch.zeros(1, 8, 32, 32), batch_size=4, repeats=15)
    assert a.batch_size == b.batch_size == 4 and a.device == b.device
    assert b.median_ms > 2 * a.median_ms
