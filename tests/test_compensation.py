"""Folding a removed channel into its consumers is exact on a linear path."""

import torch
from torch import nn

from prunebench.pipeline.compensation import fold_into_consumers
from prunebench.pipeline.surgery import prune_kept


def test_fold_duplicate_channel_keeps_output_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1))
    with torch.no_grad():  # channel 5 duplicates channel 1
        model[0].weight[5] = model[0].weight[1]
        model[0].bias[5] = model[0].bias[1]
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    kept = torch.tensor([0, 1, 2, 3, 4])
    coeffs = torch.zeros(1, 5)
    coeffs[0, 1] = 1.0
    edited = fold_into_consumers(model, x[:1], {"0": (torch.tensor([5]), kept, coeffs)})  # builds its own graph
    assert edited == 1
    prune_kept(model, x[:1], {"0": kept})
    assert model[0].out_channels == 5
    assert torch.allclose(model(x), before, atol=1e-5)
