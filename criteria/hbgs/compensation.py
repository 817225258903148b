"""Compensation and silencing: how the search's drops look in a network.

* :func:`consumer_coefficients` turns a unit's weight-space combination ``T`` (see
  :mod:`.layer`) into the coefficients its consumers apply, rescaled by the BatchNorm between
  the conv and the consumers: a consumer reads ``z = a (y - mu) + beta`` with
  ``a = gamma / sqrt(var + eps)``, so ``y_d ≈ Σ c_dk y_k`` becomes ``z_d ≈ Σ c_dk (a_d / a_k) z_k``
  (plus a constant that is not compensated).
* :class:`WorkingCopy` is a copy of the network in which every unit's current drops are
  simulated without changing shapes: foldable units fold their dropped channels into the
  consumers' input weights and zero those columns; other units (residual groups) silence
  their dropped channels -- zero filters and BatchNorm affine parameters in every member, and
  zero copies through shortcut modules -- so the channel is 0 wherever the pruned network
  would not have it. It is what HBGTS scores and what HBGS takes each layer's input from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .layer import UnitState
from .links import Links

__all__ = ["WorkingCopy", "bn_scale", "consumer_coefficients", "silencer"]


def bn_scale(model: nn.Module, links: Links) -> Tensor | None:
    """``a = gamma / sqrt(var + eps)`` of the BatchNorm after a single-conv unit (float64, CPU)."""
    if links.bn is None:
        return None
    bn = model.get_submodule(links.bn)
    if getattr(bn, "running_var", None) is None:
        return None
    a = 1.0 / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().double().cpu()
    return a


def consumer_coefficients(coeffs: Tensor, removed: Tensor, kept: Tensor, a: Tensor | None) -> Tensor:
    """Coefficients ``[|removed|, |kept|]`` in the consumers' input space (BatchNorm-rescaled)."""
    if a is None or coeffs.numel() == 0:
        return coeffs
    aS, aD = a[kept], a[removed]
    tiny = 1e-12 * float(a.abs().max().clamp_min(1e-30))
    inv = torch.where(aS.abs() > tiny, 1.0 / aS, torch.zeros_like(aS))
    return coeffs * aD[:, None] * inv[None, :]


def silencer(modules: Mapping[str, nn.Module], units: Iterable[tuple[Links, Tensor]]) -> Callable[[], None]:
    """A function zeroing the given dead channels in place: filters, biases and BN affine
    parameters of the writers, and the consumers' input columns (for fine-tuning between steps)."""
    jobs = []
    for links, dead in units:
        if dead.numel() == 0:
            continue
        for m in links.members:
            conv = modules[m]
            jobs.append((conv.weight, 0, dead))
            if conv.bias is not None:
                jobs.append((conv.bias, 0, dead))
        for bn in links.bns:
            if modules[bn].weight is not None:
                jobs += [(modules[bn].weight, 0, dead), (modules[bn].bias, 0, dead)]
        for c in links.consumers:
            jobs.append((modules[c.name].weight, 1, c.index[dead].reshape(-1)))

    def run() -> None:
        with torch.no_grad():
            for param, dim, idx in jobs:
                param.index_fill_(dim, idx.to(param.device), 0.0)

    return run


class WorkingCopy:
    """A copy of ``model`` that shows every unit's drops (and one candidate move) in place.

    ``refresh(names, move)`` rebuilds the named modules from their original values and the
    states of all units that touch them; ``move = (unit, b)`` shows ``b`` more drops of
    ``unit``. Shortcut modules writing a silenced channel get their output channel zeroed by a
    forward hook.
    """

    def __init__(self, model: nn.Module, units: Mapping[str, UnitState], links: Mapping[str, Links],
                 scales: Mapping[str, Tensor | None], compensation: bool) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        self.modules = dict(self.model.named_modules())
        self.units = units
        self.links = links
        self.scales = scales
        self.compensation = compensation
        self.touched: dict[str, list[str]] = {}  # unit -> modules its drops edit
        self.editors: dict[str, list[str]] = {}  # module -> units editing it
        self.base: dict[tuple[str, str], Tensor] = {}
        self.zero_out: dict[str, dict[str, Tensor]] = {}  # shortcut module -> {unit: dead channels}
        for name, L in links.items():
            mods = [c.name for c in L.consumers]
            if not self.folds(name):
                mods += [*L.members, *L.bns, *L.shortcuts]
            self.touched[name] = list(dict.fromkeys(mods))
            for m in self.touched[name]:
                self.editors.setdefault(m, []).append(name)
                module = self.modules[m]
                for attr in ("weight", "bias"):
                    p = getattr(module, attr, None)
                    if isinstance(p, Tensor):
                        self.base[(m, attr)] = p.detach().clone()
        self.hooks = []
        for L in links.values():
            for s in L.shortcuts:
                if s not in self.zero_out:
                    self.zero_out[s] = {}
                    self.hooks.append(self.modules[s].register_forward_hook(self._zero_hook(s)))

    def folds(self, unit: str) -> bool:
        return self.compensation and self.links[unit].foldable

    def _zero_hook(self, name: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> Tensor | None:
            dead = [d for d in self.zero_out[name].values() if d.numel()]
            if not dead:
                return None
            out = output.clone()
            out[:, torch.cat(dead).to(out.device)] = 0
            return out

        return hook

    def starts(self) -> dict[str, list[str]]:
        """For each unit, the modules whose edit it stands for (to place suffix runs)."""
        return dict(self.touched)

    @torch.no_grad()
    def refresh(self, names: Iterable[str], move: tuple[str, int] | None = None) -> None:
        for m in names:
            self._rebuild(m, move)

    def show(self, unit: str, b: int) -> None:
        """Show ``b`` more drops of ``unit`` (``b = 0``: its current state)."""
        self.refresh(self.touched[unit], (unit, b) if b else None)
        for s in self.links[unit].shortcuts:
            self.zero_out[s][unit] = self.units[unit].removed_set(b)

    def _rebuild(self, m: str, move: tuple[str, int] | None) -> None:
        module = self.modules[m]
        weight = self.base.get((m, "weight"))
        w = weight.clone() if weight is not None else None
        bias = self.base.get((m, "bias"))
        bias = bias.clone() if bias is not None else None
        editors = self.editors.get(m, ())
        for u in editors:  # consumer edits first: a fold must not write into silenced rows
            state, links = self.units[u], self.links[u]
            cons = next((c for c in links.consumers if c.name == m), None)
            if cons is None or w is None:
                continue
            b = move[1] if move is not None and move[0] == u else 0
            removed = state.removed_set(b)
            if removed.numel() == 0:
                continue
            if self.folds(u):
                kept = state.kept(b)
                M = state.combination(b)  # [N, |kept|]
                coeffs = consumer_coefficients(M[removed], removed, kept, self.scales.get(u))
                c = coeffs.to(dtype=w.dtype, device=w.device)
                cs, cd = cons.index[kept, 0].to(w.device), cons.index[removed, 0].to(w.device)
                w[:, cs] += torch.einsum("od...,dk->ok...", weight[:, cd], c)
            w[:, cons.index[removed].reshape(-1).to(w.device)] = 0
        for u in editors:  # then the silenced writers' rows
            links = self.links[u]
            if self.folds(u) or (m not in links.members and m not in links.bns):
                continue
            b = move[1] if move is not None and move[0] == u else 0
            removed = self.units[u].removed_set(b)
            if w is not None:
                w[removed.to(w.device)] = 0
            if bias is not None:
                bias[removed.to(bias.device)] = 0
        if w is not None:
            module.weight.copy_(w)
        if bias is not None:
            module.bias.copy_(bias)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
