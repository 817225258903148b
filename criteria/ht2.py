"""ht2: hierarchical Tucker-2 decomposition of convolutions.

Gabor, Zdunek, "Compression of convolutional neural networks using hierarchical Tucker-2
decomposition", Applied Soft Computing 132, 2023.

A ``k_h x k_w`` kernel ``W[T, C, k_h, k_w]`` is permuted to ``(C, k_h, T, k_w)``. A truncated
Tucker-2 decomposition (higher-order SVD) over the input-channel mode and the
output-channel mode gives factors ``U1 (C x R1)``, ``U3 (T x R3)`` and a core
``G (R1, k_h, R3, k_w)``; the core, reshaped to ``(R1 k_h) x (R3 k_w)``, is split again by a
truncated SVD of rank ``R13``. All three ranks come from one energy threshold ``e``: the
smallest rank whose cumulative share of squared singular values reaches ``e``, of the
C-mode unfolding (``R1``), the T-mode unfolding (``R3``) and -- as in the authors' code --
the full kernel's ``(C k_h) x (T k_w)`` reshape (``R13``, at most ``R1 k_h`` and ``R3 k_w``).
The conv becomes four convs::

    1x1 C->R1  ->  k_h x 1 R1->R13 (height stride/padding)  ->  1 x k_w R13->R3 (width)  ->  1x1 R3->T (+bias)

The first conv (the stem), 1x1 convs and linear layers (the classifier included) get a
truncated SVD at the same ``e`` (two layers), as in the authors' code. A layer whose
factorisation would cost at least as much as the layer itself (MACs, or parameters for a
parameter target) is left as it is. Weights only: no data, no training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import tensorly as tl
import torch
from tensorly.base import unfold
from tensorly.tenalg import mode_dot
from torch import nn

from prunebench.errors import ConfigError
from prunebench.protocols import CompressionContext, Knob, TransformCriterion

from ._factorized import (
    Factorized,
    Spectrum,
    SVDCache,
    axis_conv,
    build_svd_conv,
    build_svd_linear,
    check_energy,
    energy_rank,
    first_conv_name,
    input_sizes,
    keeps_saving,
    left_basis,
    low_rank_factors,
    plan_step,
    pointwise_conv,
    select_targets,
    set_module,
    spectrum,
    svd_conv,
    svd_linear,
    to_param,
)

__all__ = ["HT2", "build_tucker2_conv", "ht2_ranks", "tucker2_conv"]


def build_tucker2_conv(conv: nn.Conv2d, r1: int, r13: int, r3: int) -> Factorized:
    """The four-conv structure (untrained) replacing ``conv`` at ranks ``(R1, R13, R3)``."""
    return Factorized(
        pointwise_conv(conv, conv.in_channels, r1, bias=False),
        axis_conv(conv, 0, r1, r13, bias=False),
        axis_conv(conv, 1, r13, r3, bias=False),
        pointwise_conv(conv, r3, conv.out_channels, bias=conv.bias is not None),
    )


def _permuted(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel as a float64 tensor of shape ``(C, k_h, T, k_w)``."""
    return conv.weight.detach().double().permute(1, 2, 0, 3).contiguous()


def _mode_factors(conv: nn.Conv2d, cache: SVDCache | None, name: str) -> dict[str, torch.Tensor]:
    """Left singular vectors/values of the C-mode and T-mode unfoldings of the permuted kernel."""

    def compute() -> dict[str, torch.Tensor]:
        wp = _permuted(conv)
        with tl.backend_context("pytorch", local_threadsafe=True):
            u1, s1 = left_basis(unfold(wp, 0))
            u3, s3 = left_basis(unfold(wp, 2))
        return {"u1": u1, "s1": s1, "u3": u3, "s3": s3}

    return cache.get(name, conv.weight, "modes", compute) if cache is not None else compute()


