"""HBGS / HBGTS ``search.py``: the greedy's decisions replayed by brute force, landing, lazy
re-scoring, reports."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from _hbgs_support import LAYERS, SmallCNN, brute_backward, make_ctx, randomise_bn
from torch import nn

from prunebench.criteria.hbgs import HBGS, HBGSB, HBGTS, HBGTSB
from prunebench.errors import ConfigError, TargetMissedError
from prunebench.protocols import Calibration, CompressionContext


def _masked_forward(model: SmallCNN, x: torch.Tensor, pools: dict[str, list[int]]):
    """SmallCNN with every channel outside its unit's pool zeroed after its BatchNorm (what removing
    it does without compensation); returns the logits, every conv's raw output and bn3's (masked)
    output, before the in-place ReLU that follows it."""
    convs = {}

    @torch.no_grad()
    def unit(name: str, bn: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
        y = convs[name] = getattr(model, name)(h)
        mask = torch.zeros(y.shape[1])
        mask[pools[name]] = 1.0
        convs["bn"] = bn(y) * mask[None, :, None, None]
        return torch.relu(convs["bn"])

    h = unit("conv1", model.bn1, x)
    h = model.pool(unit("conv2", model.bn2, h))
    h = unit("conv3", model.bn3, h)
    with torch.no_grad():
        return model.fc(h.mean((2, 3))), convs


class _Counting:
    """ctx.reduction_of counted, and memoised on the widths (all the MACs depend on)."""

    def __init__(self, ctx: CompressionContext) -> None:
        self.inner, self.calls, self.memo = ctx.reduction_of, 0, {}

    def __call__(self, kept) -> float:
        self.calls += 1
        return self.of({n: [int(i) for i in k] for n, k in kept.items()})

    def of(self, pools) -> float:
        key = tuple(len(pools[n]) for n in LAYERS)
        if key not in self.memo:
            self.memo[key] = self.inner({n: torch.tensor(pools[n]) for n in LAYERS})
        return self.memo[key]


def _replay(model: SmallCNN, ctx: CompressionContext, red: _Counting, objective: str, block: int,
            lazy: bool = False, output: str = "logits"):
    """The documented greedy by brute force: every unit proposes its next ``block`` filters by
    greedy backward elimination over its current pool (fewer near the target: the largest block
    staying below target + 0.9 tolerance, and no more than the target needs); the proposal with
    the smallest error goes (ties by name), until the exact reduction reaches the target.
    HBGS's error: ``‖Y₀ − Ŷ‖/‖Y₀‖`` of the unit's conv output, ``Ŷ`` its kept channels in the
    current network; HBGTS's: ``‖Z − Z₀‖²/‖Z₀‖²`` of the logits, or of the last BatchNorm's output
    (its dropped channels 0). ``lazy``: the lazy greedy on the
    error increments. Returns the moves, the final pools and the number of network evaluations."""
    from prunebench.criteria._selection import filter_gram, ridge_value

    ratio, tol = ctx.target.ratio, ctx.target.tolerance
    x = ctx.calibration.images
    n_out = {n: getattr(model, n).out_channels for n in LAYERS}
    n_max = {n: min(int(0.9 * n_out[n]), n_out[n] - 1) for n in LAYERS}
    H = {n: filter_gram(getattr(model, n).weight) for n in LAYERS}
    lam = {n: ridge_value(H[n], 1e-4) for n in LAYERS}
    pools = {n: list(range(n_out[n])) for n in LAYERS}
    z0, y0 = _masked_forward(model, x, pools)
    if output == "last_bn":
        z0 = y0["bn"]

    def after(n: str, b: int) -> dict[str, list[int]]:
        gone = brute_backward(H[n], pools[n], b, lam[n])
        return dict(pools, **{n: [k for k in pools[n] if k not in gone]})

    def out_err(p) -> float:
        z, y = _masked_forward(model, x, p)
        z = y["bn"] if output == "last_bn" else z
        return float(((z - z0) ** 2).sum() / (z0**2).sum())

    evaluations = 0

    def error(n: str, b: int) -> float:
        nonlocal evaluations
        new = after(n, b)
        if objective == "output":
            evaluations += 1
            return out_err(new)
        _, y = _masked_forward(model, x, pools)
        keep = torch.zeros(n_out[n])
        keep[new[n]] = 1.0
        return float((y0[n] - y[n] * keep[None, :, None, None]).norm() / y0[n].norm())

    moves, stale, cur = [], {}, 0.0
    while red.of(pools) < ratio:
        proposals = {}
        for n in LAYERS:
            b = min(block, n_max[n] - (n_out[n] - len(pools[n])))
            while b > 0 and red.of(after(n, b)) > ratio + 0.9 * tol:
                b -= 1
            while b > 1 and red.of(after(n, b - 1)) >= ratio:
                b -= 1
            if b > 0:
                proposals[n] = b
        if not proposals:
            assert red.of(pools) >= ratio - tol
            break
        if not lazy:
            best = min(proposals, key=lambda n: (error(n, proposals[n]), n))
        else:
            fresh: dict[str, float] = {}
            while True:
                est = {}
                for n, b in proposals.items():
                    if n not in fresh and (n, b) not in stale:
                        fresh[n] = stale[(n, b)] = error(n, b) - cur
                    est[n] = fresh.get(n, stale.get((n, b)))
                best = min(est, key=lambda n: (est[n], n))
                if best in fresh:
                    break
                fresh[best] = stale[(best, proposals[best])] = error(best, proposals[best]) - cur
        moves.append((best, proposals[best]))
        pools = after(best, proposals[best])
        cur = out_err(pools)
        stale = {k: v for k, v in stale.items() if k[0] != best}
    return moves, pools, evaluations


_REPORT = (r": (-?\d+) steps, macs reduction ([0-9.]+), (-?\d+) network evaluations, (-?\d+) exact reduction "
           r"checks, (-?\d+) fine-tunes, (-?\d+) consumer layers compensated")


_CASES = {  # (variant, lazy, seed, output, reduction the model already has, fc scaled to tiny logits,
    #  width, target, block)
    "hbgs": (HBGS, False, 1, "logits", 0.0, False, 6, 0.55),
    "hbgs-block-5": (HBGS, False, 6, "logits", 0.0, False, 8, 0.5, 5),
    "hbgts-block-5": (HBGTSB, False, 7, "logits", 0.0, False, 8, 0.45, 5),
    "hbgs-model-already-reduced": (HBGS, False, 3, "logits", 0.2, False, 6, 0.55),
    "hbgts": (HBGTSB, False, 5, "logits", 0.0, False, 6, 0.55),
    "hbgts-tiny-logits": (HBGTSB, False, 2, "logits", 0.0, True, 6, 0.55),
    "hbgts-last-bn": (HBGTSB, False, 4, "last_bn", 0.0, False, 6, 0.55),
    # lazy: not always the eager choice (seed 5), re-scoring a stale front-runner (2), a moved
    # unit's stale increment dropped (7)
    "hbgts-lazy": (HBGTSB, True, 5, "logits", 0.0, False, 6, 0.55),
    "hbgts-lazy-b": (HBGTSB, True, 2, "logits", 0.0, False, 6, 0.55),
    "hbgts-lazy-c": (HBGTSB, True, 7, "logits", 0.0, False, 8, 0.6),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_the_greedy_takes_the_smallest_error_move_until_the_target_as_a_brute_force_replay(case, monkeypatch):
    """Moves, their order, the blocks shrinking near the target, the stop, the kept sets, the exact
    checks (only within max(2 tol, 2 pp) of the target) and the reported counts, against
    :func:`_replay`. Without compensation a move only removes channels, so the replay needs no
    least-squares fit."""
    from prunebench.criteria.hbgs.search import Search

    cls, lazy, seed, output, pre, tiny, width, ratio, block = (*_CASES[case], 2)[:9]
    torch.manual_seed(seed)
    model = SmallCNN(width=width).eval()
    randomise_bn(model, seed)
    if tiny:  # logits far below 1 in norm, one of them exactly 0
        with torch.no_grad():
            model.fc.weight.mul_(1e-3)[0] = 0.0
            model.fc.bias.mul_(1e-3)[0] = 0.0
    tol = 0.03
    ctx = make_ctx(model, ratio, n_images=24, tolerance=tol)
    if pre:  # the harness measures against a reference this model is already 20% smaller than
        inner = ctx.reduction_of
        ctx.reduction_of = lambda kept: 1.0 - (1.0 - pre) * (1.0 - inner(kept))
    replay_red = _Counting(ctx)
    red = ctx.reduction_of = _Counting(ctx)
    asked: list[float] = []
    ctx.reduction_of = lambda kept: (asked.append(red(kept)), asked[-1])[1]
    logs: list[str] = []
    ctx.log = logs.append
    done: list[tuple[str, int]] = []
    apply = Search.apply
    monkeypatch.setattr(Search, "apply", lambda self, n, b: (done.append((n, b)), apply(self, n, b))[1])
    objective = "output" if cls is HBGTSB else "layer"
    moves, pools, evaluations = _replay(copy.deepcopy(model), ctx, replay_red, objective, block, lazy, output)
    kwargs = {"lazy": True} if lazy else {}
    if output != "logits":
        kwargs["output"] = output
    kept = cls.from_kwargs(selector="backward", block=block, compensation=False, **kwargs).allocate(model, ctx)
    assert done == moves
    assert {n: k.tolist() for n, k in kept.items()} == pools
    achieved = red.of(pools)
    assert abs(achieved - ratio) <= tol
    # the exact count: the start, the capped allocation, then only states within the window
    window = max(2 * tol, 0.02)
    assert asked[0] == pytest.approx(pre) and all(r >= ratio - window - 1e-9 for r in asked[2:])
    report = re.search(_REPORT, logs[-1])
    assert report is not None, logs
    steps, reached, evals, exact, finetunes, edited = report.groups()
    assert int(steps) == len(moves) and float(reached) == pytest.approx(achieved, abs=5e-5)
    assert int(evals) == evaluations and int(exact) == red.calls == len(asked)
    assert int(finetunes) == 0 and int(edited) == 0


class _NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class _Depthwise(nn.Module):
    """conv1 -> a depthwise conv (its filters read different inputs: never pruned) -> conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def _singular_conv3() -> nn.Module:
    torch.manual_seed(8)
    model = SmallCNN(width=8).eval()
    with torch.no_grad():
        model.conv3.weight[1] = model.conv3.weight[0]
    return model


