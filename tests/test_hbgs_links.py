"""HBGS / HBGTS ``links.py``: the links of a unit and the cost model against pruned models
counted by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from _hbgs_support import prune_copy
from torch import nn

from prunebench.criteria.hbgs.links import CostModel, unit_links
from prunebench.pipeline.metrics import count_macs


class Mixed(nn.Module):
    """Every kind of link: grouped stem, conv+BN, depthwise, a 3x1 conv, SE linears, a flatten head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1, groups=3, bias=False)  # grouped, not depthwise
        self.conv1 = nn.Conv2d(6, 2, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2)
        self.dw = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(2)
        self.pw = nn.Conv2d(2, 5, (3, 1), padding=(1, 0))
        self.bn3 = nn.BatchNorm2d(5)
        self.fc1 = nn.Linear(5, 2)  # squeeze-excitation on pw's channels
        self.fc2 = nn.Linear(2, 5, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(5 * 4, 3)  # reads 4 columns per channel of pw
        self.aux = nn.Linear(3, 3)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.pw(x)))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        return self.fc(self.pool(x).flatten(1))


MIXED_POSITIONS = {"stem": 64, "conv1": 64, "dw": 64, "pw": 64, "fc1": 1, "fc2": 1, "fc": 1}  # 8x8 input


def mixed_hand_macs(m: nn.Module) -> int:
    """out * in/groups * kh * kw per output position (+1 per position with a bias), summed."""
    total = 0
    for name, positions in MIXED_POSITIONS.items():
        layer = m.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            out, per_out = layer.out_channels, layer.in_channels // layer.groups * kh * kw
        else:
            out, per_out = layer.out_features, layer.in_features
        total += out * positions * per_out + (out * positions if layer.bias is not None else 0)
    return total


def test_links_of_conv_bn_depthwise_and_linear_units() -> None:
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    a = unit_links(graph, model, ("conv1",))
    # the depthwise conv passes the channels on: linked (torch-pruning's depthwise pruner shrinks
    # both of its axes, filed under "in") but no consumer; the conv after it reads them
    assert [c.name for c in a.consumers] == ["pw"] and a.consumers[0].index.tolist() == [[0], [1]]
    assert a.bns == ["bn1", "bn2"] and a.bn is None and a.shortcuts == [] and a.foldable
    assert sorted(a.deps) == sorted(
        [("conv1", "conv", "out", 1.0), ("bn1", "bn", "out", 1.0), ("dw", "conv", "in", 1.0),
         ("bn2", "bn", "out", 1.0), ("pw", "conv", "in", 1.0)]
    )
    b = unit_links(graph, model, ("pw",))
    assert {c.name: c.index.tolist() for c in b.consumers} == {
        "fc1": [[c] for c in range(5)], "fc": torch.arange(20).reshape(5, 4).tolist()
    }
    assert b.bns == ["bn3"] and b.bn == "bn3" and b.shortcuts == []
    assert not b.foldable  # the flatten head reads 4 columns per channel
    assert sorted(b.deps) == sorted(
        [("pw", "conv", "out", 1.0), ("bn3", "bn", "out", 1.0), ("fc1", "linear", "in", 1.0),
         ("fc", "linear", "in", 4.0), ("fc2", "linear", "out", 1.0)]
    )


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_cost_model_equals_pruned_models_counted_by_hand(metric: str) -> None:
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    links = {n: unit_links(graph, model, (n,)) for n in ("conv1", "pw")}
    cost = CostModel(model, x, links, metric)

    def count(k1: int, k2: int) -> int:
        pruned = prune_copy(model, x, {"conv1": torch.arange(2 - k1), "pw": torch.arange(5 - k2)})
        shape = (pruned.dw.groups, pruned.fc2.out_features, pruned.fc.in_features)
        assert shape == (2 - k1, 5 - k2, 4 * (5 - k2))
        return mixed_hand_macs(pruned) if metric == "macs" else sum(p.numel() for p in pruned.parameters())

    assert cost.base == count(0, 0)
    for k1, k2 in [(1, 0), (0, 2), (1, 4), (0, 1)]:
        removed = {"conv1": k1, "pw": k2}
        exact = count(k1, k2)
        assert cost.total(removed) == pytest.approx(exact, rel=1e-12)
        cost.set_state(removed)
        assert cost.current == pytest.approx(exact, rel=1e-12)
        if k2 < 4:
            assert cost.with_move("pw", 1) == pytest.approx(count(k1, k2 + 1), rel=1e-12)
        if k1 < 1:
            assert cost.with_move("conv1", 1) == pytest.approx(count(k1 + 1, k2), rel=1e-12)


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 1, 3, padding=1)
        self.mid = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mid(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_a_unit_losing_every_filter_leaves_only_the_consumers_bias(metric: str) -> None:
    model = Chain().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    cost = CostModel(model, x, {"stem": unit_links(graph, model, ("stem",))}, metric)
    if metric == "macs":  # stem 1*27 weights + 1 bias at 64 positions; mid 1*9 + 1 at 64; fc 2*1 + 2
        assert cost.base == (27 + 1) * 64 + (9 + 1) * 64 + 4
        assert cost.total({"stem": 1}) == 0 + 1 * 64 + 4  # mid, reading nothing, still adds its bias
    else:
        assert cost.base == 28 + 10 + 4
        assert cost.total({"stem": 1}) == 0 + 1 + 4


class BatchTokens(nn.Module):
    """A linear layer over the positions of every image of the batch at once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(2).transpose(1, 2).reshape(1, -1, 2))


def test_cost_model_counts_macs_of_one_image() -> None:
    model = BatchTokens().eval()
    x = torch.randn(4, 3, 8, 8)
    cost = CostModel(model, x, {}, "macs")
    # one image: conv 2*3 at 64 positions, fc (3*2 + 3) at 64 tokens
    assert cost.base == 2 * 3 * 64 + (3 * 2 + 3) * 64 == count_macs(model, x)


def test_residual_group_links_its_shortcut_and_the_pruned_network_matches_the_cost() -> None:
    from prunebench.architectures.cifar_resnet import RESNET20
    from prunebench.graph import build_graph

    model = RESNET20.build().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = build_graph(model, x)
    unit = ("layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2")
    links = unit_links(graph, model, unit)
    # the option-A shortcut of layer2.0 writes the group's channels (its customized pruner);
    # layer3.0's shortcut only reads them, like the convs below
    assert links.shortcuts == ["layer2.0.shortcut"] and not links.foldable
    assert [c.name for c in links.consumers] == ["layer2.1.conv1", "layer2.2.conv1", "layer3.0.conv1"]
    assert links.bns == ["layer2.0.bn2", "layer2.1.bn2", "layer2.2.bn2"]
    pruned = copy.deepcopy(model)
    g2 = build_graph(pruned, x)
    root = pruned.get_submodule(unit[0])
    g2.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(5))).prune()
    pruned(x)
    for metric in ("macs", "params"):
        exact = count_macs(pruned, x) if metric == "macs" else sum(p.numel() for p in pruned.parameters())
        cost = CostModel(model, x, {unit[0]: links}, metric)
        assert cost.total({unit[0]: 5}) == pytest.approx(exact, rel=1e-12)
