"""HBGS and HBGTS: greedy hierarchical whole-network filter pruning.

Purohit, Parvathgari, Bhattacharya, "A Greedy Hierarchical Approach to Whole-Network
Filter-Pruning in CNNs", TMLR 2024, arXiv:2409.03777.

Two levels:

* **lower** (per layer, :mod:`prunebench.criteria._selection`): the filters to drop are
  chosen so that the kept ones rebuild all of the layer's filters by (ridge) least squares,
  either by greedy backward elimination with a closed-form error increase or by
  simultaneous OMP. Both give a nested drop order, computed once per layer.
* **upper** (whole network): at every step each prunable layer proposes dropping its next
  ``block`` filters; the proposal with the smallest error is applied, until the MACs (or
  params) target is met. HBGS scores a proposal by the relative reconstruction error of
  that layer's output on the calibration images; HBGTS by the relative change of the
  network's logits on the calibration images, with the least-squares compensation folded
  into the consumers exactly as the final pruned network will have it.

The per-layer widths are the output of the search. See docs/criteria/hbgs.md.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.fx import GraphModule, Tracer
from torch.fx.node import Node, map_arg

from prunebench.compensation import fold_into_consumers
from prunebench.criteria._selection import SELECTORS, filter_gram, ls_coefficients, ridge_value
from prunebench.errors import ConfigError, TargetMissedError, suggest
from prunebench.graph import build_graph
from prunebench.protocols import AllocateCriterion, CompressionContext, TrainingHooks

__all__ = ["HBGS", "HBGTS"]

_REFERENCE = (
    "K. Purohit, A. R. Parvathgari, S. Bhattacharya, 'A Greedy Hierarchical Approach to "
    "Whole-Network Filter-Pruning in CNNs', TMLR 2024, arXiv:2409.03777"
)


class HBGS(AllocateCriterion):
    """Greedy whole-network search; a move's error is its layer's relative output error."""

    name = "hbgs"
    needs_data = True
    summary = "greedy whole-network search: per-layer LS filter selection, layer output error"
    reference = _REFERENCE
    #: what a candidate move is scored by: "layer" (HBGS) or "logits" (HBGTS)
    objective = "layer"

    @dataclass(frozen=True)
    class Params:
        #: lower-level selector: "backward" (closed-form backward elimination) or "omp"
        selector: str = "backward"
        #: filters a layer proposes to drop per greedy step
        block: int = 5
        #: ridge of the least-squares fits, relative to the mean squared filter norm
        ridge: float = 1e-4
        #: fold the dropped filters into the consumers through the LS coefficients
        compensation: bool = True
        #: never remove more than this fraction of a layer's filters
        max_layer_ratio: float = 0.9
        #: epochs of fine-tuning after each greedy step, drawn from the ledger (0 = off)
        finetune_epochs_between: float = 0.0
        #: HBGTS only: re-score only the front-runners each step (lazy greedy), see the docs
        lazy: bool = False

        def __post_init__(self) -> None:
            if self.selector not in SELECTORS:
                raise ConfigError(
                    f"unknown hbgs selector {self.selector!r}.{suggest(self.selector, SELECTORS)} "
                    f"Available: {', '.join(sorted(SELECTORS))}"
                )
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

    def allocate(self, model: nn.Module, ctx: CompressionContext) -> dict[str, Tensor]:
        return _Search(self.params, self.objective, model, ctx).run()


class HBGTS(HBGS):
    """Greedy whole-network search; a move's error is the relative change of the logits."""

    name = "hbgts"
    summary = "greedy whole-network search: per-layer LS filter selection, network output error"
    objective = "logits"


# --------------------------------------------------------------------------------------
# dependency bookkeeping


def _func_id(fn) -> int:
    return id(getattr(fn, "__func__", fn))


_HANDLERS = {
    _func_id(tp.prune_conv_out_channels): ("conv", "out"),
    _func_id(tp.prune_conv_in_channels): ("conv", "in"),
    _func_id(tp.prune_depthwise_conv_out_channels): ("conv", "out"),
    _func_id(tp.prune_depthwise_conv_in_channels): ("conv", "in"),
    _func_id(tp.prune_linear_out_channels): ("linear", "out"),
    _func_id(tp.prune_linear_in_channels): ("linear", "in"),
    _func_id(tp.prune_batchnorm_out_channels): ("bn", "out"),
}


