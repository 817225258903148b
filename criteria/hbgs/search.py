"""The upper level of the search: which unit loses its next block of filters.

At every step each unit proposes dropping its next ``block`` filters (:mod:`.layer`); the
proposal with the smallest error is applied, until the MACs (or params) target is met.

* ``objective="layer"`` (HBGS): the unit's relative output error ``‖Y_orig − Ŷ‖ / ‖Y_orig‖``,
  where ``Y_orig`` are the unpruned network's conv outputs and ``Ŷ`` the unit's outputs
  *in the current network* (upstream drops included, simulated in a :class:`WorkingCopy`)
  rebuilt from the kept channels. A move changes the inputs of every unit after it, so after
  each move the Gram matrices of those units are refreshed with one suffix forward of the
  working copy and of the unpruned network.
* ``objective="output"`` (HBGTS): the relative change ``‖Z − Z₀‖ / ‖Z₀‖`` of the network's
  logits (``output="logits"``) or of its last BatchNorm's output (``output="last_bn"``, the
  authors' code) with the candidate simulated in the working copy; each candidate costs one
  suffix forward. The forward of the step's best candidate is kept, and applying that move
  adopts its values as the runner's cached ones instead of forwarding again (the working
  copy then shows the same weights, bit for bit, so the numbers are the same).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
from prunebench.errors import ConfigError, TargetMissedError, suggest
from prunebench.graph import build_graph
from prunebench.pipeline.compensation import fold_into_consumers
from prunebench.pipeline.surgery import pruning_units
from prunebench.protocols import CompressionContext, TrainingHooks
from prunebench.training import threads

from .compensation import WorkingCopy, bn_scale, consumer_coefficients, silencer
from .layer import UnitState
from .links import CostModel, Links, unit_links
from .runner import SuffixRunner, logits_of

__all__ = ["Search"]

#: calibration images per chunk of the search: the unit of HBGS's captured outputs and Gram
#: sums and of HBGTS's error sums (bounds the memory of captured outputs)
CHUNK = 32
#: HBGTS forwards up to this many images at once (a multiple of CHUNK, within one calibration
#: batch) and sums its error per CHUNK rows in the same order, so the errors are the same
#: numbers as with CHUNK-image forwards (every layer computes each image on its own); fewer,
#: larger forwards spend less time per image outside the convolutions
FORWARD_CHUNK = 128
#: HBGS keeps the unpruned network's conv outputs in memory up to this size (bytes); above
#: it, they are recomputed by a suffix forward of the unpruned network after every move
REFERENCE_CACHE_BYTES = 3 << 29


class _MaskHooks(TrainingHooks):
    """Keeps removed channels dead while fine-tuning between greedy steps."""

    def __init__(self, zero_removed) -> None:
        self.zero_removed = zero_removed

    def after_step(self, model: nn.Module, step: int) -> None:
        self.zero_removed()


def _flat(out: Tensor) -> Tensor:
    """``[channels, positions]`` float32 view of a conv output."""
    return out.detach().transpose(0, 1).reshape(out.shape[1], -1).float()


class Search:
    #: HBGTS applies a move from the forward that scored it (False: a second forward, as before;
    #: the results are the same, tests compare both)
    _reuse_scoring_forward = True

    def __init__(self, params: Any, objective: str, label: str, model: nn.Module, ctx: CompressionContext):
        self.p = params
        self.objective = objective
        self.label = label
        self.model = model
        self.ctx = ctx
        self.log = ctx.log
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise ConfigError(f"{label} needs calibration data (the harness passes it when needs_data=True)")
        modules = dict(model.named_modules())
        for name in ctx.prunable:
            m = modules.get(name)
            if m is None:
                raise ConfigError(f"prunable layer {name!r} is not in the model.{suggest(name, modules)}")
            if not isinstance(m, nn.Conv2d):
                raise ConfigError(f"{label} prunes convolutions; prunable layer {name!r} is a {type(m).__name__}")
        was = model.training
        try:
            units = pruning_units(model, ctx.example_inputs, list(ctx.prunable))
            self.graph = build_graph(model, ctx.example_inputs)
        finally:
            model.train(was)
        self.members: dict[str, tuple[str, ...]] = {}
        self.skipped: list[str] = []
        for u in units:
            if any(modules[m].groups != 1 for m in u.members):
                self.skipped.append(u.root)  # filters of a grouped conv read different inputs
                continue
            if params.block > u.channels:
                raise ConfigError(
                    f"{label} block={params.block} is larger than layer {u.root!r}, which has only "
                    f"{u.channels} filters; use block <= {u.channels}"
                )
            self.members[u.root] = u.members
        if not self.members:
            raise ConfigError(f"{label} found no prunable (ungrouped) convolution in ctx.prunable")
        self.names = list(self.members)
        self.links: dict[str, Links] = {
            n: unit_links(self.graph, model, members) for n, members in self.members.items()
        }
        self.cost = CostModel(model, ctx.example_inputs, self.links, ctx.target.metric)
        self.original = copy.deepcopy(model).eval()  # the reference: never pruned, never trained
        batches = [x for x, _ in ctx.calibration.batches()]
        self.chunks = [x[i : i + CHUNK] for x in batches for i in range(0, x.shape[0], CHUNK)]
        self.forward_chunks = [x[i : i + FORWARD_CHUNK] for x in batches for i in range(0, x.shape[0], FORWARD_CHUNK)]
        self.exact_calls = 0
        self.offset = 0.0
        self.units: dict[str, UnitState] = {}
        self.finetunes = 0
        self.work: WorkingCopy | None = None

    # ---- reduction bookkeeping -------------------------------------------------------
    def kept_dict(self, move: tuple[str, int] | None = None) -> dict[str, Tensor]:
        out = {}
        for n, U in self.units.items():
            out[n] = U.kept(move[1] if move and move[0] == n else 0)
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
        self.cost.set_state({n: U.removed for n, U in self.units.items()})

    def predict(self, move: tuple[str, int] | None = None) -> float:
        return self._model_reduction(move) + self.offset

    # ---- the units -----------------------------------------------------------------------
    def build_units(self) -> None:
        """Unit states from the model's current weights (the pools of an earlier state kept)."""
        modules = dict(self.model.named_modules())
        old = self.units
        self.units = {}
        drop_order = SELECTORS[self.p.selector][0]
        for name, members in self.members.items():
            H = sum(filter_gram(modules[m].weight) for m in members)
            n = modules[name].out_channels
            n_max = min(int(math.floor(self.p.max_layer_ratio * n + 1e-9)), n - 1)
            pool = old[name].pool if name in old else None
            try:
                self.units[name] = UnitState(
                    name, members, n, n_max, H, ridge_value(H, self.p.ridge),
                    fold=self.p.compensation and self.links[name].foldable, drop_order=drop_order,
                    reselect=self.p.reselect, pool=pool,
                )
            except ValueError as err:
                raise ConfigError(f"{self.label} cannot rank the filters of layer {name!r}: {err}") from None
        self._sync_cost()
        self.scales = {n: bn_scale(self.model, L) for n, L in self.links.items()}
        self._build_runtime()

    def _build_runtime(self) -> None:
        if self.work is not None:
            self.work.close()
        self.work = WorkingCopy(self.model, self.units, self.links, self.scales, self.p.compensation)
        for n in self.units:
            self.work.show(n, 0)
        starts = self.work.starts()
        chunks = self.chunks if self.objective == "layer" else self.forward_chunks
        self.runner = SuffixRunner(self.work.model, chunks, starts)
        self.start = self.runner.start
        # HBGTS's logits of the forward chunks, forwarded by workers of one thread each where cores are free
        self.workers = threads.free_workers(len(chunks)) if self.objective == "output" else 1
        self.pending = None
        if self.objective == "layer":
            self.reference = SuffixRunner(copy.deepcopy(self.original), self.chunks, starts)
            self._init_grams()
        else:
            self._init_output()

    # ---- HBGS: Gram matrices of the units' conv outputs ------------------------------------
    def _hooks(self, model: nn.Module, fn) -> list:
        handles = []
        for members in self.members.values():
            for m in members:
                handles.append(model.get_submodule(m).register_forward_hook(
                    lambda mod, inp, out, m=m: fn(m, out)))
        return handles

    @torch.no_grad()
    def _init_grams(self) -> None:
        self.A = {m: 0.0 for ms in self.members.values() for m in ms}
        cache: list[dict[str, Tensor]] | None = [{} for _ in self.chunks]
        size = 0
        ci = 0

        def grab(m: str, out: Tensor) -> None:
            nonlocal cache, size
            y = _flat(out)
            self.A[m] = self.A[m] + (y @ y.T).double().cpu()
            if cache is not None:
                size += y.numel() * y.element_size()
                if size > REFERENCE_CACHE_BYTES:
                    cache = None  # too large: recompute after every move instead
                else:
                    cache[ci][m] = y

        handles = self._hooks(self.reference.work, grab)
        try:
            for ci in range(len(self.chunks)):
                self.reference.run_chunk(ci, 0, record=True)
        finally:
            for h in handles:
                h.remove()
        self.reference_outputs = cache
        self.Bm: dict[str, Tensor] = {}
        self.Cm: dict[str, Tensor] = {}
        self._refresh_grams(0, record=True)
        for n, U in self.units.items():
            U.A = sum(self.A[m] for m in self.members[n])

    @torch.no_grad()
    def _refresh_grams(self, start: int, record: bool = True) -> None:
        """Recompute ``Y_cur^T Y_orig`` and ``Y_cur^T Y_cur`` of every member run after ``start``."""
        newB: dict[str, Tensor] = {}
        newC: dict[str, Tensor] = {}
        ref_out: dict[str, Tensor] = {}

        def grab_ref(m: str, out: Tensor) -> None:
            ref_out[m] = _flat(out)

        def grab_cur(m: str, out: Tensor) -> None:
            yc, yo = _flat(out), ref_out[m]
            newB[m] = newB.get(m, 0.0) + (yc @ yo.T).double().cpu()
            newC[m] = newC.get(m, 0.0) + (yc @ yc.T).double().cpu()

        cached = self.reference_outputs
        ref_handles = [] if cached is not None else self._hooks(self.reference.work, grab_ref)
        cur_handles = self._hooks(self.work.model, grab_cur)
        try:
            for ci in range(len(self.chunks)):
                ref_out.clear()
                if cached is not None:
                    ref_out.update(cached[ci])
                else:
                    self.reference.run_chunk(ci, start, record=False)
                self.runner.run_chunk(ci, start, record=record)
        finally:
            for h in ref_handles + cur_handles:
                h.remove()
        ref_out.clear()
        self.Bm.update(newB)
        self.Cm.update(newC)
        for n, U in self.units.items():
            if any(m in newB for m in self.members[n]):
                U.B = sum(self.Bm[m] for m in self.members[n])
                U.C = sum(self.Cm[m] for m in self.members[n])

    # ---- HBGTS: the output error -----------------------------------------------------------
    def _output_module(self) -> str | None:
        if self.p.output == "logits":
            return None
        order: list[str] = []
        handles = [
            m.register_forward_hook(lambda mod, inp, out, n=n: order.append(n))
            for n, m in self.original.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        try:
            with torch.no_grad():
                self.original(self.chunks[0][:1])
        finally:
            for h in handles:
                h.remove()
        if not order:
            raise ConfigError(f"{self.label} output='last_bn' needs a model with a BatchNorm layer")
        return order[-1]

    def _outputs(self, start: int, record: bool, keep: list[dict] | None = None) -> list[Tensor]:
        """The compared output of every chunk, forwarding from node ``start``.

        A captured module that runs before ``start`` keeps its last recorded value (a move
        whose edits all follow the last BatchNorm does not change its output). ``keep``, one
        dict per chunk, receives the values the run would record (see :meth:`apply`).
        """
        chunks = range(len(self.runner.chunks))
        if self.capture is None:  # chunks apart: each computes alone, so workers change no number
            return threads.in_workers(
                lambda ci: logits_of(self.runner.run_chunk(ci, start, record, None if keep is None else keep[ci])),
                chunks, self.workers)
        got: list[Tensor | None] = []
        h = self.work.model.get_submodule(self.capture).register_forward_hook(
            lambda mod, inp, out: got.__setitem__(-1, out.detach().clone().float()))
        try:
            for ci in chunks:
                got.append(None)
                self.runner.run_chunk(ci, start, record, None if keep is None else keep[ci])
        finally:
            h.remove()
        out = [g if g is not None else self.captured[ci] for ci, g in enumerate(got)]
        if record:
            self.captured = out
        return out

    @torch.no_grad()
    def _init_output(self) -> None:
        self.capture = self._output_module()
        if not hasattr(self, "z0"):
            if self.capture is None:
                self.z0 = [logits_of(self.original(x)) for x in self.chunks]
            else:
                got: list[Tensor] = []
                h = self.original.get_submodule(self.capture).register_forward_hook(
                    lambda mod, inp, out: got.append(out.detach().clone().float()))
                try:
                    for x in self.chunks:
                        self.original(x)
                finally:
                    h.remove()
                self.z0 = got
            self.z0_norm = float(sum((z * z).sum() for z in self.z0))
        self.cur_err = self._err(self._outputs(0, record=True))

    def _err(self, out: list[Tensor]) -> float:
        """``‖Z − Z₀‖² / ‖Z₀‖²``: the square of the authors' relative norm. It ranks candidates the
        same way, and the lazy greedy's increments are those of the squared error. ``out`` holds
        one output per forward chunk; the squares are summed per ``CHUNK`` rows, in order."""
        if self.z0_norm <= 0:
            return 0.0
        rows = (o[i : i + CHUNK] for o in out for i in range(0, o.shape[0], CHUNK))
        sq = float(sum(((z - z0) ** 2).sum() for z, z0 in zip(rows, self.z0, strict=True)))
        return sq / self.z0_norm

    def output_error(self, n: str, b: int) -> float:
        """The error with ``b`` more drops of ``n``. The values its suffix forward computed are
        kept while it is the best candidate of the step (:meth:`_keep_best`): applying that move
        then needs no second forward."""
        keep: list[dict] = [{} for _ in self.runner.chunks]
        self.work.show(n, b)
        try:
            out = self._outputs(self.start[n], record=False, keep=keep)
        finally:
            self.work.show(n, 0)
        e = self._err(out)
        self._keep_best(n, b, e, keep, out)
        return e

    def _keep_best(self, n: str, b: int, e: float, keep: list[dict], out: list[Tensor]) -> None:
        """Hold the forward of the step's best candidate so far, ordered as :meth:`best_move`
        orders them (the lazy greedy compares ``e - cur_err``, which can tie where ``e`` does not)."""
        rank = (e - self.cur_err, n) if self.p.lazy else (e, n)
        if self.pending is None or rank < self.pending[0]:
            self.pending = (rank, (n, self.units[n].removed, b), e, keep, out)

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, n: str, b: int) -> float:
        key = (n, self.units[n].removed, b)
        if key in self.scores:
            return self.scores[key]
        if self.objective == "layer":
            e = self.units[n].layer_error(b)
        else:
            e = self.output_error(n, b)
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

    # ---- applying moves ---------------------------------------------------------------------
    def apply(self, n: str, b: int) -> None:
        """Apply ``b`` more drops of ``n``. HBGTS: when the move is the candidate whose forward
        :meth:`output_error` kept, its values become the cached ones and its error the current
        one; the working copy now shows exactly what that candidate showed (the same weights,
        bit for bit), so a second forward would compute the same numbers."""
        pending, self.pending = self.pending, None
        key = (n, self.units[n].removed, b)
        self.units[n].apply(b)  # drops the block, then re-runs the selector on the rest
        self._sync_cost()
        self.steps += 1
        self.work.show(n, 0)
        self.scores = {}
        if self.objective == "layer":
            self._refresh_grams(self.start[n])
        else:
            if pending is not None and pending[1] == key and self._reuse_scoring_forward:
                _, _, e, keep, out = pending
                for ci, values in enumerate(keep):
                    self.runner.adopt(ci, values)
                if self.capture is not None:
                    self.captured = out
                self.cur_err = e
            else:
                self.cur_err = self._err(self._outputs(self.start[n], record=True))
            self.stale = {k: v for k, v in self.stale.items() if k[0] != n}

    @torch.no_grad()
    def commit(self) -> int:
        """Fold every foldable unit's drops into ``model``'s consumers; returns the layers edited."""
        folds = {}
        for n, U in self.units.items():
            if U.fold and U.removed:
                removed, kept, coeffs = U.coefficients()
                folds[n] = (removed, kept, consumer_coefficients(coeffs, removed, kept, self.scales.get(n)).float())
        return fold_into_consumers(self.model, self.ctx.example_inputs, folds, graph=self.graph) if folds else 0

    def _dead(self) -> list[tuple[Links, Tensor]]:
        return [(self.links[n], U.removed_set()) for n, U in self.units.items()]

    def finetune(self) -> bool:
        epochs = self.p.finetune_epochs_between
        if epochs <= 0:
            return False
        if self.ctx.ledger.remaining + 1e-9 < epochs:
            if not self.ledger_note:
                self.log(
                    f"{self.label}: the epoch ledger has {self.ctx.ledger.remaining:g} epochs left, fewer than "
                    f"finetune_epochs_between={epochs:g}; no more fine-tuning between steps"
                )
                self.ledger_note = True
            return False
        self.commit()
        modules = dict(self.model.named_modules())
        zero = silencer(modules, self._dead())
        zero()
        handles = []
        for links, dead in self._dead():  # channels copied by shortcut modules stay dead as well
            for s in links.shortcuts:
                if dead.numel():
                    def hook(mod, inp, out, dead=dead):
                        out = out.clone()
                        out[:, dead.to(out.device)] = 0
                        return out

                    handles.append(modules[s].register_forward_hook(hook))
        try:
            self.ctx.train(self.model, epochs, hooks=_MaskHooks(zero), purpose=f"{self.label}-finetune")
        finally:
            for h in handles:
                h.remove()
        self.finetunes += 1
        for U in self.units.values():  # the drops are in the model now: restart from its weights
            U.T = torch.eye(U.n_out, dtype=torch.float64)
        self.build_units()
        self.scores, self.stale = {}, {}
        return True

    # ---- main loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        ctx, p = self.ctx, self.p
        ratio, tol = ctx.target.ratio, ctx.target.tolerance
        self.steps, self.evaluations, self.ledger_note = 0, 0, False
        self.scores: dict[tuple[str, int, int], float] = {}
        self.stale: dict[tuple[str, int], float] = {}
        self.pending = None  # HBGTS: the kept forward of the step's best candidate so far
        self.build_units()
        self.r0 = 0.0
        self.r0 = self.exact()
        self.offset = 0.0
        # the most any allocation can reach: every unit at its cap
        most = {n: torch.arange(U.n_out - U.n_max) for n, U in self.units.items()}
        for n in self.skipped:
            most[n] = torch.arange(self.model.get_submodule(n).out_channels)
        self.exact_calls += 1
        r_most = float(ctx.reduction_of(most))
        if r_most < ratio - tol:
            raise TargetMissedError(
                f"{self.label} cannot reach {ctx.target.metric} reduction {ratio:.3f}: with "
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
            for n, U in self.units.items():
                b = min(p.block, U.allowance(), U.cap)
                while b > 0 and self.predict((n, b)) > ratio + 0.9 * tol:
                    b -= 1
                while b > 1 and self.predict((n, b - 1)) >= ratio:
                    b -= 1  # never remove more than the target needs
                if b > 0:
                    proposals[n] = b
            if not proposals:
                if r_cur >= ratio - tol:
                    break
                if all(U.allowance() == 0 for U in self.units.values()):
                    raise TargetMissedError(
                        f"{self.label} stopped at {ctx.target.metric} reduction {r_cur:.4f} "
                        f"(target {ratio:.3f}): every layer is at max_layer_ratio={p.max_layer_ratio:g}"
                    )
                raise TargetMissedError(
                    f"{self.label} reached {ctx.target.metric} reduction {r_cur:.4f}, but "
                    f"removing any further filter overshoots {ratio:.3f}±{tol:.3f}: the layers are "
                    "too coarse for this tolerance"
                )
            n = self.best_move(proposals)
            b = proposals[n]
            r_new = None
            if self.predict((n, b)) >= ratio - window:
                r_new = self.exact((n, b))
                if r_new > ratio + tol:  # overshoot: this unit offers a smaller block
                    self.units[n].cap = b - 1
                    continue
            for U in self.units.values():
                U.cap = 1 << 30
            self.apply(n, b)
            r_exact = r_new
            need_finetune = True
            if self.steps % 25 == 0 or time.perf_counter() - last_log >= 30.0:
                last_log = time.perf_counter()
                self.log(f"{self.label}: step {self.steps}, {ctx.target.metric} reduction ~{self.predict():.3f} "
                         f"(target {ratio:.3f})")
        edited = self.commit()
        self.work.close()
        kept = self.kept_dict()
        widths = ", ".join(f"{n}:{kept[n].numel()}" for n in self.names)
        self.log(
            f"{self.label}: {self.steps} steps, {ctx.target.metric} reduction {r_cur:.4f}, "
            f"{self.evaluations} network evaluations, {self.exact_calls} exact reduction checks, "
            f"{self.finetunes} fine-tunes, {edited} consumer layers compensated, "
            f"{time.perf_counter() - t0:.1f}s; widths {widths}"
        )
        return kept

