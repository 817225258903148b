"""trp: Trained Rank Pruning.

Xu, Li, Zhang, Wen, Wang, Qi, Chen, Lin, Xiong, "TRP: Trained Rank Pruning for Efficient
Deep Neural Networks", IJCAI 2020, pp. 977-983.

Low rank is trained into the weights instead of imposed after training. Every trained conv
(``k_h x k_w`` with ``k_h k_w > 1``, ``groups == 1``, not the first conv) is viewed as a
matrix -- ``N x (C k_h k_w)`` for the *channel* scheme, ``(C k_h) x (N k_w)`` for the
*spatial* scheme -- and during training, as in the authors' training loop, every
``period``-th optimiser step (every step by default) is a *projection step*:

* before its forward pass the weight is replaced by its truncated-SVD reconstruction at the
  smallest rank ``r`` holding ``energy`` of the squared singular values;
* after its backward pass the nuclear-norm sub-gradient ``nuclear * U_r V_r^T`` (the
  energy-truncated singular vectors of the weight before the projection) is added to the
  weight's gradient. Other steps are plain steps.

Afterwards :meth:`TRP.transform` splits each trained conv with stride 1 (the authors never
split strided convs) into two convs at the rank reaching the knob's energy: ``k x k C->R``
then ``1x1 R->N`` (channel), or ``k_h x 1 C->R`` then ``1 x k_w R->N`` (spatial). The
training epochs come from the fine-tune ledger.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunebench.errors import ConfigError, suggest
from prunebench.protocols import CompressionContext, Knob, TrainingHooks, TransformCriterion

from ._factorized import (
    Factorized,
    Spectrum,
    SVDCache,
    axis_conv,
    check_energy,
    energy_rank,
    input_sizes,
    keeps_saving,
    low_rank_factors,
    plan_step,
    pointwise_conv,
    select_targets,
    set_module,
    spectrum,
    to_param,
)

__all__ = ["SCHEMES", "TRP", "TRPHooks", "build_trp_conv", "from_matrix", "to_matrix", "trp_conv"]

SCHEMES = ("channel", "spatial")
#: Singular values below this share of the largest count as zero for the nuclear sub-gradient.
_ZERO = 1e-6


def _check_scheme(scheme: Any) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(
            f"trp scheme {scheme!r} is unknown.{suggest(str(scheme), SCHEMES)} "
            f"Available: {', '.join(SCHEMES)}"
        )
    return scheme


def to_matrix(weight: Tensor, scheme: str) -> Tensor:
    """The matrix TRP regularises: ``N x (C k_h k_w)`` (channel) or ``(C k_h) x (N k_w)`` (spatial).

    Works on a single weight ``(N, C, k_h, k_w)`` or a stack ``(B, N, C, k_h, k_w)``.
    """
    *lead, n, c, kh, kw = weight.shape
    if scheme == "channel":
        return weight.reshape(*lead, n, c * kh * kw)
    nl = len(lead)
    perm = [*range(nl), nl + 1, nl + 2, nl, nl + 3]  # (..., C, kh, N, kw)
    return weight.permute(perm).reshape(*lead, c * kh, n * kw)


def from_matrix(matrix: Tensor, shape: Sequence[int], scheme: str) -> Tensor:
    """Inverse of :func:`to_matrix` for a weight of ``shape`` (``(N, C, k_h, k_w)``)."""
    n, c, kh, kw = shape
    lead = matrix.shape[:-2]
    if scheme == "channel":
        return matrix.reshape(*lead, n, c, kh, kw)
    nl = len(lead)
    w = matrix.reshape(*lead, c, kh, n, kw)
    return w.permute([*range(nl), nl + 2, nl, nl + 1, nl + 3])


def build_trp_conv(conv: nn.Conv2d, rank: int, scheme: str) -> Factorized:
    """The two-conv structure (untrained) replacing ``conv`` at ``rank`` for ``scheme``."""
    bias = conv.bias is not None
    if scheme == "channel":
        first = nn.Conv2d(
            conv.in_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        return Factorized(first, pointwise_conv(conv, rank, conv.out_channels, bias=bias))
    _check_scheme(scheme)
    return Factorized(
        axis_conv(conv, 0, conv.in_channels, rank, bias=False),
        axis_conv(conv, 1, rank, conv.out_channels, bias=bias),
    )


def _spectrum(conv: nn.Conv2d, scheme: str, cache: SVDCache | None, name: str) -> Spectrum:
    def compute() -> Spectrum:
        return spectrum(to_matrix(conv.weight.detach(), scheme))

    return cache.get(name, conv.weight, scheme, compute) if cache is not None else compute()


def trp_rank(
    conv: nn.Conv2d, energy: float, scheme: str, cache: SVDCache | None = None, name: str = ""
) -> int:
    """Smallest rank of ``conv``'s ``scheme`` matrix holding ``energy`` of its squared singular values."""
    return energy_rank(_spectrum(conv, scheme, cache, name).values, energy)


