"""Random control: uniformly random channel scores, seeded (PROTOCOL.md, Controls).

A criterion that cannot beat this at the same target and allocation has not shown that
its scores carry information.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prunebench.protocols import Calibration, ScoreCriterion


class RandomScores(ScoreCriterion):
    name = "random"
    summary = "uniformly random scores, seeded (control)"
    reference = "control (PROTOCOL.md)"
    needs_data = False

    def scores(self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        gen = torch.Generator().manual_seed(self.seed)
        return {name: torch.rand(modules[name].out_channels, generator=gen) for name in layers}