def _core_spectrum(
    conv: nn.Conv2d, modes: dict[str, torch.Tensor], r1: int, r3: int, cache: SVDCache | None, name: str
) -> Spectrum:
    """Spectrum of the ``(R1 k_h) x (R3 k_w)`` reshape of the core projected on the two bases.

    The projection is cheap and recomputed; only its eigendecomposition is cached.
    """
    with tl.backend_context("pytorch", local_threadsafe=True):
        core = mode_dot(_permuted(conv), modes["u1"][:, :r1].T, 0)
        core = mode_dot(core, modes["u3"][:, :r3].T, 2)  # (R1, kh, R3, kw)
    _, kh, _, kw = core.shape
    matrix = core.reshape(r1 * kh, r3 * kw)

    def compute() -> tuple[str, torch.Tensor, torch.Tensor]:
        spec = spectrum(matrix)
        return spec.side, spec.basis, spec.values

    key = ("core", r1, r3)
    side, basis, values = cache.get(name, conv.weight, key, compute) if cache is not None else compute()
    return Spectrum(matrix, side, basis, values)


def _kernel_values(conv: nn.Conv2d, cache: SVDCache | None, name: str) -> torch.Tensor:
    """Singular values of the full kernel's ``(C k_h) x (T k_w)`` reshape (the R13 spectrum)."""

    def compute() -> torch.Tensor:
        c, kh, t, kw = _permuted(conv).shape
        return spectrum(_permuted(conv).reshape(c * kh, t * kw)).values

    return cache.get(name, conv.weight, "kernel", compute) if cache is not None else compute()


def ht2_ranks(
    conv: nn.Conv2d, energy: float, cache: SVDCache | None = None, name: str = ""
) -> tuple[int, int, int]:
    """``(R1, R13, R3)`` of ``conv`` at energy threshold ``energy``.

    ``R1`` and ``R3`` are the energy ranks of the C-mode and T-mode unfoldings of the permuted
    kernel ``(C, k_h, T, k_w)``; ``R13`` is the energy rank of its ``(C k_h) x (T k_w)`` reshape
    (the authors' ``estimate_ranks``), capped at ``min(R1 k_h, R3 k_w)``, the most the
    projected core can hold.
    """
    modes = _mode_factors(conv, cache, name)
    r1, r3 = energy_rank(modes["s1"], energy), energy_rank(modes["s3"], energy)
    kh, kw = conv.kernel_size
    r13 = min(energy_rank(_kernel_values(conv, cache, name), energy), r1 * kh, r3 * kw)
    return r1, r13, r3


def tucker2_conv(conv: nn.Conv2d, energy: float, cache: SVDCache | None = None, name: str = "") -> Factorized:
    """Hierarchical Tucker-2 factorisation of a ``k_h x k_w`` conv at energy ``energy``.

    At ``energy = 1`` every rank is full and the four convs reproduce ``conv`` exactly (up to
    floating-point rounding).
    """
    if conv.groups != 1:
        raise ValueError("hierarchical Tucker-2 needs a conv with groups == 1")
    modes = _mode_factors(conv, cache, name)
    r1, r13, r3 = ht2_ranks(conv, energy, cache, name)
    core = _core_spectrum(conv, modes, r1, r3, cache, name)
    a, b = low_rank_factors(core, r13)  # a: (R1 kh) x R13, b: R13 x (R3 kw)
    kh, kw = conv.kernel_size
    new = build_tucker2_conv(conv, r1, r13, r3)
    w = conv.weight
    with torch.no_grad():
        new[0].weight.copy_(to_param(modes["u1"][:, :r1].T, w)[:, :, None, None])
        new[1].weight.copy_(to_param(a.reshape(r1, kh, r13).permute(2, 0, 1), w)[..., None])
        new[2].weight.copy_(to_param(b.reshape(r13, r3, kw).permute(1, 0, 2), w)[:, :, None, :])
        new[3].weight.copy_(to_param(modes["u3"][:, :r3], w)[:, :, None, None])
        if conv.bias is not None:
            new[3].bias.copy_(conv.bias)
    return new


