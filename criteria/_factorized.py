"""Shared helpers of the factorising (transform-kind) criteria.

* :func:`spectrum`, :func:`energy_rank`, :func:`low_rank_factors` -- singular values and
  vectors (float64), the smallest rank whose cumulative share of squared singular values
  reaches an energy threshold, and the balanced two-factor truncation at that rank;
* :func:`svd_linear` / :func:`svd_conv` -- a truncated-SVD split of a ``Linear`` or a
  ``Conv2d`` into two layers (for a conv: ``k x k`` C->R, then 1x1 R->T), and the matching
  shape-only builders used when a compressed model is rebuilt from its plan;
* :func:`select_targets` -- which modules of a model a factorising criterion touches;
* :func:`input_sizes`, :func:`conv_chain_macs` -- the numbers needed to skip a
  factorisation that would cost more than the layer it replaces;
* :func:`set_module` -- put a replacement module in place by dotted name.

Replacements are :class:`Factorized` containers (an ``nn.Sequential`` of plain ``Conv2d`` /
``Linear`` layers), so MAC counters, torch-pruning's DependencyGraph and
``load_state_dict`` all see ordinary layers with parameter names ``0.weight``, ``1.weight``,
``1.bias``...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunebench.errors import ConfigError
from prunebench.pipeline.metrics import forward_once

__all__ = [
    "axis_conv",
    "build_svd_conv",
    "build_svd_conv1x1",
    "build_svd_linear",
    "check_energy",
    "conv_chain_macs",
    "conv_out_size",
    "energy_rank",
    "Factorized",
    "first_conv_name",
    "input_sizes",
    "keeps_saving",
    "left_basis",
    "low_rank_factors",
    "module_cost",
    "plan_step",
    "pointwise_conv",
    "select_targets",
    "set_module",
    "spectrum",
    "Spectrum",
    "svd_conv",
    "svd_conv1x1",
    "svd_linear",
    "SVDCache",
    "to_param",
]


class Factorized(nn.Sequential):
    """A chain of layers that replaces one ``Conv2d`` or ``Linear`` (plain ``nn.Sequential``)."""


# ----------------------------------------------------------------------------- validation


def check_energy(value: float, what: str = "energy") -> float:
    """Energy thresholds are shares of squared singular values kept: they lie in (0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise ConfigError(
            f"{what} is the share of squared singular values kept and must lie in (0, 1], got {value!r}"
        )
    return v


# ----------------------------------------------------------------------------- ranks


def energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(s[:r]**2) >= energy * sum(s**2)`` (singular values sorted).

    ``energy >= 1`` returns the full length (every singular value, zeros included), so a
    factorisation at energy 1 reproduces the layer exactly; the result is at least 1 and
    non-decreasing in ``energy``.
    """
    s = torch.as_tensor(singular_values).detach().to("cpu", torch.float64).reshape(-1)
    n = int(s.numel())
    if n == 0:
        raise ValueError("energy_rank needs at least one singular value")
    if energy >= 1.0:
        return n
    sq = s * s
    total = float(sq.sum())
    if total <= 0.0:
        return 1
    share = torch.cumsum(sq, 0) / total
    # a relative slack so that thresholds hit exactly (e.g. 0.5 of two equal values) count
    r = int(torch.searchsorted(share, torch.tensor([energy - 1e-12], dtype=torch.float64))) + 1
    return max(1, min(r, n))


@dataclass(frozen=True)
class Spectrum:
    """Singular values and one set of singular vectors of a matrix (or a stack of matrices).

    Computed in float64 from the eigendecomposition of the smaller Gram matrix: for an
    ``m x n`` matrix ``M`` with ``m <= n`` the eigenvectors of ``M M^T`` are the left
    singular vectors (``side == "left"``), otherwise those of ``M^T M`` are the right ones.
    Singular values are the square roots of the eigenvalues, sorted in decreasing order.
    This gives the SVD's subspaces and energies at a fraction of a full SVD's cost (the other
    side's vectors are never needed explicitly); singular values far below the largest one
    (relative 1e-8) are not resolved, which energy thresholds never notice.
    """

    matrix: Tensor  # float64, (..., m, n)
    side: str  # "left" | "right"
    basis: Tensor  # (..., m, k) left or (..., n, k) right singular vectors, k = min(m, n)
    values: Tensor  # (..., k) singular values, decreasing


def spectrum(matrix: Tensor) -> Spectrum:
    """The :class:`Spectrum` of ``matrix`` (any leading batch dimensions), on its device."""
    m = matrix.detach().double()
    rows, cols = m.shape[-2:]
    side = "left" if rows <= cols else "right"
    gram = m @ m.mT if side == "left" else m.mT @ m
    gram = (gram + gram.mT) / 2
    eig, vec = torch.linalg.eigh(gram)
    values = eig.flip(-1).clamp_min(0.0).sqrt()
    return Spectrum(m, side, vec.flip(-1), values)


def low_rank_factors(spec: Spectrum, rank: int) -> tuple[Tensor, Tensor]:
    """``A (m x rank)`` and ``B (rank x n)`` with ``A @ B`` the best rank-``rank`` approximation.

    ``A = U_r sqrt(S_r)`` and ``B = sqrt(S_r) V_r^T`` (balanced scale on both factors),
    built by projecting the matrix on the known singular vectors, so no singular value is
    ever divided by; directions with a (numerically) zero singular value keep scale 1.
    At ``rank = min(m, n)`` the product reproduces the matrix up to rounding.
    """
    if spec.matrix.dim() != 2:
        raise ValueError("low_rank_factors takes a single matrix")
    basis = spec.basis[:, :rank]
    root = spec.values[:rank].sqrt()
    scale = torch.where(root > root[0] * 1e-6, root, torch.ones_like(root)) if rank else root
    if spec.side == "left":
        a, b = basis, basis.mT @ spec.matrix  # rows of b: s_i v_i^T
        return a * scale[None, :], b / scale[:, None]
    a, b = spec.matrix @ basis, basis.mT  # columns of a: s_i u_i
    return a / scale[None, :], b * scale[:, None]


def left_basis(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Left singular vectors ``(m x k)`` and singular values ``(k,)`` of a single matrix.

    Through the Gram matrix when ``m <= n``; a tall matrix (rare for weight unfoldings) uses a
    thin SVD, which is cheap there and needs no division by small singular values.
    """
    m = matrix.detach().double()
    if m.shape[0] <= m.shape[1]:
        spec = spectrum(m)
        return spec.basis, spec.values
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u, s


class SVDCache:
    """Remembers decompositions of a layer's weight across repeated transforms.

    The harness bisects a knob by transforming fresh copies of the same model many times;
    the decompositions do not depend on the knob (or only through a few ranks), so each is
    computed once per (layer, weight values, key). A changed weight invalidates the layer's
    entries. Results are kept in host memory (so a GPU run's peak memory is not inflated)
    and handed back on the weight's device; at most ``max_keys`` keys are kept per layer,
    the least recently used dropped first.
    """

    def __init__(self, max_keys: int = 4) -> None:
        self.max_keys = max_keys
        self._entries: dict[str, tuple[Tensor, dict[Hashable, Any]]] = {}

    def get(self, name: str, weight: Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        w = weight.detach().to("cpu")
        entry = self._entries.get(name)
        if (
            entry is None
            or entry[0].shape != w.shape
            or entry[0].dtype != w.dtype
            or not torch.equal(entry[0], w)
        ):
            entry = (w.clone(), {})
            self._entries[name] = entry
        store = entry[1]
        if key in store:
            store[key] = store.pop(key)  # most recently used last
        else:
            while len(store) >= self.max_keys:
                del store[next(iter(store))]
            store[key] = _move(compute(), torch.device("cpu"))
        return _move(store[key], weight.device)

    def clear(self) -> None:
        self._entries.clear()


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Spectrum):
        return Spectrum(
            _move(obj.matrix, device), obj.side, _move(obj.basis, device), _move(obj.values, device)
        )
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return (
            [_move(v, device) for v in obj] if isinstance(obj, list) else tuple(_move(v, device) for v in obj)
        )
    return obj


# ----------------------------------------------------------------------------- module surgery


def set_module(model: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Replace the sub-module at ``dotted_name`` (e.g. ``"layer1.0.conv1"``) by ``new``."""
    if not dotted_name:
        raise ValueError("cannot replace the model itself")
    parent_name, _, child = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise KeyError(f"{type(parent).__name__} has no sub-module {child!r} ({dotted_name})")
    setattr(parent, child, new)


def plan_step(criterion: str, module: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"op": "replace", "module": module, "criterion": criterion, "spec": spec}


def first_conv_name(model: nn.Module) -> str | None:
    """The model's first ``Conv2d`` in registration order (the stem, for usual models)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    return None


def select_targets(
    model: nn.Module,
    protected: Sequence[str] = (),
    *,
    include_first: bool = False,
    include_linear: bool = True,
    conv_filter: Callable[[nn.Conv2d], bool] | None = None,
) -> list[str]:
    """Names of the modules a factorising criterion replaces, in registration order.

    Every ``Conv2d`` with ``groups == 1`` (except the first conv unless ``include_first``;
    ``conv_filter`` may narrow further) and, when ``include_linear``, every ``Linear`` not
    named in ``protected``. Only exact ``nn.Conv2d`` / ``nn.Linear`` instances qualify: a
    subclass may compute something else from its weight (weight standardisation, attention
    projections read by their parent), so it is left alone. Layers already inside a
    :class:`Factorized` block are skipped.
    """
    first = None if include_first else first_conv_name(model)
    protected_set = set(protected)
    inside: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, Factorized):
            inside.update(f"{name}.{sub}" for sub, _ in m.named_modules() if sub)
    out: list[str] = []
    for name, m in model.named_modules():
        if name in inside or not name:
            continue
        if type(m) is nn.Conv2d:
            if m.groups != 1 or name == first:
                continue
            if conv_filter is not None and not conv_filter(m):
                continue
            out.append(name)
        elif type(m) is nn.Linear and include_linear and name not in protected_set:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- cost


def input_sizes(
    model: nn.Module, names: Sequence[str], example_inputs: Tensor | None
) -> dict[str, tuple[int, ...]]:
    """Input shape (batch dimension dropped) seen by each named module on one example.

    Modules not reached by the forward pass are absent from the result.
    """
    if example_inputs is None or not names:
        return {}
    sizes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            if args and isinstance(args[0], Tensor) and _name not in sizes:
                sizes[_name] = tuple(args[0].shape[1:])

        handles.append(mod.register_forward_pre_hook(hook))
    forward_once(model, example_inputs, handles)
    return sizes


def conv_out_size(size: int, kernel: int, stride: int, padding: int | str, dilation: int) -> int:
    if isinstance(padding, str):
        if padding == "same":
            return size
        padding = 0  # "valid"
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_macs(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int, int]:
    pads = (conv.padding, conv.padding) if isinstance(conv.padding, str) else conv.padding
    ho = conv_out_size(h, conv.kernel_size[0], conv.stride[0], pads[0], conv.dilation[0])
    wo = conv_out_size(w, conv.kernel_size[1], conv.stride[1], pads[1], conv.dilation[1])
    per_out = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    n_out = conv.out_channels * ho * wo
    return n_out * per_out + (n_out if conv.bias is not None else 0), ho, wo


def conv_chain_macs(convs: Sequence[nn.Conv2d], h: int, w: int) -> int:
    """Multiply-accumulates (bias adds included) of convs applied one after another."""
    total = 0
    for conv in convs:
        macs, h, w = _conv_macs(conv, h, w)
        total += macs
    return total


def module_cost(module: nn.Module, metric: str, in_shape: tuple[int, ...] | None) -> int:
    """Cost of a ``Conv2d``/``Linear``/:class:`Factorized` for ``metric`` ("macs"/"params").

    MACs of a conv need its input's spatial size; without one (a module the example forward
    did not reach) the parameter count stands in, which ranks the same for 1x1 layers.
    """
    if metric == "params" or in_shape is None:
        return sum(p.numel() for p in module.parameters())
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    if all(isinstance(m, nn.Conv2d) for m in layers):
        return conv_chain_macs(layers, int(in_shape[-2]), int(in_shape[-1]))
    if all(isinstance(m, nn.Linear) for m in layers):
        positions = math.prod(in_shape[:-1]) if len(in_shape) > 1 else 1
        return positions * sum(
            m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in layers
        )
    return sum(p.numel() for p in module.parameters())


def keeps_saving(
    original: nn.Module, replacement: nn.Module, metric: str, in_shape: tuple[int, ...] | None
) -> bool:
    """True when ``replacement`` costs strictly less than ``original`` for ``metric``."""
    return module_cost(replacement, metric, in_shape) < module_cost(original, metric, in_shape)


# ----------------------------------------------------------------------------- SVD splits


def build_svd_linear(linear: nn.Linear, rank: int) -> Factorized:
    """Shapes of a rank-``rank`` split: ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``."""
    dd = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    return Factorized(
        nn.Linear(linear.in_features, rank, bias=False, **dd),
        nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **dd),
    )


def build_svd_conv(conv: nn.Conv2d, rank: int) -> Factorized:
    """Shapes of a rank-``rank`` split of a conv: ``k_h x k_w`` C->rank (the original's stride,
    padding and dilation, no bias) then 1x1 rank->T (the original's bias)."""
    dd = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    return Factorized(
        nn.Conv2d(
            conv.in_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=conv.padding_mode,
            **dd,
        ),
        nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **dd),
    )


