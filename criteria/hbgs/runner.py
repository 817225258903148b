"""Forwarding a network from any layer on, reusing cached values of the layers before it.

The greedy searches of HBGS/HBGTS evaluate many networks that differ from the current one in
one layer's consumers. :class:`SuffixRunner` traces the working copy once with ``torch.fx``
and, for each start node, caches per calibration chunk the *frontier*: the values computed
before the node and read at or after it. Scoring a candidate then forwards only from its
first edited module; the values a suffix run computes can be kept and adopted as the cached
ones later (:meth:`SuffixRunner.adopt`), when the network it ran is the one applied. Each node's
module and in-place handling are resolved once, not per run. Forward hooks on the working
copy's modules fire as usual (``call_module``
nodes call the module), so per-layer outputs can be collected during a suffix run. Models
that ``torch.fx`` cannot trace fall back to full forward passes (same results, slower).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Tracer
from torch.fx.node import Node, map_arg

from prunebench.errors import ConfigError

__all__ = ["SuffixRunner", "logits_of"]


class _LeafTracer(Tracer):
    """Every module without children is a leaf (custom shortcut modules included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(iter(m.children()), None) is None or super().is_leaf_module(m, qualname)


_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def _is_inplace(node: Node) -> bool:
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCS:
            return True
        nm = getattr(node.target, "__name__", "")
        return nm.endswith("_") and not nm.endswith("__")
    if node.op == "call_method":
        return isinstance(node.target, str) and node.target.endswith("_") and not node.target.endswith("__")
    return False


def logits_of(out) -> Tensor:
    """The logits tensor of a model output (the first element of nested tuples)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise ConfigError(
            "hbgts needs a model whose forward returns a tensor of logits (or a tuple starting with one)"
        )
    return out.float()


class SuffixRunner:
    """Runs ``work`` on each calibration chunk from any node, with cached frontiers.

    ``starts_for`` maps a key to the modules whose edit it stands for; the key's start is the
    first ``call_module`` node of any of them (0 when one is never called as a module).
    ``run_chunk(ci, start, record)`` forwards chunk ``ci`` from ``start`` and returns the
    model output; ``record`` refreshes the chunk's cached values downstream of ``start``.
    """

    def __init__(self, work: nn.Module, chunks: list[Tensor], starts_for: Mapping[str, list[str]]):
        for m in work.modules():
            if hasattr(m, "inplace") and isinstance(m.inplace, bool):
                m.inplace = False
        self.work = work
        self.chunks = chunks
        self.gm: GraphModule | None = None
        try:
            graph = _LeafTracer().trace(work)
            self.gm = GraphModule(work, graph)
        except Exception:  # data-dependent control flow etc.: whole forwards instead
            self.gm = None
        self.start: dict[str, int] = {}
        self.caches: list[dict[Node, Tensor]] = [{} for _ in chunks]
        if self.gm is None:
            self.start = {k: 0 for k in starts_for}
            return
        self.nodes = list(self.gm.graph.nodes)
        pos = {n: i for i, n in enumerate(self.nodes)}
        calls: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and n.target not in calls:
                calls[str(n.target)] = i
        for key, modules in starts_for.items():
            idx = [calls[m] for m in modules if m in calls]
            self.start[key] = min(idx) if idx and len(idx) == len(modules) else 0
        last = {n: max((pos[u] for u in n.users), default=pos[n]) for n in self.nodes}
        self.dies_at: dict[int, list[Node]] = {}
        for n, i in last.items():
            self.dies_at.setdefault(i, []).append(n)
        self.frontier: dict[int, list[Node]] = {}
        for s in set(self.start.values()) | {0}:
            self.frontier[s] = [n for n in self.nodes[:s] if last[n] >= s]
        self.cached = {n for f in self.frontier.values() for n in f}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        # per node, what running it needs, resolved once (the modules, the in-place copies)
        self.steps: list[tuple] = []
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                fn = self.gm.get_submodule(n.target)
            elif n.op == "call_function":
                fn = n.target
            else:
                fn = None
            copy_first = _is_inplace(n) and bool(n.args) and isinstance(n.args[0], Node) and n.args[0] in self.cached
            dead = tuple(d for d in self.dies_at.get(i, ()) if d.op != "placeholder")
            self.steps.append((n, n.op, fn, copy_first, n in self.cached, dead))

    def _fetch_attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    @torch.no_grad()
    def run_chunk(self, ci: int, start: int, record: bool, keep: dict | None = None):
        """The model output on chunk ``ci``, forwarding from node ``start``.

        ``record`` refreshes the chunk's cached values downstream of ``start``; ``keep``, a
        dict, receives those values instead (for :meth:`adopt` later), leaving the cache as it is.
        """
        x = self.chunks[ci]
        if self.gm is None:
            return self.work(x)
        cache = self.caches[ci]
        if record:
            keep = cache
        env: dict[Node, object] = {}
        for j, ph in enumerate(self.placeholders):
            env[ph] = x if j == 0 else (ph.args[0] if ph.args else None)
        for n in self.frontier[start]:
            if n.op != "placeholder":
                env[n] = cache[n]
        out = None
        look = env.__getitem__
        pop = env.pop
        for n, op, fn, copy_first, is_cached, dead in self.steps[start:]:
            if op == "placeholder":
                continue
            if op == "output":
                out = map_arg(n.args[0], look)
                break
            args = map_arg(n.args, look)
            kwargs = map_arg(n.kwargs, look)
            if copy_first:
                args = (args[0].clone(),) + tuple(args[1:])
            if op == "call_module" or op == "call_function":
                v = fn(*args, **kwargs)
            elif op == "call_method":
                v = getattr(args[0], n.target)(*args[1:], **kwargs)
            elif op == "get_attr":
                v = self._fetch_attr(n.target)
            else:  # pragma: no cover - fx has no other node kinds
                raise RuntimeError(f"unexpected fx node {op}")
            env[n] = v
            if is_cached and keep is not None:
                keep[n] = v
            for d in dead:
                pop(d, None)
        return out

    def adopt(self, ci: int, kept: dict) -> None:
        """Make values kept by ``run_chunk(ci, start, record=False, keep=kept)`` the cached ones:
        the same as ``run_chunk(ci, start, record=True)`` when the model has not changed since."""
        self.caches[ci].update(kept)

    def run(self, start: int, record: bool) -> list:
        """The model outputs of every chunk, forwarding from node ``start``."""
        return [self.run_chunk(ci, start, record) for ci in range(len(self.chunks))]