@dataclass
class _Consumer:
    """A layer reading a prunable conv's outputs: ``index[c]`` are its input columns of channel c."""

    name: str
    index: Tensor  # [N, r] long


@dataclass
class _Links:
    consumers: list[_Consumer]
    bn: str | None  # the BatchNorm right after the conv (for the post-BN fold scaling)
    foldable: bool  # compensation possible (every consumer sees one column per channel)
    deps: list[tuple[str, str, str, float]]  # (module, kind, axis, multiplicity) for the cost model


def _links(graph: tp.DependencyGraph, model: nn.Module, conv_name: str, conv: nn.Conv2d) -> _Links:
    names = {id(m): n for n, m in model.named_modules()}
    n = conv.out_channels
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
    consumers: list[_Consumer] = []
    bns: list[str] = []
    deps: list[tuple[str, str, str, float]] = []
    for dep, idxs in group:
        module = dep.target.module
        kind_axis = _HANDLERS.get(_func_id(dep.handler))
        if kind_axis is None or id(module) not in names:
            continue
        kind, axis = kind_axis
        mname = names[id(module)]
        idx = torch.tensor([int(i) for i in idxs], dtype=torch.long)
        deps.append((mname, kind, axis, idx.numel() / n))
        if axis == "in" and module is not conv and idx.numel() % n == 0:
            if kind == "conv" and getattr(module, "groups", 1) != 1:
                continue  # depthwise: not linear in the channel mix
            consumers.append(_Consumer(mname, idx.reshape(n, -1)))
        elif kind == "bn" and axis == "out":
            bns.append(mname)
    foldable = bool(consumers) and all(c.index.shape[1] == 1 for c in consumers)
    return _Links(consumers, bns[0] if len(bns) == 1 else None, foldable, deps)


class _CostModel:
    """MACs (conv + linear) or params as a function of the filters each prunable layer loses.

    Built from the dependency graph and one forward pass; it only guides the search. The
    final steps are checked with the harness's exact ``ctx.reduction_of``.
    """

    def __init__(self, model: nn.Module, example: Tensor, links: Mapping[str, _Links], metric: str):
        self.metric = metric
        spatial: dict[str, int] = {}
        handles = []
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):

                def hook(mod, inp, out, name=name):
                    o = out[0]
                    ch = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
                    spatial[name] = o.numel() // ch

                handles.append(m.register_forward_hook(hook))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example[:1])
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        self.mods: dict[str, tuple] = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and name in spatial:
                kk = m.kernel_size[0] * m.kernel_size[1]
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                self.mods[name] = (
                    "conv",
                    m.out_channels,
                    m.in_channels,
                    m.groups,
                    kk,
                    spatial[name],
                    m.bias is not None,
                    dw,
                )
            elif isinstance(m, nn.Linear) and name in spatial:
                self.mods[name] = (
                    "linear",
                    m.out_features,
                    m.in_features,
                    1,
                    1,
                    spatial[name],
                    m.bias is not None,
                    False,
                )
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                self.mods[name] = ("bn", m.num_features, 0, 1, 1, 1, True, False)
        self.links = links
        self.constant = 0.0
        if metric == "params":
            self.constant = sum(p.numel() for p in model.parameters()) - self.total({})
        self.base = self.total({})
        self.set_state({})

    def total(self, removed: Mapping[str, int]) -> float:
        out_rm, in_rm = self._removed_channels(removed)
        return self.constant + sum(self._module(m, out_rm.get(m, 0.0), in_rm.get(m, 0.0)) for m in self.mods)

    def set_state(self, removed: Mapping[str, int]) -> None:
        """Remember the current state so that :meth:`with_move` re-costs only what a move touches."""
        self._out, self._in = self._removed_channels(removed)
        self._cost = {m: self._module(m, self._out.get(m, 0.0), self._in.get(m, 0.0)) for m in self.mods}
        self.current = self.constant + sum(self._cost.values())

    def with_move(self, layer: str, k: int) -> float:
        """Total after ``layer`` loses ``k`` more filters than in the state of :meth:`set_state`."""
        if not k:
            return self.current
        add_out: dict[str, float] = {}
        add_in: dict[str, float] = {}
        for mname, _kind, axis, r in self.links[layer].deps:
            tgt = add_out if axis == "out" else add_in
            tgt[mname] = tgt.get(mname, 0.0) + k * r
        delta = 0.0
        for m in set(add_out) | set(add_in):
            if m in self.mods:
                new = self._module(
                    m, self._out.get(m, 0.0) + add_out.get(m, 0.0), self._in.get(m, 0.0) + add_in.get(m, 0.0)
                )
                delta += new - self._cost[m]
        return self.current + delta

    def _removed_channels(self, removed: Mapping[str, int]) -> tuple[dict[str, float], dict[str, float]]:
        out_rm: dict[str, float] = {}
        in_rm: dict[str, float] = {}
        for layer, k in removed.items():
            if not k:
                continue
            for mname, _kind, axis, r in self.links[layer].deps:
                tgt = out_rm if axis == "out" else in_rm
                tgt[mname] = tgt.get(mname, 0.0) + k * r
        return out_rm, in_rm

    def _module(self, name: str, out_removed: float, in_removed: float) -> float:
        kind, n_o, n_i, g, kk, sp, bias, dw = self.mods[name]
        o = max(n_o - out_removed, 0.0)
        i = max(n_i - in_removed, 0.0)
        if kind == "bn":
            return 2 * o if self.metric == "params" else 0.0
        if dw:
            o = i = min(o, i)
            per_out = kk
        else:
            per_out = (i / g) * kk
        if self.metric == "params":
            return o * per_out + (o if bias else 0.0)
        return o * sp * per_out + (o * sp if bias else 0.0)


