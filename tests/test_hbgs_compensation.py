"""HBGS / HBGTS ``compensation.py``: BatchNorm-aware coefficients, silencing, the working copy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from _hbgs_support import randomise_bn
from torch import nn

from prunebench.criteria.hbgs.links import unit_links


def _comp_bn_a(bn: nn.BatchNorm2d):
    """``a = gamma / sqrt(var + eps)`` (``gamma = 1`` without affine parameters), by numpy."""
    import numpy as np

    a = 1.0 / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
    return a * bn.weight.detach().double().numpy() if bn.affine else a


def test_bn_scale_is_gamma_over_sqrt_of_var_plus_eps():
    from prunebench.criteria.hbgs.compensation import bn_scale
    from prunebench.criteria.hbgs.links import Links

    model = nn.ModuleDict({
        "affine": nn.BatchNorm2d(5, eps=0.25),
        "plain": nn.BatchNorm2d(5, eps=0.25, affine=False),
        "batch_stats": nn.BatchNorm2d(5, track_running_stats=False),
    })
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("affine", "plain"):
            model[name].running_var.copy_(0.5 + torch.rand(5, generator=g))
        model["affine"].weight.copy_(torch.randn(5, generator=g))

    def links(*bns: str) -> Links:
        return Links(("conv",), [], list(bns), [], False, [])

    for name in ("affine", "plain"):
        a = bn_scale(model, links(name))
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, torch.from_numpy(_comp_bn_a(model[name])), rtol=1e-12, atol=0)
    assert bn_scale(model, links("batch_stats")) is None  # no running statistics: no fixed scale
    assert bn_scale(model, links()) is None  # no BatchNorm after the conv
    assert bn_scale(model, links("affine", "plain")) is None  # not a single BatchNorm


def test_consumer_coefficients_rescale_by_the_batchnorm_scales():
    """``z_d ≈ Σ c_dk (a_d / a_k) z_k``: every coefficient times ``a_d / a_k``, by explicit loops."""
    from prunebench.criteria.hbgs.compensation import consumer_coefficients

    g = torch.Generator().manual_seed(1)
    a = 0.5 + torch.rand(7, generator=g, dtype=torch.float64)
    removed, kept = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 6])
    coeffs = torch.randn(2, 4, generator=g, dtype=torch.float64)
    expected = torch.tensor([[float(coeffs[i, j] * a[d] / a[k]) for j, k in enumerate(kept.tolist())]
                             for i, d in enumerate(removed.tolist())], dtype=torch.float64)
    torch.testing.assert_close(consumer_coefficients(coeffs, removed, kept, a), expected, rtol=1e-12, atol=0)
    # one channel folded into one
    one = consumer_coefficients(torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([5]), torch.tensor([3]), a)
    assert one.shape == (1, 1) and float(one) == pytest.approx(0.7 * float(a[5]) / float(a[3]), rel=1e-12)
    # no BatchNorm in between: the weight-space coefficients are the consumers' ones
    torch.testing.assert_close(consumer_coefficients(coeffs, removed, kept, None), coeffs, rtol=0, atol=0)
    assert consumer_coefficients(torch.zeros(0, 4, dtype=torch.float64), torch.tensor([], dtype=torch.long),
                                 kept, a).shape == (0, 4)


@pytest.mark.parametrize(
    ("a_top", "a_kept"),
    [(4.0, 6e-12), (4.0, 2e-12), (1.0, 1e-12), (1.0, 0.0), (1.5e-42, 1.5e-42), (1.5e-42, 0.5e-42)],
)
def test_consumer_coefficients_give_nothing_to_a_kept_channel_with_a_dead_batchnorm(a_top, a_kept):
    """A kept channel whose BatchNorm scale is zero -- ``|a_k| <= 1e-12 · max(max|a|, 1e-30)`` --
    cannot carry a folded channel: its coefficient is 0, never inf; any larger scale is inverted."""
    from prunebench.criteria.hbgs.compensation import consumer_coefficients

    a = torch.tensor([a_top, a_kept], dtype=torch.float64)
    got = float(consumer_coefficients(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0]), torch.tensor([1]), a))
    alive = abs(a_kept) > 1e-12 * max(a_top, 1e-30)
    assert got == (pytest.approx(a_top / a_kept, rel=1e-12) if alive else 0.0)


class _CompChain(nn.Module):
    """conv1 -> bn1 -> conv2 -> bn2 (+ shortcut sc) -> relu -> pool -> fc.

    conv1 is foldable into conv2; conv2 is read by fc through a flatten (4 columns per channel),
    so it is silenced, and sc writes into its channels like an option-A shortcut.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6, eps=0.1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.sc = nn.Conv2d(3, 6, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)))) + self.sc(x)
        return self.fc(self.pool(torch.relu(y)).flatten(1))


