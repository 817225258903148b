"""Filter L2 norm: a minimal score-kind criterion living outside prunebench."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from prunebench.protocols import Calibration, ScoreCriterion


class L2Norm(ScoreCriterion):
    summary = "filter L2 norm (example plug-in)"
    reference = "example"

    @dataclass(frozen=True)
    class Params:
        power: float = 2.0  # score = sum |w|^power

    def scores(self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        p = self.params.power
        return {n: modules[n].weight.detach().abs().pow(p).flatten(1).sum(1) for n in layers}