# --------------------------------------------------------------------------------------
# per-layer state


@dataclass
class _Layer:
    name: str
    n_out: int
    n_max: int  # most filters that may ever be removed
    H: Tensor  # filter Gram (float64, N x N) of the weights the current order was built on
    lam: float
    pool: Tensor  # filters the current order ranks (all, or the kept set at the last rebuild)
    order: Tensor  # drop order inside the pool
    removed_before: int = 0  # filters removed before the pool was formed
    dropped: int = 0  # filters of ``order`` dropped since
    K: Tensor | None = None  # output Gram on the calibration data (HBGS)
    cap: int = 1 << 30  # largest block allowed this step (landing on the target)
    _coef: dict[int, Tensor] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return self.removed_before + self.dropped

    def allowance(self) -> int:
        return min(self.n_max - self.removed, self.order.numel() - self.dropped)

    def drop_set(self, b: int = 0) -> Tensor:
        return self.order[: self.dropped + b]

    def kept(self, b: int = 0) -> Tensor:
        mask = torch.zeros(self.n_out, dtype=torch.bool)
        mask[self.pool] = True
        mask[self.drop_set(b)] = False
        return torch.nonzero(mask).reshape(-1)

    def coeffs(self, b: int = 0) -> Tensor:
        """LS coefficients ``[|dropped|, |kept|]`` of the (pool's) dropped filters from the kept ones."""
        key = self.dropped + b
        if key not in self._coef:
            self._coef[key] = ls_coefficients(self.H, self.kept(b), self.drop_set(b), self.lam)
        return self._coef[key]

    def layer_error(self, b: int = 0) -> float:
        """Relative output error ‖Y_T − Ŷ_T‖²/‖Y_T‖² over the pool's filters T."""
        K = self.K
        assert K is not None
        T = self.pool
        denom = float(torch.diagonal(K)[T].sum())
        if denom <= 0:
            return 0.0
        S, D, C = self.kept(b), self.drop_set(b), self.coeffs(b)
        if D.numel() == 0:
            return 0.0
        KDD = torch.diagonal(K)[D].sum()
        cross = (C * K[D][:, S]).sum()
        quad = ((C @ K[S][:, S]) * C).sum()
        return float((KDD - 2 * cross + quad).clamp_min(0.0)) / denom