def trp_conv(
    conv: nn.Conv2d, energy: float, scheme: str = "channel", cache: SVDCache | None = None, name: str = ""
) -> Factorized:
    """Split ``conv`` into two convs by a truncated SVD of its ``scheme`` matrix at ``energy``.

    At ``energy = 1`` the rank is full and the pair reproduces ``conv`` exactly.
    """
    _check_scheme(scheme)
    if conv.groups != 1:
        raise ValueError("trp needs a conv with groups == 1")
    spec = _spectrum(conv, scheme, cache, name)
    rank = energy_rank(spec.values, energy)
    a, b = low_rank_factors(spec, rank)
    n, c, kh, kw = conv.weight.shape
    new = build_trp_conv(conv, rank, scheme)
    w = conv.weight
    with torch.no_grad():
        if scheme == "channel":  # a: N x R, b: R x (C kh kw)
            new[0].weight.copy_(to_param(b.reshape(rank, c, kh, kw), w))
            new[1].weight.copy_(to_param(a.reshape(n, rank, 1, 1), w))
        else:  # a: (C kh) x R, b: R x (N kw)
            new[0].weight.copy_(to_param(a.reshape(c, kh, rank).permute(2, 0, 1), w)[..., None])
            new[1].weight.copy_(to_param(b.reshape(rank, n, kw).permute(1, 0, 2), w)[:, :, None, :])
        if conv.bias is not None:
            new[1].bias.copy_(conv.bias)
    return new


def _is_spatial_kernel(conv: nn.Conv2d) -> bool:
    return conv.kernel_size[0] * conv.kernel_size[1] > 1