def _comp_unit(conv: nn.Conv2d, name: str, fold: bool, moves: int, ridge: float = 1e-4):
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    H = filter_gram(conv.weight.detach())
    n = conv.out_channels
    state = UnitState(name, (name,), n, n - 1, H, ridge_value(H, ridge), fold=fold, drop_order=SELECTORS["omp"][0])
    if moves:
        state.apply(moves)
    return state


def _comp_chain_expected(model: _CompChain, units, move: tuple[str, int] | None, compensation: bool):
    """Every parameter of the working copy, by hand: conv1's drops folded into conv2's input
    columns (``W[:, k] += Σ_d W[:, d] T[d, k] a_d / a_k``) or silenced, its dropped columns zeroed,
    and conv2's drops zeroed in conv2 (rows, bias), bn2 (affine) and fc (4 columns each)."""
    import numpy as np

    base = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    out = {k: v.copy() for k, v in base.items()}
    b = {n: (move[1] if move and move[0] == n else 0) for n in units}
    A, B = units["conv1"], units["conv2"]
    R, S = A.removed_set(b["conv1"]).tolist(), A.kept(b["conv1"]).tolist()
    if compensation:
        M, a = A.combination(b["conv1"]).numpy(), _comp_bn_a(model.bn1)
        for j, k in enumerate(S):
            for d in R:
                out["conv2.weight"][:, k] += base["conv2.weight"][:, d] * M[d, j] * a[d] / a[k]
    else:
        for key in ("conv1.weight", "bn1.weight", "bn1.bias"):
            out[key][R] = 0
    out["conv2.weight"][:, R] = 0
    dead = B.removed_set(b["conv2"]).tolist()
    for key in ("conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"):
        out[key][dead] = 0
    for c in dead:
        out["fc.weight"][:, 4 * c : 4 * c + 4] = 0
    assert np.abs(out["conv2.weight"] - base["conv2.weight"]).max() > 1e-3  # the case edits conv2
    return out, dead


@pytest.mark.parametrize("compensation", [True, False])
@pytest.mark.parametrize("fold_unit_first", [True, False])
def test_working_copy_shows_folds_silenced_channels_and_candidate_moves(compensation, fold_unit_first):
    """The working copy's parameters equal a by-hand simulation of every unit's drops (a fold
    into the consumer, or silenced writers and zeroed consumer columns), for the current state
    and for one candidate move of either unit; shortcut copies into silenced channels read 0;
    the caller's model is never edited, and the result does not depend on the units' order."""
    from prunebench.criteria.hbgs.compensation import WorkingCopy
    from prunebench.criteria.hbgs.links import Consumer, Links

    torch.manual_seed(12)
    model = _CompChain().eval()
    randomise_bn(model)
    untouched = copy.deepcopy(model.state_dict())
    links = {
        "conv1": Links(("conv1",), [Consumer("conv2", torch.arange(6).reshape(6, 1))], ["bn1"], [], True, []),
        "conv2": Links(("conv2",), [Consumer("fc", torch.arange(24).reshape(6, 4))], ["bn2"], ["sc"], False, []),
    }
    if not fold_unit_first:
        links = dict(reversed(list(links.items())))
    units = {"conv1": _comp_unit(model.conv1, "conv1", compensation, 1),
             "conv2": _comp_unit(model.conv2, "conv2", False, 2)}
    scales = {"conv1": torch.from_numpy(_comp_bn_a(model.bn1)), "conv2": torch.from_numpy(_comp_bn_a(model.bn2))}
    work = WorkingCopy(model, units, links, scales, compensation)
    for n in links:
        work.show(n, 0)
    x = torch.randn(4, 3, 8, 8)
    seen = []
    work.model.sc.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    raw_sc = model.sc(x).detach()

    def check(move):
        expected, dead = _comp_chain_expected(model, units, move, compensation)
        got = work.model.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key].double(), torch.from_numpy(value), rtol=1e-6, atol=1e-6, msg=key)
        seen.clear()
        work.model(x)
        alive = [c for c in range(6) if c not in dead]
        assert seen[-1][:, dead].abs().sum() == 0
        torch.testing.assert_close(seen[-1][:, alive], raw_sc[:, alive])

    check(None)
    for move in (("conv1", 2), ("conv2", 1)):
        work.show(*move)
        check(move)
        work.show(move[0], 0)
        check(None)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, untouched[key], rtol=0, atol=0, msg=key)
    work.close()
    work.close()  # closing twice is harmless
    seen.clear()
    work.model(x)
    torch.testing.assert_close(seen[-1], raw_sc)  # no more silencing hook