_GRAM = ("the filters' Gram matrix is singular (linearly dependent filters, or more filters than weights per "
         "filter); use ridge > 0")


@pytest.mark.parametrize("build, ctx_kw, cls, kw, error, message", [
    (SmallCNN, {"prunable": ["conv1", "layer9"]}, HBGS, {}, ConfigError,
     "prunable layer 'layer9' is not in the model."),
    (SmallCNN, {"prunable": ["conv1", "conv9"]}, HBGS, {}, ConfigError,
     "prunable layer 'conv9' is not in the model. Did you mean 'conv3' or 'conv2' or 'conv1'?"),
    (SmallCNN, {"prunable": ["conv1", "fc"]}, HBGTS, {}, ConfigError,
     "hbgts prunes convolutions; prunable layer 'fc' is a Linear"),
    (lambda: SmallCNN(width=8), {}, HBGS, {"block": 9}, ConfigError,
     "hbgs block=9 is larger than layer 'conv1', which has only 8 filters; use block <= 8"),
    (_Depthwise, {"prunable": ["dw"]}, HBGSB, {}, ConfigError,
     "hbgs-b found no prunable (ungrouped) convolution in ctx.prunable"),
    (_singular_conv3, {}, HBGSB, {"ridge": 0.0}, ConfigError,
     "hbgs-b cannot rank the filters of layer 'conv3': " + _GRAM),
    (_NoBN, {"prunable": ["conv1", "conv2"]}, HBGTS, {"output": "last_bn"}, ConfigError,
     "hbgts output='last_bn' needs a model with a BatchNorm layer"),
    (SmallCNN, {"calibration": None}, HBGTSB, {}, ConfigError,
     "hbgts-b needs calibration data (the harness passes it when needs_data=True)"),
])
def test_bad_input_gives_one_exact_line(build, ctx_kw, cls, kw, error, message):
    torch.manual_seed(0)
    model = build().eval()
    extra = {k: v for k, v in ctx_kw.items() if k != "calibration"}
    ctx = make_ctx(model, 0.3, n_images=8, **extra)
    if "calibration" in ctx_kw:
        ctx.calibration = ctx_kw["calibration"]
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        cls.from_kwargs(**kw).allocate(model, ctx)


