"""HBGS and HBGTS: greedy hierarchical whole-network filter pruning.

Purohit, Parvathgari, Bhattacharya, "A Greedy Hierarchical Approach to Whole-Network
Filter-Pruning in CNNs", TMLR 2024, arXiv:2409.03777.

Two levels, as in the paper:

* **filter selection** inside one pruning unit (:mod:`.layer`, selectors in
  :mod:`prunebench.criteria._selection`): the filters to drop are those the kept ones rebuild
  best by (ridge) least squares, chosen by simultaneous OMP (the paper's HBGS/HBGTS) or by
  greedy backward elimination with a closed-form error increase (HBGS-B/HBGTS-B). The
  selector runs again on the remaining filters after every move.
* **layer selection** over the whole network (:mod:`.search`): every unit proposes dropping its
  next ``block`` filters and the proposal with the smallest error is applied until the target
  is met. HBGS scores a proposal by the unit's relative output error on the calibration
  images, HBGTS by the relative change of the network's output, with the least-squares
  compensation (:mod:`.compensation`) simulated as the pruned network will have it.

Registered as ``hbgs``, ``hbgs-b``, ``hbgts`` and ``hbgts-b``. See docs/criteria/hbgs.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from prunebench.criteria._selection import SELECTORS
from prunebench.errors import ConfigError, suggest
from prunebench.protocols import AllocateCriterion, CompressionContext

from .search import Search

__all__ = ["HBGS", "HBGSB", "HBGTS", "HBGTSB", "OUTPUTS"]

_REFERENCE = (
    "K. Purohit, A. R. Parvathgari, S. Bhattacharya, 'A Greedy Hierarchical Approach to "
    "Whole-Network Filter-Pruning in CNNs', TMLR 2024, arXiv:2409.03777"
)

#: what HBGTS compares with the unpruned network
OUTPUTS = ("logits", "last_bn")


def _params(default_selector: str):
    @dataclass(frozen=True)
    class Params:
        #: lower-level selector: "omp" (the paper's HBGS/HBGTS) or "backward" (HBGS-B/HBGTS-B)
        selector: str = default_selector
        #: filters a unit proposes to drop per greedy step (the authors' 5)
        block: int = 5
        #: run the selector again on the remaining filters after every move (the authors' code);
        #: false: one drop order per unit with all its filters as targets (see the docs)
        reselect: bool = True
        #: ridge of the least-squares fits, relative to the mean squared filter norm
        ridge: float = 1e-4
        #: fold the dropped filters into the consumers through the least-squares coefficients
        compensation: bool = True
        #: never remove more than this fraction of a unit's filters
        max_layer_ratio: float = 0.9
        #: epochs of fine-tuning after each greedy step, drawn from the ledger (0 = off)
        finetune_epochs_between: float = 0.0
        #: HBGTS only: re-score only the front-runners each step (lazy greedy), see the docs
        lazy: bool = False
        #: HBGTS only: "logits" (the network's output) or "last_bn" (the authors' code)
        output: str = "logits"

        def __post_init__(self) -> None:
            if self.selector not in SELECTORS:
                raise ConfigError(
                    f"unknown hbgs selector {self.selector!r}.{suggest(self.selector, SELECTORS)} "
                    f"Available: {', '.join(sorted(SELECTORS))}"
                )
            if not isinstance(self.reselect, bool):
                raise ConfigError(f"hbgs reselect must be true or false, got {self.reselect!r}")
            if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
                raise ConfigError(f"hbgs block must be an integer >= 1, got {self.block!r}")
            if not self.ridge >= 0:
                raise ConfigError(f"hbgs ridge must be >= 0, got {self.ridge}")
            if not 0.0 < self.max_layer_ratio < 1.0:
                raise ConfigError(f"hbgs max_layer_ratio must lie in (0, 1), got {self.max_layer_ratio}")
            if not self.finetune_epochs_between >= 0:
                raise ConfigError(
                    f"hbgs finetune_epochs_between must be >= 0, got {self.finetune_epochs_between}"
                )
            if self.output not in OUTPUTS:
                raise ConfigError(
                    f"unknown hbgts output {self.output!r}.{suggest(self.output, OUTPUTS)} "
                    f"Available: {', '.join(OUTPUTS)}"
                )

    return Params


class HBGS(AllocateCriterion):
    """Greedy whole-network search, OMP filter selection; a move's error is its layer's
    relative output error in the current network."""

    name = "hbgs"
    needs_data = True
    summary = "greedy whole-network search: OMP filter selection, layer output error (HBGS)"
    reference = _REFERENCE
    #: what a candidate move is scored by: "layer" (HBGS) or "output" (HBGTS)
    objective: ClassVar[str] = "layer"
    Params = _params("omp")

    def allocate(self, model: nn.Module, ctx: CompressionContext) -> dict[str, Tensor]:
        return Search(self.params, self.objective, self.name or type(self).__name__.lower(), model, ctx).run()


class HBGSB(HBGS):
    """HBGS with greedy backward elimination as the filter selector (the paper's HBGS-B)."""

    name = "hbgs-b"
    summary = "greedy whole-network search: backward-elimination filter selection, layer output error (HBGS-B)"
    Params = _params("backward")


class HBGTS(HBGS):
    """Greedy whole-network search, OMP filter selection; a move's error is the relative change
    of the network's output."""

    name = "hbgts"
    summary = "greedy whole-network search: OMP filter selection, network output error (HBGTS)"
    objective = "output"


class HBGTSB(HBGTS):
    """HBGTS with greedy backward elimination as the filter selector (the paper's HBGTS-B)."""

    name = "hbgts-b"
    summary = "greedy whole-network search: backward-elimination filter selection, network output error (HBGTS-B)"
    Params = _params("backward")