class TRPHooks(TrainingHooks):
    """The training-time part of TRP for a fixed list of convs.

    Call :meth:`project` once before training (the first step is a projection step, as in the
    authors' loop, where the projection opens the step). ``after_step`` counts optimiser steps
    and, after every ``period``-th one, projects each weight onto its energy-rank truncated SVD
    and keeps ``U_r V_r^T`` of the weight it replaced (singular directions below 1e-6 of the
    largest left out); the next ``after_backward`` -- the projection step's -- adds
    ``nuclear * U_r V_r^T`` to the gradient, and no other step gets a sub-gradient. Works in
    float64 from the Gram-matrix spectrum (see :class:`~prunebench.criteria._factorized.Spectrum`),
    batched over convs whose matrices have the same shape. ``ranks`` holds each conv's rank at
    the latest projection.
    """

    def __init__(
        self,
        convs: Mapping[str, nn.Conv2d],
        *,
        energy: float,
        nuclear: float,
        period: int,
        scheme: str,
        min_ranks: Mapping[str, int] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.convs = dict(convs)
        self.min_ranks = dict(min_ranks or {})  # floors under the energy rank (a run's target)
        self.energy = check_energy(energy, "trp energy")
        self.nuclear = float(nuclear)
        self.period = int(period)
        self.scheme = _check_scheme(scheme)
        self.log = log
        self.steps = 0
        self.projections = 0
        self.subgradient_steps = 0
        self.ranks: dict[str, int] = {}
        self._pending: dict[str, Tensor] | None = None  # U_r V_r^T from the latest projection

    def _groups(self) -> list[list[str]]:
        by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, conv in self.convs.items():
            by_shape.setdefault(tuple(conv.weight.shape), []).append(name)
        return list(by_shape.values())

    def _spectra(self) -> list[tuple[list[str], list[Tensor], Spectrum]]:
        """One batched float64 spectrum per group of same-shaped weights."""
        out = []
        for names in self._groups():
            weights = [self.convs[n].weight for n in names]
            out.append(
                (names, weights, spectrum(to_matrix(torch.stack([w.detach() for w in weights]), self.scheme)))
            )
        return out

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or self.nuclear == 0.0:
            return
        for name, sub in pending.items():
            w = self.convs[name].weight
            g = (self.nuclear * sub).to(device=w.device, dtype=w.dtype)
            if w.grad is None:
                w.grad = g.contiguous()
            else:
                w.grad.add_(g)
        self.subgradient_steps += 1

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        self.steps += 1
        if self.steps % self.period == 0:
            self.project()

    @torch.no_grad()
    def project(self) -> dict[str, int]:
        """Replace every weight by its truncated SVD at the energy rank (never below its
        ``min_ranks`` floor); returns the ranks.

        Also prepares the sub-gradient ``U_r V_r^T`` of the replaced weights for the next
        ``after_backward``.
        """
        pending: dict[str, Tensor] = {}
        for names, weights, spec in self._spectra():
            values = spec.values.cpu()
            for i, (name, w) in enumerate(zip(names, weights, strict=True)):
                r = min(max(energy_rank(values[i], self.energy), self.min_ranks.get(name, 0)), len(values[i]))
                basis, mat, s = spec.basis[i, :, :r], spec.matrix[i], spec.values[i, :r]
                # U_r V_r^T, leaving out directions with a (numerically) zero singular value
                inv = torch.where(s > s[:1] * _ZERO, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
                if spec.side == "left":  # U_r U_r^T M and U_r diag(1/s) U_r^T M = U_r V_r^T
                    proj = basis.mT @ mat
                    low, sub = basis @ proj, (basis * inv[None, :]) @ proj
                else:  # M V_r V_r^T and M V_r diag(1/s) V_r^T
                    proj = mat @ basis
                    low, sub = proj @ basis.mT, (proj * inv[None, :]) @ basis.mT
                w.copy_(from_matrix(low, w.shape, self.scheme).to(w.dtype))
                pending[name] = from_matrix(sub, w.shape, self.scheme)
                self.ranks[name] = r
        self._pending = pending
        self.projections += 1
        return dict(self.ranks)

    def on_train_end(self, model: nn.Module) -> None:
        self._pending = None
        if self.log is not None and self.ranks:
            total = sum(min(to_matrix(c.weight, self.scheme).shape) for c in self.convs.values())
            self.log(
                f"trp: {self.steps} steps, {self.projections} projections, {self.subgradient_steps} with the "
                f"nuclear sub-gradient; energy-{self.energy:g} ranks sum to {sum(self.ranks.values())} of "
                f"{total} full ({self.scheme} scheme)"
            )


class TRP(TransformCriterion):
    """Trained Rank Pruning: low-rank-regularised training, then a two-conv split per conv."""

    name: ClassVar[str] = "trp"
    needs_data: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "Trained Rank Pruning: periodic SVD projection + nuclear-norm sub-gradient during "
        "training, then each kxk conv -> two convs at the energy rank"
    )
    reference: ClassVar[str] = (
        "Xu et al., 'TRP: Trained Rank Pruning for Efficient Deep Neural Networks', IJCAI 2020"
    )
    knob: ClassVar[Knob] = Knob("energy", low=0.05, high=1.0, increases_compression=False)

    @dataclass(frozen=True)
    class Params:
        #: Energy threshold of the periodic projection during training; also the transform's
        #: energy when no target is given (the harness bisects it otherwise).
        energy: float = 0.9
        #: Weight lambda of the nuclear-norm sub-gradient added on projection steps.
        nuclear: float = 3e-4
        #: Optimiser steps between two projections (m in the paper; 1 in every command of the
        #: authors' READMEs).
        period: int = 1
        #: "channel": N x (C k_h k_w) matrices; "spatial": (C k_h) x (N k_w).
        scheme: str = "channel"
        #: Share of the ledger's remaining post-baseline epochs spent on TRP training; the rest
        #: fine-tunes the factorised model (0.5 measured best under short budgets: docs/criteria/trp.md).
        train_fraction: float = 0.5
        #: Project during training at the energy whose factorisation meets the run's target
        #: (found by bisection on the model before training) instead of ``energy``. Either way,
        #: under a target no projection goes below the ranks of that factorisation: repeated
        #: projections at a fixed energy shrink the ranks step after step, and would leave only
        #: ranks that remove more than the target asks.
        match_target: bool = False

        def __post_init__(self) -> None:
            check_energy(self.energy, "trp energy")
            _check_scheme(self.scheme)
            if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
                raise ConfigError(
                    f"trp period is a number of optimiser steps and must be an integer >= 1, got {self.period!r}"
                )
            if not (isinstance(self.nuclear, int | float) and self.nuclear >= 0.0):
                raise ConfigError(f"trp nuclear (the nuclear-norm weight) must be >= 0, got {self.nuclear!r}")
            if not (isinstance(self.train_fraction, int | float) and 0.0 <= self.train_fraction <= 1.0):
                raise ConfigError(
                    f"trp train_fraction is a share of the remaining epochs and must lie in [0, 1], "
                    f"got {self.train_fraction!r}"
                )

    def __init__(self, params: Any | None = None, seed: int = 0) -> None:
        super().__init__(params, seed)
        self._cache = SVDCache()

    def training_targets(self, model: nn.Module) -> list[str]:
        """The convs trained towards low rank: every conv with a kernel larger than 1x1 and
        groups == 1, except the first conv (the authors' look-up table)."""
        return select_targets(
            model, include_first=False, include_linear=False, conv_filter=_is_spatial_kernel
        )

    def targets(self, model: nn.Module) -> list[str]:
        """The convs :meth:`transform` splits: the trained ones with stride 1 (the authors'
        decomposition skips strided convs)."""
        return select_targets(
            model, include_first=False, include_linear=False,
            conv_filter=lambda c: _is_spatial_kernel(c) and tuple(c.stride) == (1, 1),
        )

    def training_hooks(self, model: nn.Module, ctx: CompressionContext) -> TRPHooks:
        """Hooks for the training before the transform; the first projection is made here,
        before the first forward pass (the first step is a projection step)."""
        p = self.params
        convs = {n: model.get_submodule(n) for n in self.training_targets(model)}
        log = ctx.log if ctx is not None else None
        energy, floors = p.energy, None
        if ctx is not None:
            needed = self.target_energy(model, ctx)
            floors = {n: trp_rank(c, needed, p.scheme) for n, c in convs.items()}
            if p.match_target:
                energy = needed
            if log is not None:
                log(f"trp: projecting at energy {energy:.4f} during training, never below the ranks of energy "
                    f"{needed:.4f} (whose factorisation meets the target)")
        self.train_energy, self.rank_floors = energy, floors
        hooks = TRPHooks(convs, energy=energy, nuclear=p.nuclear, period=p.period, scheme=p.scheme,
                         min_ranks=floors, log=log)
        hooks.project()
        return hooks

    def target_energy(self, model: nn.Module, ctx: CompressionContext, steps: int = 14) -> float:
        """Largest energy whose factorisation of ``model`` reaches the target reduction."""
        lo, hi = self.knob.low, self.knob.high  # a larger energy compresses less
        for _ in range(steps):
            mid = (lo + hi) / 2
            clone = copy.deepcopy(model)
            self.transform(clone, mid, ctx)
            if ctx.reduction(clone) >= ctx.target.ratio:
                lo = mid
            else:
                hi = mid
        return lo

    def training_epochs(self, ctx: CompressionContext) -> float:
        return max(0.0, self.params.train_fraction * ctx.ledger.remaining)

    def transform(
        self, model: nn.Module, value: float | None = None, ctx: CompressionContext | None = None
    ) -> list[dict[str, Any]]:
        """Split every target conv in place at energy ``value`` (default ``params.energy``).

        Convs whose split would not reduce the target metric are kept unchanged.
        """
        energy = check_energy(self.params.energy if value is None else value, "trp energy")
        scheme = self.params.scheme
        names = self.targets(model)
        sizes = input_sizes(model, names, ctx.example_inputs if ctx is not None else None)
        metric = ctx.target.metric if ctx is not None else "macs"
        steps: list[dict[str, Any]] = []
        for name in names:
            conv = model.get_submodule(name)
            new = trp_conv(conv, energy, scheme, self._cache, name)
            if not keeps_saving(conv, new, metric, sizes.get(name)):
                continue
            set_module(model, name, new)
            steps.append(plan_step(self.name, name, {"scheme": scheme, "rank": new[0].out_channels}))
        return steps

    @classmethod
    def rebuild_module(cls, original: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
        if not isinstance(original, nn.Conv2d) or "rank" not in spec or spec.get("scheme") not in SCHEMES:
            raise ConfigError(
                f"trp cannot rebuild a {type(original).__name__} from plan spec {dict(spec)!r}: "
                "expected a Conv2d and {'scheme': 'channel' | 'spatial', 'rank': R}"
            )
        return build_trp_conv(original, int(spec["rank"]), spec["scheme"])
