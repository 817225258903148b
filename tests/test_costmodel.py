"""The channel cost model must equal a real prune-and-count, on every CIFAR architecture."""

import copy
import itertools

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.pipeline.costmodel import ChannelCost
from prunebench.pipeline.metrics import count_macs, count_params
from prunebench.pipeline.surgery import prune_kept, pruning_units
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


# --- hand counts: the cost model is the closed formula of the kept counts --------------------
class _Chain(nn.Module):
    """A grouped conv, a one-channel bottleneck and a conv reading that single channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.n = nn.Conv2d(4, 1, 1)
        self.w = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.w(self.n(self.g(self.a(x)))).mean((2, 3)))


_CHAIN = ["a", "g", "n", "w"]
_CHAIN_X = torch.zeros(1, 1, 4, 4)


def _chain_by_hand(metric, a, g, n, w):
    """MACs for one 4x4 image (16 positions) or params, when a, g, n, w output channels remain.

    conv MACs = positions * out * in/groups * k^2 (+ positions * out bias adds); g has groups=2.
    """
    if metric == "macs":
        return 16 * 9 * a * 1 + 16 * 9 * g * (a / 2) + 16 * n * g + 16 * n + 16 * 9 * w * n + 3 * w + 3
    return 9 * a * 1 + 9 * g * (a / 2) + n * g + n + 9 * w * n + 3 * w + 3


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_cost_equals_a_hand_count_for_every_kept_count(metric):
    model = _Chain()
    cost = ChannelCost(model, _CHAIN_X, pruning_units(model, _CHAIN_X, _CHAIN), metric)
    assert cost.metric == metric
    assert cost.full == _chain_by_hand(metric, 4, 4, 1, 2) == (2105 if metric == "macs" else 140)
    assert cost.value({}) == cost.full
    # bilinear in the kept fractions, down to an emptied unit: the grouped conv scales with
    # its input (it is not depthwise), and w with its single input channel (neither is it)
    for a, g, n, w in itertools.product(range(5), range(5), range(2), range(3)):
        expected = _chain_by_hand(metric, a, g, n, w)
        assert cost.value({"a": a, "g": g, "n": n, "w": w}) == pytest.approx(expected, rel=1e-12), (a, g, n, w)
    # and a real prune of a grouped input keeping whole groups' worth of channels agrees
    clone = copy.deepcopy(model)
    prune_kept(clone, _CHAIN_X, {"a": torch.arange(2), "w": torch.arange(1)})
    real = count_macs(clone, _CHAIN_X) if metric == "macs" else count_params(clone)
    assert real == _chain_by_hand(metric, 2, 4, 1, 1) == cost.value({"a": 2, "w": 1})


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_validate_counts_a_pruned_copy_and_leaves_the_model_alone(metric):
    model = _Chain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost = ChannelCost(model, _CHAIN_X, pruning_units(model, _CHAIN_X, _CHAIN), metric)
    seen = []

    def count(m):
        seen.append({n: m.get_submodule(n).out_channels for n in _CHAIN})
        return count_macs(m, _CHAIN_X) if metric == "macs" else count_params(m)

    assert cost.validate(model, _CHAIN_X, count) is True
    # one count, of a copy keeping 70% of each unit (rounded down, at least one channel)
    assert seen == [{"a": 2, "g": 2, "n": 1, "w": 1}]
    assert {n: model.get_submodule(n).out_channels for n in _CHAIN} == {"a": 4, "g": 4, "n": 1, "w": 2}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _one_weight():
    return nn.Sequential(nn.Conv2d(1, 1, 1, bias=False))  # one parameter, one channel


@pytest.mark.parametrize(("build", "offset", "agrees"), [
    (_Chain, 0.5e-6, True),  # within one part per million of the real count
    (_Chain, 1.5e-6, False),
    (_Chain, -1.5e-6, False),
    (_one_weight, 0.0, True),
    (_one_weight, 1.5e-6, False),  # relative even for a cost of one parameter
], ids=["chain-0.5ppm", "chain-1.5ppm", "chain-minus-1.5ppm", "one-exact", "one-1.5ppm"])
def test_validate_tolerates_one_part_per_million(build, offset, agrees):
    model = build()
    x = torch.zeros(1, 1, 4, 4)
    prunable = _CHAIN if build is _Chain else ["0"]
    cost = ChannelCost(model, x, pruning_units(model, x, prunable), "params")
    assert cost.validate(model, x, lambda m: count_params(m) * (1.0 + offset)) is agrees
