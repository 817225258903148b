"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf: "Pruning Filters for Efficient
ConvNets", ICLR 2017).

Importance of an output channel = sum of absolute weights of its filter. Coupled layers
(torch-pruning groups) have their scores summed by the harness.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from prunebench.protocols import Calibration, ScoreCriterion


class L1(ScoreCriterion):
    name = "l1"
    summary = "filter L1 norm (Li et al., ICLR 2017)"
    reference = "Li et al., Pruning Filters for Efficient ConvNets, ICLR 2017"
    needs_data = False

    def scores(self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        return {name: modules[name].weight.detach().abs().flatten(1).sum(1).cpu() for name in layers}