class _CompCat(nn.Module):
    """Two convs concatenated into one consumer: conv2's columns 0-3 read conv_a, 4-7 conv_b."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.cat([self.conv_a(x), self.conv_b(x)], 1))


def test_working_copy_folds_each_unit_reading_the_same_consumer():
    """conv_b's twin filter is dropped and folded into conv2's conv_b columns (a unit with
    nothing dropped reads the same consumer first): on this linear path the working copy's
    output is the original's, with the dropped channel's column zero."""
    from prunebench.criteria.hbgs.compensation import WorkingCopy

    torch.manual_seed(13)
    model = _CompCat().eval()
    with torch.no_grad():
        model.conv_b.weight[3] = -1.5 * model.conv_b.weight[1]
    x = torch.randn(4, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    links = {n: unit_links(graph, model, (n,)) for n in ("conv_a", "conv_b")}
    assert links["conv_b"].consumers[0].index.reshape(-1).tolist() == [4, 5, 6, 7]
    assert all(L.foldable for L in links.values())
    units = {"conv_a": _comp_unit(model.conv_a, "conv_a", True, 0, ridge=1e-10),
             "conv_b": _comp_unit(model.conv_b, "conv_b", True, 1, ridge=1e-10)}
    (dropped,) = units["conv_b"].removed_set().tolist()
    assert dropped in (1, 3)
    work = WorkingCopy(model, units, links, {}, True)
    for n in links:
        work.show(n, 0)
    W = model.conv2.weight.detach().double()
    expected = W.clone()
    M, S = units["conv_b"].combination(), units["conv_b"].kept().tolist()
    for j, k in enumerate(S):
        expected[:, 4 + k] += W[:, 4 + dropped] * M[dropped, j]
    expected[:, 4 + dropped] = 0
    torch.testing.assert_close(work.model.conv2.weight.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(work.model(x), model(x), rtol=1e-4, atol=1e-4)
    work.close()


def test_silencer_zeroes_the_dead_channels_everywhere_and_nothing_else():
    """Writers' filters, biases and BatchNorm affine parameters, and the consumers' input columns
    of every dead channel; a unit with nothing dead (listed first) changes nothing."""
    from prunebench.criteria.hbgs.compensation import silencer
    from prunebench.criteria.hbgs.links import Consumer, Links

    torch.manual_seed(14)
    model = _CompChain().eval()
    randomise_bn(model)
    before = copy.deepcopy(model.state_dict())
    conv1 = Links(("conv1",), [Consumer("conv2", torch.arange(6).reshape(6, 1))], ["bn1"], [], True, [])
    conv2 = Links(("conv2",), [Consumer("fc", torch.arange(24).reshape(6, 4))], ["bn2"], ["sc"], False, [])
    run = silencer(dict(model.named_modules()), [(conv1, torch.tensor([], dtype=torch.long)),
                                                 (conv2, torch.tensor([2]))])
    assert torch.equal(model.conv2.weight, before["conv2.weight"])  # nothing happens before the call
    run()
    expected = {k: v.clone() for k, v in before.items()}
    for key in ("conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"):
        expected[key][2] = 0
    expected["fc.weight"][:, 8:12] = 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
