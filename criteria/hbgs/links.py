"""What a pruning unit of the search touches: its writers, consumers and cost terms.

A *unit* is a set of convolutions whose output channels the dependency graph removes
together (one conv, or a residual group: the stem and every second conv of a stage). Its
links come from torch-pruning's pruning group of the unit's root (:func:`unit_links`); the
MACs/params guide of the search (:class:`CostModel`) is built from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

from prunebench.pipeline.metrics import forward_once

__all__ = ["Consumer", "CostModel", "Links", "unit_links"]


def _func_id(fn) -> int:
    return id(getattr(fn, "__func__", fn))


_HANDLERS = {
    _func_id(tp.prune_conv_out_channels): ("conv", "out"),
    _func_id(tp.prune_conv_in_channels): ("conv", "in"),
    _func_id(tp.prune_depthwise_conv_out_channels): ("conv", "out"),
    _func_id(tp.prune_depthwise_conv_in_channels): ("conv", "in"),
    _func_id(tp.prune_linear_out_channels): ("linear", "out"),
    _func_id(tp.prune_linear_in_channels): ("linear", "in"),
    _func_id(tp.prune_batchnorm_out_channels): ("bn", "out"),
}


@dataclass
class Consumer:
    """A layer reading a unit's outputs: ``index[c]`` are its input columns of channel c."""

    name: str
    index: Tensor  # [N, r] long


@dataclass
class Links:
    members: tuple[str, ...]  # the unit's convs (they write its channels)
    consumers: list[Consumer]  # convs/linears reading the channels (depthwise readers excluded)
    bns: list[str]  # BatchNorms right after the members
    shortcuts: list[str]  # other modules writing the channels through a customized pruner
    foldable: bool  # a linear fold into the consumers is meaningful (see below)
    deps: list[tuple[str, str, str, float]]  # (module, kind, axis, multiplicity) for the cost model

    @property
    def bn(self) -> str | None:
        """The BatchNorm between a single-member unit and its consumers, if there is one."""
        return self.bns[0] if len(self.bns) == 1 else None


def unit_links(graph: tp.DependencyGraph, model: nn.Module, members: Sequence[str]) -> Links:
    """The links of the unit ``members`` (its root first).

    A unit is *foldable* -- its dropped channels can be rebuilt in the consumers' input
    weights from the kept ones -- when it is a single conv, every consumer reads one column
    per channel and nothing else (a parameter-free shortcut) writes the channels. A residual
    group is not: its channels are sums over several convs and the shortcut path, which no
    weight of a consumer can reproduce.
    """
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    root = modules[members[0]]
    n = root.out_channels
    group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=list(range(n)))
    member_set = set(members)
    consumers: list[Consumer] = []
    bns: list[str] = []
    shortcuts: list[str] = []
    deps: list[tuple[str, str, str, float]] = []
    for dep, idxs in group:
        module = dep.target.module
        if id(module) not in names:
            continue
        mname = names[id(module)]
        kind_axis = _HANDLERS.get(_func_id(dep.handler))
        if kind_axis is None:
            owner = getattr(dep.handler, "__self__", None)
            if getattr(dep.handler, "__name__", "") == "prune_out_channels" and isinstance(owner, tp.pruner.BasePruningFunc):
                shortcuts.append(mname)  # e.g. an option-A shortcut copying into these channels
            continue
        kind, axis = kind_axis
        idx = torch.tensor([int(i) for i in idxs], dtype=torch.long)
        deps.append((mname, kind, axis, idx.numel() / n))
        if axis == "in" and mname not in member_set and idx.numel() % n == 0:
            if kind == "conv" and getattr(module, "groups", 1) != 1:
                continue  # depthwise: not linear in the channel mix
            consumers.append(Consumer(mname, idx.reshape(n, -1)))
        elif kind == "bn" and axis == "out":
            bns.append(mname)
    foldable = (
        len(members) == 1 and not shortcuts and bool(consumers) and all(c.index.shape[1] == 1 for c in consumers)
    )
    return Links(tuple(members), consumers, bns, shortcuts, foldable, deps)