# --------------------------------------------------------------------------------------
# forwarding from an intermediate layer (HBGTS)


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


class _SuffixRunner:
    """Runs the network from any node, reusing cached values of the nodes before it.

    The working copy is traced once with torch.fx. For each start node the *frontier* (values
    computed before it and read at or after it) is cached per calibration chunk, so scoring a
    move on layer L forwards only from L's first consumer. Untraceable models fall back to
    full forward passes.
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
        if self.gm is None:
            self.start = {k: 0 for k in starts_for}
            self.caches: list[dict[Node, Tensor]] = [{} for _ in chunks]
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
        self.caches = [{} for _ in chunks]

    def module(self, name: str) -> nn.Module:
        return self.work.get_submodule(name)

    def _fetch_attr(self, target: str):
        obj = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    @torch.no_grad()
    def run(self, start: int, record: bool) -> list[Tensor]:
        """Logits per chunk, forwarding from node ``start``; ``record`` refreshes the caches."""
        if self.gm is None:
            return [_logits(self.work(x)) for x in self.chunks]
        outs = []
        for ci, x in enumerate(self.chunks):
            cache = self.caches[ci]
            env: dict[Node, object] = {}
            for j, ph in enumerate(self.placeholders):
                env[ph] = x if j == 0 else (ph.args[0] if ph.args else None)
            for n in self.frontier[start]:
                if n.op != "placeholder":
                    env[n] = cache[n]
            out = None
            look = env.__getitem__
            for i in range(start, len(self.nodes)):
                n = self.nodes[i]
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    out = map_arg(n.args[0], look)
                    break
                args = map_arg(n.args, look)
                kwargs = map_arg(n.kwargs, look)
                if _is_inplace(n) and n.args and isinstance(n.args[0], Node) and n.args[0] in self.cached:
                    args = (args[0].clone(),) + tuple(args[1:])
                if n.op == "call_module":
                    v = self.gm.get_submodule(n.target)(*args, **kwargs)
                elif n.op == "call_function":
                    v = n.target(*args, **kwargs)
                elif n.op == "call_method":
                    v = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "get_attr":
                    v = self._fetch_attr(n.target)
                else:  # pragma: no cover - fx has no other node kinds
                    raise RuntimeError(f"unexpected fx node {n.op}")
                env[n] = v
                if record and n in self.cached:
                    cache[n] = v
                for dead in self.dies_at.get(i, ()):
                    if dead.op != "placeholder":
                        env.pop(dead, None)
            outs.append(_logits(out))
        return outs


def _logits(out) -> Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise ConfigError(
            "hbgts needs a model whose forward returns a tensor of logits (or a tuple starting with one)"
        )
    return out.float()


# --------------------------------------------------------------------------------------
# the search


class _MaskHooks(TrainingHooks):
    """Keeps removed channels dead while fine-tuning between greedy steps."""

    def __init__(self, zero_removed) -> None:
        self.zero_removed = zero_removed

    def after_step(self, model: nn.Module, step: int) -> None:
        self.zero_removed()


class _Search:
    def __init__(self, params: HBGS.Params, objective: str, model: nn.Module, ctx: CompressionContext):
        self.p = params
        self.objective = objective
        self.model = model
        self.ctx = ctx
        self.log = ctx.log
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise ConfigError("hbgs/hbgts need calibration data (the harness passes it when needs_data=True)")
        modules = dict(model.named_modules())
        self.names: list[str] = []
        self.skipped: list[str] = []
        for name in ctx.prunable:
            m = modules.get(name)
            if m is None:
                raise ConfigError(f"prunable layer {name!r} is not in the model.{suggest(name, modules)}")
            if not isinstance(m, nn.Conv2d):
                raise ConfigError(
                    f"hbgs prunes convolutions; prunable layer {name!r} is a {type(m).__name__}"
                )
            if m.groups != 1:
                self.skipped.append(name)  # filters of a grouped conv read different inputs
                continue
            if params.block > m.out_channels:
                raise ConfigError(
                    f"hbgs block={params.block} is larger than layer {name!r}, which has only "
                    f"{m.out_channels} filters; use block <= {m.out_channels}"
                )
            self.names.append(name)
        if not self.names:
            raise ConfigError("hbgs found no prunable (ungrouped) convolution in ctx.prunable")
        was = model.training
        try:
            self.graph = build_graph(model, ctx.example_inputs)
        finally:
            model.train(was)
        self.links = {n: _links(self.graph, model, n, modules[n]) for n in self.names}
        self.cost = _CostModel(model, ctx.example_inputs, self.links, ctx.target.metric)
        self.exact_calls = 0
        self.offset = 0.0
        self.layers: dict[str, _Layer] = {}
        self.finetunes = 0

    # ---- reduction bookkeeping -------------------------------------------------------
    def kept_dict(self, move: tuple[str, int] | None = None) -> dict[str, Tensor]:
        out = {}
        for n, L in self.layers.items():
            out[n] = L.kept(move[1] if move and move[0] == n else 0)
        for n in self.skipped:
            out[n] = torch.arange(self.model.get_submodule(n).out_channels)
        return out

    def exact(self, move: tuple[str, int] | None = None) -> float:
        self.exact_calls += 1
        r = float(self.ctx.reduction_of(self.kept_dict(move)))
        self.offset = r - self._model_reduction(move)
        return r

    def _model_reduction(self, move: tuple[str, int] | None = None) -> float:
        total = self.cost.with_move(*move) if move else self.cost.current
        return 1.0 - (1.0 - self.r0) * total / self.cost.base

    def _sync_cost(self) -> None:
        self.cost.set_state({n: L.removed for n, L in self.layers.items()})

    def predict(self, move: tuple[str, int] | None = None) -> float:
        return self._model_reduction(move) + self.offset

    # ---- building the per-layer state ------------------------------------------------
    def _order(self, H: Tensor, lam: float, pool: Tensor, n_drop: int) -> Tensor:
        drop_order = SELECTORS[self.p.selector][0]
        return drop_order(H, n_drop, lam, pool=pool, targets=pool)

    def build_layers(self) -> None:
        modules = dict(self.model.named_modules())
        old = self.layers
        self.layers = {}
        for name in self.names:
            conv = modules[name]
            n = conv.out_channels
            H = filter_gram(conv.weight)
            lam = ridge_value(H, self.p.ridge)
            n_max = min(int(math.floor(self.p.max_layer_ratio * n + 1e-9)), n - 1)
            if name in old:
                pool = old[name].kept()
                before = n - pool.numel()
            else:
                pool, before = torch.arange(n), 0
            try:
                order = self._order(H, lam, pool, max(min(n_max - before, pool.numel() - 1), 0))
            except ValueError as err:
                raise ConfigError(f"hbgs cannot rank the filters of layer {name!r}: {err}") from None
            self.layers[name] = _Layer(name, n, n_max, H, lam, pool, order, removed_before=before)
        self._sync_cost()
        if self.objective == "layer":
            self._output_grams()
        else:
            self._build_runner()

    @torch.no_grad()
    def _output_grams(self) -> None:
        modules = dict(self.model.named_modules())
        grams = {n: torch.zeros(L.n_out, L.n_out, dtype=torch.float64) for n, L in self.layers.items()}
        handles = []
        for n in self.layers:

            def hook(mod, inp, out, n=n):
                y = out.detach().transpose(0, 1).reshape(out.shape[1], -1).float()
                grams[n] += (y @ y.T).double().cpu()

            handles.append(modules[n].register_forward_hook(hook))
        was = self.model.training
        self.model.eval()
        try:
            for x, _ in self.ctx.calibration.batches():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was)
        for n, L in self.layers.items():
            L.K = grams[n]

    # ---- compensation ----------------------------------------------------------------
    def fold_coeffs(self, L: _Layer, b: int = 0) -> Tensor:
        """Coefficients in the consumers' input space: rescaled by the BatchNorm in between."""
        C = L.coeffs(b)
        bn_name = self.links[L.name].bn
        if bn_name is None or C.numel() == 0:
            return C
        bn = self.model.get_submodule(bn_name)
        a = (
            1.0 / torch.sqrt(bn.running_var.detach().double().cpu() + bn.eps)
            if bn.running_var is not None
            else None
        )
        if a is None:
            return C
        if bn.weight is not None:
            a = a * bn.weight.detach().double().cpu()
        S, D = L.kept(b), L.drop_set(b)
        aS, aD = a[S], a[D]
        tiny = 1e-12 * float(a.abs().max().clamp_min(1e-30))
        inv = torch.where(aS.abs() > tiny, 1.0 / aS, torch.zeros_like(aS))
        return C * aD[:, None] * inv[None, :]

    # ---- HBGTS: the working copy -------------------------------------------------------
    def _build_runner(self) -> None:
        self.work = copy.deepcopy(self.model).eval()
        self.work_modules = dict(self.work.named_modules())
        chunks = [x for x, _ in self.ctx.calibration.batches()]
        touched = {n: self._touched(n) for n in self.layers}
        self.touched = touched
        self.producers: dict[str, list[str]] = {}
        for n, ms in touched.items():
            for m in ms:
                self.producers.setdefault(m, []).append(n)
        self.runner = _SuffixRunner(self.work, chunks, touched)
        self.base: dict[tuple[str, str], Tensor] = {}
        for m in self.producers:
            self.base[(m, "weight")] = self.work_modules[m].weight.detach().clone()
        for n in self.layers:
            if not self.links[n].consumers:  # no linear reader: silence the channel itself
                conv = self.work_modules[n]
                if conv.bias is not None:
                    self.base[(n, "bias")] = conv.bias.detach().clone()
                bn = self.links[n].bn
                if bn is not None and self.work_modules[bn].weight is not None:
                    for attr in ("weight", "bias"):
                        self.base[(bn, attr)] = getattr(self.work_modules[bn], attr).detach().clone()
        out = self.runner.run(0, record=True)
        if not hasattr(self, "z0"):
            self.z0 = [z.detach().clone() for z in out]
            self.z0_norm = float(sum((z * z).sum() for z in self.z0))
        self.cur_err = self._err(out)

    def _touched(self, n: str) -> list[str]:
        cons = [c.name for c in self.links[n].consumers]
        return cons if cons else [n]

    def _err(self, out: list[Tensor]) -> float:
        if self.z0_norm <= 0:
            return 0.0
        return float(sum(((z - z0) ** 2).sum() for z, z0 in zip(out, self.z0, strict=True))) / self.z0_norm

    @torch.no_grad()
    def _write(self, m: str, move: tuple[str, int] | None) -> None:
        """Rebuild module ``m`` of the working copy from its base weights and every producer's state."""
        mod = self.work_modules[m]
        w0 = self.base[(m, "weight")]
        w = w0.clone()
        for n in self.producers[m]:
            L, links = self.layers[n], self.links[n]
            b = move[1] if move is not None and move[0] == n else 0
            D, S = L.drop_set(b), L.kept(b)
            if D.numel() == 0:
                continue
            if not links.consumers:  # m is the conv itself: zero its filters (and BN affine)
                w[D.to(w.device)] = 0
                for key in ((n, "bias"), (links.bn, "weight"), (links.bn, "bias")):
                    if key in self.base:
                        v = self.base[key].clone()
                        v[D.to(v.device)] = 0
                        getattr(self.work_modules[key[0]], key[1]).copy_(v)
                continue
            cons = next(c for c in links.consumers if c.name == m)
            if self.p.compensation and links.foldable:
                C = self.fold_coeffs(L, b).to(dtype=w.dtype, device=w.device)
                cs, cd = cons.index[S, 0].to(w.device), cons.index[D, 0].to(w.device)
                w[:, cs] += torch.einsum("od...,dk->ok...", w0[:, cd], C)
            w[:, cons.index[D].reshape(-1).to(w.device)] = 0
        mod.weight.copy_(w)

    def _set_layer(self, n: str, b: int) -> None:
        for m in self.touched[n]:
            self._write(m, (n, b))

    def logits_error(self, n: str, b: int) -> float:
        self._set_layer(n, b)
        try:
            out = self.runner.run(self.runner.start[n], record=False)
        finally:
            self._set_layer(n, 0)
        return self._err(out)

    # ---- scoring ----------------------------------------------------------------------
    def score(self, n: str, b: int) -> float:
        key = (n, self.layers[n].removed, b)
        if key in self.scores:
            return self.scores[key]
        if self.objective == "layer":
            e = self.layers[n].layer_error(b)
        else:
            e = self.logits_error(n, b)
            self.evaluations += 1
        self.scores[key] = e
        return e

    def best_move(self, proposals: dict[str, int]) -> str:
        if self.objective == "layer" or not self.p.lazy:
            return min(proposals, key=lambda n: (self.score(n, proposals[n]), n))
        # lazy greedy on the error increments: re-score the front-runner until it stays in front
        fresh: dict[str, float] = {}
        while True:
            est = {}
            for n, b in proposals.items():
                if n in fresh:
                    est[n] = fresh[n]
                elif (n, b) in self.stale:
                    est[n] = self.stale[(n, b)]
                else:
                    fresh[n] = est[n] = self.score(n, b) - self.cur_err
                    self.stale[(n, b)] = fresh[n]
            best = min(est, key=lambda n: (est[n], n))
            if best in fresh:
                return best
            fresh[best] = self.score(best, proposals[best]) - self.cur_err
            self.stale[(best, proposals[best])] = fresh[best]

    # ---- applying moves ---------------------------------------------------------------
    def apply(self, n: str, b: int) -> None:
        L = self.layers[n]
        L.dropped += b
        self._sync_cost()
        self.steps += 1
        if self.objective == "logits":
            self._set_layer(n, 0)
            out = self.runner.run(self.runner.start[n], record=True)
            self.cur_err = self._err(out)
            self.scores = {}
            self.stale = {k: v for k, v in self.stale.items() if k[0] != n}
        else:
            self.scores = {k: v for k, v in self.scores.items() if k[0] != n}

    @torch.no_grad()
    def commit(self, zero: bool) -> int:
        """Fold the pending drops into ``model`` (and, for fine-tuning, silence them)."""
        folds = {}
        if self.p.compensation:
            for n, L in self.layers.items():
                if L.dropped and self.links[n].foldable:
                    folds[n] = (L.drop_set(), L.kept(), self.fold_coeffs(L).float())
        edited = (
            fold_into_consumers(self.model, self.ctx.example_inputs, folds, graph=self.graph) if folds else 0
        )
        if zero:
            self._mask_fns()()
        return edited

    def _mask_fns(self):
        """A function zeroing every removed channel: its filter, BN affine and consumer columns."""
        modules = dict(self.model.named_modules())
        jobs = []
        for n, L in self.layers.items():
            keep = torch.zeros(L.n_out, dtype=torch.bool)
            keep[L.kept()] = True
            dead = torch.nonzero(~keep).reshape(-1)
            if dead.numel() == 0:
                continue
            conv = modules[n]
            jobs.append((conv.weight, 0, dead))
            if conv.bias is not None:
                jobs.append((conv.bias, 0, dead))
            bn = self.links[n].bn
            if bn is not None and modules[bn].weight is not None:
                jobs.append((modules[bn].weight, 0, dead))
                jobs.append((modules[bn].bias, 0, dead))
            for c in self.links[n].consumers:
                jobs.append((modules[c.name].weight, 1, c.index[dead].reshape(-1)))

        def run() -> None:
            with torch.no_grad():
                for param, dim, idx in jobs:
                    param.index_fill_(dim, idx.to(param.device), 0.0)

        return run

    def finetune(self) -> bool:
        epochs = self.p.finetune_epochs_between
        if epochs <= 0:
            return False
        if self.ctx.ledger.remaining + 1e-9 < epochs:
            if not self.ledger_note:
                self.log(
                    f"hbgs: the epoch ledger has {self.ctx.ledger.remaining:g} epochs left, fewer than "
                    f"finetune_epochs_between={epochs:g}; no more fine-tuning between steps"
                )
                self.ledger_note = True
            return False
        self.commit(zero=True)
        hooks = _MaskHooks(self._mask_fns())
        self.ctx.train(self.model, epochs, hooks=hooks, purpose="hbgs-finetune")
        self.finetunes += 1
        self.build_layers()
        self.scores, self.stale = {}, {}
        return True

    # ---- main loop --------------------------------------------------------------------
    def run(self) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        ctx, p = self.ctx, self.p
        ratio, tol = ctx.target.ratio, ctx.target.tolerance
        self.steps, self.evaluations, self.ledger_note = 0, 0, False
        self.scores: dict[tuple[str, int, int], float] = {}
        self.stale: dict[tuple[str, int], float] = {}
        self.build_layers()
        self.r0 = 0.0
        self.r0 = self.exact()
        self.offset = 0.0
        # the most any allocation can reach: every layer at its cap
        most = {n: torch.arange(L.n_out - L.n_max) for n, L in self.layers.items()}
        for n in self.skipped:
            most[n] = torch.arange(self.model.get_submodule(n).out_channels)
        self.exact_calls += 1
        r_most = float(ctx.reduction_of(most))
        if r_most < ratio - tol:
            raise TargetMissedError(
                f"{self.objective_name()} cannot reach {ctx.target.metric} reduction {ratio:.3f}: with "
                f"every prunable layer at max_layer_ratio={p.max_layer_ratio:g} the reduction reached "
                f"is {r_most:.4f}"
            )
        # near the target every step is checked with the harness's exact count
        window = max(2 * tol, 0.02)
        r_exact: float | None = self.r0
        last_log = time.perf_counter()
        need_finetune = False
        while True:
            if r_exact is None and self.predict() >= ratio - window:
                r_exact = self.exact()
            r_cur = r_exact if r_exact is not None else self.predict()
            if r_cur >= ratio:
                break
            if need_finetune:
                self.finetune()
                need_finetune = False
            proposals = {}
            for n, L in self.layers.items():
                b = min(p.block, L.allowance(), L.cap)
                while b > 0 and self.predict((n, b)) > ratio + 0.9 * tol:
                    b -= 1
                while b > 1 and self.predict((n, b - 1)) >= ratio:
                    b -= 1  # never remove more than the target needs
                if b > 0:
                    proposals[n] = b
            if not proposals:
                if r_cur >= ratio - tol:
                    break
                if all(L.allowance() == 0 for L in self.layers.values()):
                    raise TargetMissedError(
                        f"{self.objective_name()} stopped at {ctx.target.metric} reduction {r_cur:.4f} "
                        f"(target {ratio:.3f}): every layer is at max_layer_ratio={p.max_layer_ratio:g}"
                    )
                raise TargetMissedError(
                    f"{self.objective_name()} reached {ctx.target.metric} reduction {r_cur:.4f}, but "
                    f"removing any further filter overshoots {ratio:.3f}±{tol:.3f}: the layers are "
                    "too coarse for this tolerance"
                )
            n = self.best_move(proposals)
            b = proposals[n]
            r_new = None
            if self.predict((n, b)) >= ratio - window:
                r_new = self.exact((n, b))
                if r_new > ratio + tol:  # overshoot: this layer offers a smaller block
                    self.layers[n].cap = b - 1
                    continue
            for L in self.layers.values():
                L.cap = 1 << 30
            self.apply(n, b)
            r_exact = r_new
            need_finetune = True
            if self.steps % 25 == 0 or time.perf_counter() - last_log >= 30.0:
                last_log = time.perf_counter()
                self.log(
                    f"{self.objective_name()}: step {self.steps}, "
                    f"{ctx.target.metric} reduction ~{self.predict():.3f} (target {ratio:.3f})"
                )
        edited = self.commit(zero=False)
        kept = self.kept_dict()
        widths = ", ".join(f"{n}:{kept[n].numel()}" for n in self.names)
        self.log(
            f"{self.objective_name()}: {self.steps} steps, {ctx.target.metric} reduction {r_cur:.4f}, "
            f"{self.evaluations} network evaluations, {self.exact_calls} exact reduction checks, "
            f"{self.finetunes} fine-tunes, {edited} consumer layers compensated, "
            f"{time.perf_counter() - t0:.1f}s; widths {widths}"
        )
        return kept

    def objective_name(self) -> str:
        return "hbgs" if self.objective == "layer" else "hbgts"