def test_an_unreachable_target_names_the_most_any_allocation_reaches():
    model = SmallCNN().eval()
    ctx = make_ctx(model, 0.6, n_images=8, prunable=["conv3"])
    most = ctx.reduction_of({"conv3": torch.arange(2)})  # 14 of 16 filters at max_layer_ratio=0.9
    message = (f"hbgs cannot reach macs reduction 0.600: with every prunable layer at max_layer_ratio=0.9 "
               f"the reduction reached is {most:.4f}")
    with pytest.raises(TargetMissedError, match=f"^{re.escape(message)}$"):
        HBGS().allocate(model, ctx)
    # a target the capped allocation reaches only within the tolerance is still attempted
    ctx = make_ctx(model, most + 0.009, n_images=8, prunable=["conv3"])
    kept = HBGS().allocate(model, ctx)
    assert kept["conv3"].numel() == 2


@pytest.mark.parametrize("cls", [HBGS, HBGTS])
def test_a_unit_with_a_grouped_conv_is_kept_whole_and_the_others_are_searched(cls):
    torch.manual_seed(12)
    model = _Depthwise().eval()
    randomise_bn(model, 12)
    # the depthwise conv shares conv1's channels: one unit, never pruned (its filters read different inputs)
    probe = make_ctx(model, 0.3, n_images=8, prunable=["conv1", "dw", "conv3"])
    target = probe.reduction_of({"conv1": torch.arange(8), "conv3": torch.arange(2)})
    ctx = make_ctx(model, target, n_images=8, prunable=["conv1", "dw", "conv3"], tolerance=0.01)
    seen: list[dict] = []
    inner = ctx.reduction_of
    ctx.reduction_of = lambda kept: (seen.append({n: k.tolist() for n, k in kept.items()}), inner(kept))[1]
    kept = cls.from_kwargs(block=4).allocate(model, ctx)  # block = the widest searched unit's filters
    assert kept["conv1"].tolist() == list(range(8)) and kept["conv3"].numel() == 2
    assert all(k["conv1"] == list(range(8)) for k in seen)