#: the 1x1 case of :func:`build_svd_conv`
build_svd_conv1x1 = build_svd_conv


def axis_conv(conv: nn.Conv2d, axis: int, in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    """One axis of ``conv`` as its own conv: ``k_h x 1`` (axis 0) or ``1 x k_w`` (axis 1).

    Kernel size, stride, padding and dilation of that axis are kept, the other axis gets
    size 1, stride 1, no padding; ``padding_mode`` is kept (every PyTorch padding mode pads
    each axis independently, so the split is exact).
    """

    def pick(pair: Any, other: Any) -> Any:
        return (pair[0], other) if axis == 0 else (other, pair[1])

    padding = conv.padding if isinstance(conv.padding, str) else pick(conv.padding, 0)
    return nn.Conv2d(
        in_channels,
        out_channels,
        pick(conv.kernel_size, 1),
        stride=pick(conv.stride, 1),
        padding=padding,
        dilation=pick(conv.dilation, 1),
        bias=bias,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def pointwise_conv(conv: nn.Conv2d, in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    """A 1x1 conv on ``conv``'s device and dtype (no stride, no padding)."""
    return nn.Conv2d(
        in_channels, out_channels, 1, bias=bias, device=conv.weight.device, dtype=conv.weight.dtype
    )


def to_param(factor: Tensor, ref: Tensor) -> Tensor:
    """A float64 factor as a contiguous tensor of ``ref``'s device and dtype."""
    return factor.to(device=ref.device, dtype=ref.dtype).contiguous()


def _svd_factors(
    weight2d: Tensor, energy: float, cache: SVDCache | None, name: str
) -> tuple[Tensor, Tensor, int]:
    def compute() -> Spectrum:
        return spectrum(weight2d)

    spec = cache.get(name, weight2d, "spectrum", compute) if cache is not None else compute()
    rank = energy_rank(spec.values, energy)
    a, b = low_rank_factors(spec, rank)
    return a, b, rank


def svd_linear(linear: nn.Linear, energy: float, cache: SVDCache | None = None, name: str = "") -> Factorized:
    """Truncated SVD ``W ~= (U sqrt S)(sqrt S Vt)`` at the smallest rank reaching ``energy``."""
    a, b, rank = _svd_factors(linear.weight, energy, cache, name)
    new = build_svd_linear(linear, rank)
    with torch.no_grad():
        new[0].weight.copy_(to_param(b, linear.weight))
        new[1].weight.copy_(to_param(a, linear.weight))
        if linear.bias is not None:
            new[1].bias.copy_(linear.bias)
    return new


def svd_conv(conv: nn.Conv2d, energy: float, cache: SVDCache | None = None, name: str = "") -> Factorized:
    """Truncated SVD of a conv's ``T x (C k_h k_w)`` matrix: a ``k_h x k_w`` conv C->R (stride,
    padding, dilation kept) then a 1x1 conv R->T; :func:`svd_linear` for convolutions."""
    if conv.groups != 1:
        raise ValueError("an SVD split needs a conv with groups == 1")
    n, c, kh, kw = conv.weight.shape
    w2 = conv.weight.reshape(n, c * kh * kw)
    a, b, rank = _svd_factors(w2, energy, cache, name)
    new = build_svd_conv(conv, rank)
    with torch.no_grad():
        new[0].weight.copy_(to_param(b, conv.weight).reshape(rank, c, kh, kw))
        new[1].weight.copy_(to_param(a, conv.weight).reshape(n, rank, 1, 1))
        if conv.bias is not None:
            new[1].bias.copy_(conv.bias)
    return new


#: the 1x1 case of :func:`svd_conv`
svd_conv1x1 = svd_conv