class HT2(TransformCriterion):
    """Hierarchical Tucker-2 (convs) and truncated SVD (1x1 convs, linear) at one energy ``e``."""

    name: ClassVar[str] = "ht2"
    needs_data: ClassVar[bool] = False
    summary: ClassVar[str] = (
        "Hierarchical Tucker-2: each kxk conv -> 1x1, kx1, 1xk, 1x1 convs; SVD for the stem, 1x1 "
        "convs and linear layers; ranks from one energy threshold"
    )
    reference: ClassVar[str] = (
        "Gabor, Zdunek, 'Compression of convolutional neural networks using hierarchical "
        "Tucker-2 decomposition', Applied Soft Computing 132, 2023"
    )
    knob: ClassVar[Knob] = Knob("energy", low=0.05, high=1.0, increases_compression=False)
    weights_decide_shapes: ClassVar[bool] = True  # ranks from the weights' spectra at the knob

    @dataclass(frozen=True)
    class Params:
        #: Energy threshold used when no target is given (the harness bisects it otherwise).
        energy: float = 0.8
        #: Also split the model's first conv (the stem) by an SVD, as the authors do.
        include_first: bool = True
        #: Also split linear layers by an SVD.
        include_linear: bool = True
        #: Also split the classifier (the architecture's protected layers; its outputs stay), as
        #: the authors do. Only with ``include_linear``.
        include_classifier: bool = True

        def __post_init__(self) -> None:
            check_energy(self.energy, "ht2 energy")
            for flag in ("include_first", "include_linear", "include_classifier"):
                if not isinstance(getattr(self, flag), bool):
                    raise ConfigError(f"ht2 {flag} must be true or false, got {getattr(self, flag)!r}")

    def __init__(self, params: Any | None = None, seed: int = 0) -> None:
        super().__init__(params, seed)
        self._cache = SVDCache()

    def targets(self, model: nn.Module, ctx: CompressionContext | None = None) -> list[str]:
        """Names of the layers :meth:`transform` considers, in registration order."""
        protected = () if ctx is None or self.params.include_classifier else ctx.protected
        return select_targets(
            model,
            protected,
            include_first=self.params.include_first,
            include_linear=self.params.include_linear,
        )

    def transform(
        self, model: nn.Module, value: float | None = None, ctx: CompressionContext | None = None
    ) -> list[dict[str, Any]]:
        """Factorise every target layer at energy ``value`` (default ``params.energy``) in place.

        Layers whose factorisation would not reduce the target metric are kept unchanged.
        """
        energy = check_energy(self.params.energy if value is None else value, "ht2 energy")
        names = self.targets(model, ctx)
        sizes = input_sizes(model, names, ctx.example_inputs if ctx is not None else None)
        metric = ctx.target.metric if ctx is not None else "macs"
        first = first_conv_name(model)
        steps: list[dict[str, Any]] = []
        for name in names:
            module = model.get_submodule(name)
            new, spec = self._factorise(module, energy, name, first=name == first)
            if not keeps_saving(module, new, metric, sizes.get(name)):
                continue
            set_module(model, name, new)
            steps.append(plan_step(self.name, name, spec))
        return steps

    def _factorise(
        self, module: nn.Module, energy: float, name: str, first: bool = False
    ) -> tuple[Factorized, dict[str, Any]]:
        if isinstance(module, nn.Linear):
            new = svd_linear(module, energy, self._cache, name)
            return new, {"type": "svd", "rank": new[0].out_features}
        if first or module.kernel_size == (1, 1):
            new = svd_conv(module, energy, self._cache, name)
            return new, {"type": "svd", "rank": new[0].out_channels}
        new = tucker2_conv(module, energy, self._cache, name)
        ranks = [new[0].out_channels, new[1].out_channels, new[2].out_channels]
        return new, {"type": "tucker2", "ranks": ranks}

    @classmethod
    def rebuild_module(cls, original: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
        kind = spec.get("type")
        if kind == "svd":
            rank = int(spec["rank"])
            if isinstance(original, nn.Linear):
                return build_svd_linear(original, rank)
            if isinstance(original, nn.Conv2d):
                return build_svd_conv(original, rank)
        elif kind == "tucker2" and isinstance(original, nn.Conv2d):
            r1, r13, r3 = (int(r) for r in spec["ranks"])
            return build_tucker2_conv(original, r1, r13, r3)
        raise ConfigError(
            f"ht2 cannot rebuild a {type(original).__name__} from plan spec {dict(spec)!r}: "
            "expected {'type': 'svd', 'rank': R} for a Linear or a conv, or "
            "{'type': 'tucker2', 'ranks': [R1, R13, R3]} for a conv"
        )