def test_one_calibration_image_is_enough():
    torch.manual_seed(13)
    model = SmallCNN(width=8).eval()
    ctx = make_ctx(model, 0.3, n_images=1, tolerance=0.03)
    kept = HBGS().allocate(model, ctx)
    assert abs(ctx.reduction_of(kept) - 0.3) <= 0.03


def test_fine_tunes_stop_when_the_ledger_runs_short_and_the_drops_stay_dropped():
    torch.manual_seed(14)
    model = SmallCNN(width=8).eval()
    randomise_bn(model, 14)
    dead: list[dict[str, set[int]]] = []

    def train(m, epochs, hooks=None, purpose="compress"):
        ctx.ledger.draw(epochs, purpose)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        hooks.after_step(m, 0)
        dead.append({n: {int(i) for i in torch.nonzero(getattr(m, n).weight.flatten(1).abs().sum(1) == 0)}
                     for n in LAYERS})

    ctx = make_ctx(model, 0.6, n_images=16, epochs=2.0, train=train, tolerance=0.02)
    logs: list[str] = []
    ctx.log = logs.append
    kept = HBGS.from_kwargs(block=1, finetune_epochs_between=1.0).allocate(model, ctx)
    # exactly the two epochs the ledger holds, then one note, once
    assert len(dead) == 2 and ctx.ledger.spent["hbgs-finetune"] == 2.0
    assert sum("epoch ledger" in line for line in logs) == 1
    report = re.search(_REPORT, logs[-1])
    assert report.group(5) == "2"
    # one filter a step: the steps are the filters removed (none removed twice)
    assert int(report.group(1)) == sum(8 - kept[n].numel() for n in LAYERS)
    # the filters removed before a fine-tune are never kept again
    assert all(any(d.values()) for d in dead)
    for d in dead:
        for n in LAYERS:
            assert not d[n] & set(kept[n].tolist()), n
    assert abs(ctx.reduction_of(kept) - 0.6) <= 0.02


