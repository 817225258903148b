"""The channel cost model must equal a real prune-and-count, on every CIFAR architecture."""

import copy

import pytest
import torch

from prunebench import registry
from prunebench.costmodel import ChannelCost
from prunebench.metrics import count_macs, count_params
from prunebench.surgery import prune_kept, pruning_units
from prunebench.testing import TINY_PRUNABLE, TinyNet

CIFAR = ["resnet20", "vgg16_bn", "mobilenetv2", "resnet18"]


def check_exact(model, example, prunable, metric, seed=0):
    units = pruning_units(model, example, prunable)
    cost = ChannelCost(model, example, units, metric)
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for u in units:
        k = int(torch.randint(1, u.channels + 1, (1,), generator=g))
        kept[u.root] = torch.randperm(u.channels, generator=g)[:k]
    clone = copy.deepcopy(model)
    prune_kept(clone, example, kept)
    real = count_macs(clone, example) if metric == "macs" else count_params(clone)
    assert cost.value({r: len(k) for r, k in kept.items()}) == pytest.approx(real, rel=1e-9)
    full = count_macs(model, example) if metric == "macs" else count_params(model)
    assert cost.value({}) == pytest.approx(full, rel=1e-9)


@pytest.mark.parametrize("arch_name", CIFAR)
@pytest.mark.parametrize("metric", ["macs", "params"])
def test_cost_model_is_exact(arch_name, metric):
    arch = registry.architectures.get(arch_name)
    model = arch.build(num_classes=10, in_channels=1)
    check_exact(model, torch.zeros(1, 1, 8, 8), arch.prunable(model), metric)


@pytest.mark.parametrize("arch_name", ["resnet20", "resnet18"])
@pytest.mark.parametrize("metric", ["macs", "params"])
def test_cost_model_is_exact_with_residual_units(arch_name, metric):
    arch = registry.architectures.get(arch_name)
    model = arch.build(num_classes=10, in_channels=1)
    check_exact(model, torch.zeros(1, 1, 8, 8), arch.prunable_layers(model, "all"), metric, seed=1)


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_cost_model_with_coupled_and_depthwise_layers(metric):
    model = TinyNet()
    check_exact(model, torch.zeros(1, 3, 8, 8), ["stem.0", *TINY_PRUNABLE], metric, seed=3)
