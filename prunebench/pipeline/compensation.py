"""Folding removed channels into the layers that consume them.

When a removed output channel ``r`` of a conv is (approximately) a linear combination of the
kept channels, ``y_r ≈ Σ_k c[r, k] · y_k``, every consumer whose input is linear in ``y``
can absorb it before the channel disappears::

    W_next[:, k] += Σ_r c[r, k] · W_next[:, r]

QSFM uses a one-hot ``c`` (a channel folded into its most similar twin); HBGS uses the
least-squares coefficients of its reconstruction. The fold is exact only when the path
between the two layers is linear; with BatchNorm and ReLU in between (the usual case) it
is a first-order approximation, which is what both papers do.

Consumers are found through torch-pruning's DependencyGraph: every layer that would lose
*input* channels if the conv lost these output channels (plain convs and linear layers;
depthwise convs are not linear in the channel mix and are left untouched).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import Tensor, nn

from prunebench.graph import build_graph

_IN_HANDLERS = {
    id(tp.prune_conv_in_channels.__func__): "conv",
    id(tp.prune_linear_in_channels.__func__): "linear",
}


def _handler_kind(dep) -> str | None:
    fn = getattr(dep.handler, "__func__", None)
    return _IN_HANDLERS.get(id(fn)) if fn is not None else None


def input_consumers(
    graph: tp.DependencyGraph, conv: nn.Module, idxs: list[int]
) -> list[tuple[nn.Module, list[int]]]:
    """Layers that read ``conv``'s output channels ``idxs``, with the matching input indices."""
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs)
    out: list[tuple[nn.Module, list[int]]] = []
    for dep, dep_idxs in group:
        module = dep.target.module
        kind = _handler_kind(dep)
        if kind is None or module is conv:
            continue
        if kind == "conv" and getattr(module, "groups", 1) != 1:
            continue
        out.append((module, [int(i) for i in dep_idxs]))
    return out


def fold_into_consumers(
    model: nn.Module,
    example_inputs: Tensor,
    folds: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    graph: tp.DependencyGraph | None = None,
) -> int:
    """Apply ``W_next[:, kept] += W_next[:, removed] @ coeffs`` for each conv in ``folds``.

    ``folds`` maps a conv's name to ``(removed_idx, kept_idx, coeffs)`` with ``coeffs`` of
    shape ``[len(removed), len(kept)]``. Returns the number of consumer layers edited.
    The model's structure is unchanged; call this before the channels are removed.
    """
    if graph is None:  # tracing needs autograd, so the graph is built outside no_grad
        graph = build_graph(model, example_inputs)
    with torch.no_grad():
        return _fold(model, graph, folds)


def _fold(model: nn.Module, graph: tp.DependencyGraph, folds: Mapping[str, tuple[Tensor, Tensor, Tensor]]) -> int:
    modules = dict(model.named_modules())
    edited = 0
    for name, (removed, kept, coeffs) in folds.items():
        if len(removed) == 0:
            continue
        conv = modules[name]
        removed_l = [int(i) for i in removed]
        kept_l = [int(i) for i in kept]
        cons_removed = input_consumers(graph, conv, removed_l)
        cons_kept = {id(m): idx for m, idx in input_consumers(graph, conv, kept_l)}
        for module, r_idx in cons_removed:
            k_idx = cons_kept.get(id(module))
            if k_idx is None:
                continue
            w = module.weight  # conv: [O, I, kh, kw]; linear: [O, I]
            c = coeffs.to(dtype=w.dtype, device=w.device)
            w_r = w[:, r_idx]  # [O, R, ...]
            delta = torch.einsum("or...,rk->ok...", w_r, c)
            w[:, k_idx] += delta
            edited += 1
    return edited