class CostModel:
    """MACs (conv + linear) or params as a function of the filters each unit loses.

    Built from the dependency graph and one forward pass; it only guides the search. The
    final steps are checked with the harness's exact ``ctx.reduction_of``.
    """

    def __init__(self, model: nn.Module, example: Tensor, links: Mapping[str, Links], metric: str):
        self.metric = metric
        spatial: dict[str, int] = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):

                def hook(mod, inp, out, name=name):
                    o = out[0]
                    ch = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
                    spatial[name] = o.numel() // ch

                handles.append(m.register_forward_hook(hook))
        forward_once(model, example, handles)
        self.mods: dict[str, tuple] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name in spatial:
                kk = m.kernel_size[0] * m.kernel_size[1]
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                self.mods[name] = ("conv", m.out_channels, m.in_channels, m.groups, kk, spatial[name],
                                   m.bias is not None, dw)
            elif isinstance(m, nn.Linear) and name in spatial:
                self.mods[name] = ("linear", m.out_features, m.in_features, 1, 1, spatial[name],
                                   m.bias is not None, False)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                self.mods[name] = ("bn", m.num_features, 0, 1, 1, 1, True, False)
        self.links = links
        self.constant = 0.0
        if metric == "params":
            self.constant = sum(p.numel() for p in model.parameters()) - self.total({})
        self.base = self.total({})
        self.set_state({})

    def total(self, removed: Mapping[str, int]) -> float:
        out_rm, in_rm = self._removed_channels(removed)
        return self.constant + sum(self._module(m, out_rm.get(m, 0.0), in_rm.get(m, 0.0)) for m in self.mods)

    def set_state(self, removed: Mapping[str, int]) -> None:
        """Remember the current state so that :meth:`with_move` re-costs only what a move touches."""
        self._out, self._in = self._removed_channels(removed)
        self._cost = {m: self._module(m, self._out.get(m, 0.0), self._in.get(m, 0.0)) for m in self.mods}
        self.current = self.constant + sum(self._cost.values())

    def with_move(self, unit: str, k: int) -> float:
        """Total after ``unit`` loses ``k`` more filters than in the state of :meth:`set_state`."""
        if not k:
            return self.current
        add_out: dict[str, float] = {}
        add_in: dict[str, float] = {}
        for mname, _kind, axis, r in self.links[unit].deps:
            tgt = add_out if axis == "out" else add_in
            tgt[mname] = tgt.get(mname, 0.0) + k * r
        delta = 0.0
        for m in set(add_out) | set(add_in):
            if m in self.mods:
                new = self._module(
                    m, self._out.get(m, 0.0) + add_out.get(m, 0.0), self._in.get(m, 0.0) + add_in.get(m, 0.0)
                )
                delta += new - self._cost[m]
        return self.current + delta

    def _removed_channels(self, removed: Mapping[str, int]) -> tuple[dict[str, float], dict[str, float]]:
        out_rm: dict[str, float] = {}
        in_rm: dict[str, float] = {}
        for unit, k in removed.items():
            if not k:
                continue
            for mname, _kind, axis, r in self.links[unit].deps:
                tgt = out_rm if axis == "out" else in_rm
                tgt[mname] = tgt.get(mname, 0.0) + k * r
        return out_rm, in_rm

    def _module(self, name: str, out_removed: float, in_removed: float) -> float:
        kind, n_o, n_i, g, kk, sp, bias, dw = self.mods[name]
        o = max(n_o - out_removed, 0.0)
        i = max(n_i - in_removed, 0.0)
        if kind == "bn":
            return 2 * o if self.metric == "params" else 0.0
        if dw:
            o = i = min(o, i)
            per_out = kk
        else:
            per_out = (i / g) * kk
        if self.metric == "params":
            return o * per_out + (o if bias else 0.0)
        return o * sp * per_out + (o * sp if bias else 0.0)