def test_a_target_between_two_filter_counts_is_reported_as_too_coarse():
    model = SmallCNN(width=4).eval()
    probe = make_ctx(model, 0.5, n_images=8, prunable=["conv3"])
    r1, r2 = (probe.reduction_of({"conv3": torch.arange(4 - k)}) for k in (1, 2))
    ratio, tol = (r1 + r2) / 2, (r2 - r1) / 10
    ctx = make_ctx(model, ratio, n_images=8, prunable=["conv3"], tolerance=tol)
    message = (f"hbgs reached macs reduction {r1:.4f}, but removing any further filter overshoots "
               f"{ratio:.3f}±{tol:.3f}: the layers are too coarse for this tolerance")
    with pytest.raises(TargetMissedError, match=f"^{re.escape(message)}$"):
        HBGS.from_kwargs(block=4, max_layer_ratio=0.5).allocate(model, ctx)


def test_all_zero_logits_score_every_move_zero_and_the_search_still_lands():
    torch.manual_seed(15)
    model = SmallCNN(width=8).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    ctx = make_ctx(model, 0.4, n_images=8, tolerance=0.03)
    kept = HBGTS().allocate(model, ctx)
    assert abs(ctx.reduction_of(kept) - 0.4) <= 0.03


@pytest.mark.parametrize("lazy", [False, True])
def test_hbgts_forwarded_by_workers_makes_the_same_moves_with_the_same_errors(lazy, monkeypatch):
    """Free cores let HBGTS forward its chunks in workers of one thread each: every chunk is
    computed alone, so the errors, the moves and the kept filters are those of one thread."""
    from prunebench.criteria.hbgs import search as search_module
    from prunebench.training import threads

    torch.manual_seed(21)
    model = SmallCNN(width=16).eval()
    randomise_bn(model, 21)
    ctx = make_ctx(model, 0.5, n_images=96, tolerance=0.02)  # 3 calibration batches: 3 forward chunks
    errors: dict[int, list[float]] = {1: [], 2: []}
    used: list[int] = []
    real_err, real_workers = search_module.Search._err, threads.in_workers

    def run(workers: int):
        monkeypatch.setattr(threads, "free_workers", lambda items: workers)
        monkeypatch.setattr(search_module.Search, "_err",
                            lambda self, out: errors[workers].append(real_err(self, out)) or errors[workers][-1])
        monkeypatch.setattr(threads, "in_workers", lambda fn, items, k: used.append(k) or real_workers(fn, items, k))
        torch.set_num_threads(2)
        kept = HBGTS.from_kwargs(lazy=lazy).allocate(copy.deepcopy(model), ctx)
        assert torch.get_num_threads() == 2  # the caller's count again
        return {n: k.tolist() for n, k in kept.items()}

    before = torch.get_num_threads()
    try:
        assert run(2) == run(1)
    finally:
        torch.set_num_threads(before)
    assert errors[2] == errors[1] and len(errors[1]) >= 8
    assert set(used) == {1, 2}


