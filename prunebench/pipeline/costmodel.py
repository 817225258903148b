"""MACs and params as a function of how many channels each pruning unit keeps.

Removing output channels of a unit scales, for every conv/linear/BatchNorm layer in its
dependency group, either the layer's output side or its input side by the kept fraction.
Conv and linear MACs are ``out · in/groups · k² · H·W`` (+ bias adds ∝ out), so each
layer's cost is its full cost times the product of the two fractions (depthwise convs
only the output one). That is exact for the layers torch-pruning prunes here, and makes
the target search cheap: no copy, no graph, no forward pass per candidate.

:meth:`ChannelCost.validate` compares the model against a real prune-and-count once; the
harness only uses the cost model when they agree, and always counts the final model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from prunebench.graph import build_graph
from prunebench.pipeline.metrics import layer_macs
from prunebench.pipeline.surgery import Unit, prune_kept

_OUT = {id(f.__func__) for f in (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels,
                                 tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels)}
_IN = {id(f.__func__) for f in (tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels,
                                tp.prune_linear_in_channels, tp.prune_batchnorm_in_channels)}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


class ChannelCost:
    """Exact cost of a model when each unit keeps ``counts[root]`` of its channels."""

    def __init__(self, model: nn.Module, example_inputs: Tensor, units: Sequence[Unit], metric: str) -> None:
        self.metric = metric
        self.units = {u.root: u for u in units}
        modules = dict(model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        graph = build_graph(model, example_inputs)
        out_unit: dict[str, str] = {}
        in_unit: dict[str, str] = {}
        for u in units:
            group = graph.get_pruning_group(modules[u.root], tp.prune_conv_out_channels, idxs=[0])
            for dep, _ in group:
                name = names.get(id(dep.target.module))
                fn = getattr(dep.handler, "__func__", None)
                if name is None or fn is None:
                    continue
                if id(fn) in _OUT:
                    out_unit[name] = u.root
                elif id(fn) in _IN:
                    in_unit[name] = u.root
        # terms: (cost, unit scaling the output side or None, unit scaling the input side or None)
        self.terms: list[tuple[float, str | None, str | None]] = []
        if metric == "macs":
            for name, (w, b) in layer_macs(model, example_inputs).items():
                dw = _is_depthwise(modules[name])
                self.terms.append((w, out_unit.get(name), None if dw else in_unit.get(name)))
                self.terms.append((b, out_unit.get(name), None))
        else:
            for name, m in modules.items():
                for pname, p in m.named_parameters(recurse=False):
                    scales_in = pname == "weight" and isinstance(m, (nn.Conv2d, nn.Linear)) and not _is_depthwise(m)
                    self.terms.append((float(p.numel()), out_unit.get(name), in_unit.get(name) if scales_in else None))
        self.full = sum(c for c, _, _ in self.terms)

    def value(self, counts_kept: Mapping[str, int]) -> float:
        def frac(root: str | None) -> float:
            if root is None or root not in counts_kept:
                return 1.0
            return counts_kept[root] / self.units[root].channels

        return sum(c * frac(o) * frac(i) for c, o, i in self.terms)

    def validate(self, model: nn.Module, example_inputs: Tensor, count) -> bool:
        """Compare with a real prune-and-count of a copy keeping ~70% of every unit."""
        kept = {r: torch.arange(max(1, int(0.7 * u.channels))) for r, u in self.units.items()}
        clone = copy.deepcopy(model)
        prune_kept(clone, example_inputs, kept)
        real = count(clone)
        est = self.value({r: len(k) for r, k in kept.items()})
        return abs(real - est) <= 1e-6 * max(real, 1.0)