def test_lazy_is_ignored_by_hbgs():
    torch.manual_seed(16)
    model = SmallCNN(width=8).eval()
    randomise_bn(model, 16)
    ctx = make_ctx(model, 0.4, n_images=8, tolerance=0.03)
    eager = HBGS().allocate(copy.deepcopy(model), ctx)
    lazy = HBGS.from_kwargs(lazy=True).allocate(copy.deepcopy(model), ctx)
    assert {n: k.tolist() for n, k in lazy.items()} == {n: k.tolist() for n, k in eager.items()}


@pytest.mark.parametrize("cls", [HBGS, HBGTSB])
@pytest.mark.parametrize("cache", [True, False])
def test_after_moves_up_and_downstream_every_score_is_that_of_a_fresh_forward(cls, cache, monkeypatch):
    """Two moves, the second downstream of the first: the cached activations the suffix forwards
    start from follow both, so every unit's score is that of the pruned network (compensation off:
    :func:`_masked_forward`)."""
    import prunebench.criteria.hbgs.search as search_mod
    from prunebench.criteria.hbgs.search import Search

    if not cache:
        monkeypatch.setattr(search_mod, "REFERENCE_CACHE_BYTES", 0)
    torch.manual_seed(17)
    model = SmallCNN(width=6).eval()
    randomise_bn(model, 17)
    ctx = make_ctx(model, 0.5, n_images=40)
    ctx.calibration = Calibration(ctx.calibration.images, ctx.calibration.labels, batch_size=40)  # two chunks
    objective = "layer" if cls is HBGS else "output"
    search = Search(cls.from_kwargs(compensation=False, block=2).params, objective, "x", model, ctx)
    search.steps, search.evaluations, search.scores, search.stale = 0, 0, {}, {}
    search.build_units()
    search.apply("conv1", 2)
    search.apply("conv3", 1)  # forwards from conv3 on: its input must be that after conv1's move
    x = ctx.calibration.images
    pools = {n: search.units[n].pool.tolist() for n in LAYERS}
    z0, y0 = _masked_forward(model, x, {n: list(range(6)) for n in LAYERS})
    z, y = _masked_forward(model, x, pools)
    if objective == "output":
        assert search.cur_err == pytest.approx(float(((z - z0) ** 2).sum() / (z0**2).sum()), rel=1e-4)
    for n in LAYERS:
        for b in (0, 1, 2):
            new = dict(pools, **{n: search.units[n].kept(b).tolist()})
            if objective == "output":
                zb, _ = _masked_forward(model, x, new)
                expected = float(((zb - z0) ** 2).sum() / (z0**2).sum())
                got = search.output_error(n, b) if b else search.cur_err
            else:
                keep = torch.zeros(6)
                keep[new[n]] = 1.0
                expected = float((y0[n] - y[n] * keep[None, :, None, None]).norm() / y0[n].norm())
                got = search.units[n].layer_error(b)
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (n, b)


@pytest.mark.parametrize("cls", [HBGS, HBGTS])
@pytest.mark.parametrize("ratio", [0.35, 0.5])
def test_the_harness_count_decides_where_the_cost_model_disagrees(cls, ratio):
    """The cost model only guides the search: here the harness's count mixes in parameters while
    the search models MACs, and the allocation must still land on the harness's count."""
    torch.manual_seed(18)
    model = SmallCNN(width=8).eval()
    randomise_bn(model, 18)
    ctx = make_ctx(model, ratio, n_images=8, tolerance=0.01)
    by_params = make_ctx(model, ratio, n_images=8, metric="params")

    def mixed(kept):
        return 0.7 * by_params_macs(kept) + 0.3 * by_params.reduction_of(kept)

    by_params_macs = ctx.reduction_of
    ctx.reduction_of = mixed
    kept = cls.from_kwargs(block=3).allocate(model, ctx)
    assert abs(mixed(kept) - ratio) <= 0.01
