"""HBGS / HBGTS ``runner.py``: suffix runs against plain full forwards, in-place ops, structured
values."""

from __future__ import annotations

import copy
from operator import iadd

import pytest
import torch
import torch.nn.functional as F
from _hbgs_support import randomise_bn
from torch import nn

from prunebench.criteria.hbgs.runner import SuffixRunner, logits_of
from prunebench.errors import ConfigError


def _first__(pair):
    """A dunder-named function is not an in-place op (only a single trailing ``_`` marks one)."""
    return pair[0]


torch.fx.wrap("_first__")
torch.fx.wrap("iadd")  # traced as a call of operator.iadd (a plain `+=` traces to an out-of-place add)


class InPlaceNet(nn.Module):
    """Each in-place flavour acts on its own value computed before ``late`` and read after it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4, self.c5 = (nn.Conv2d(3, 4, 1) for _ in range(5))
        self.late = nn.Conv2d(3, 4, 1)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d, e = self.c1(x), self.c2(x), self.c3(x), self.c4(x), self.c5(x)
        y = self.late(x)
        a = self.act(a)  # a module's inplace flag
        b = F.leaky_relu(b, 0.1, inplace=True)  # an inplace=True keyword
        c = torch.sigmoid_(c)  # a torch function named with a trailing underscore
        d = d.mul_(-2.0)  # a tensor method named with a trailing underscore
        e = iadd(e, y)  # an in-place operator
        return torch.cat([y, a, b, c, d, e], 1)


def test_runner_in_place_ops_leave_the_cached_prefix_intact() -> None:
    torch.manual_seed(0)
    model = InPlaceNet().eval()
    x = torch.randn(5, 3, 4, 4)
    reference = copy.deepcopy(model)(x)
    work = copy.deepcopy(model)
    runner = SuffixRunner(work, [x[:2], x[2:]], {"late": ["late"]})
    assert runner.gm is not None and runner.start["late"] > 0
    torch.testing.assert_close(torch.cat(runner.run(0, record=True)), reference)
    for _ in range(2):  # the values cached before `late` are read, never written, by a suffix run
        torch.testing.assert_close(torch.cat(runner.run(runner.start["late"], record=False)), reference)
    with torch.no_grad():
        work.late.weight.mul_(-1.0)
    edited = copy.deepcopy(model)
    edited.late.load_state_dict(work.late.state_dict())
    torch.testing.assert_close(torch.cat(runner.run(runner.start["late"], record=True)), edited(x))


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :2], x[:, 2:]


class Features(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"u": 2 * x}


class Join(nn.Module):
    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat(pair, 1)


class StructuredNet(nn.Module):
    """Tuples and dicts made before ``late`` and read after it by functions, methods and a module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pair, self.features, self.join = Pair(), Features(), Join()
        self.late = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        p, f = self.pair(h), self.features(h)
        y = self.late(h)
        z = y + p[0].sum(1, keepdim=True) + _first__(p).mean() + f.get("u") + self.join(p)
        return z * f.__contains__("u")


def test_runner_passes_cached_tuples_and_dicts_through() -> None:
    torch.manual_seed(1)
    model = StructuredNet().eval()
    x = torch.randn(3, 3, 4, 4)
    runner = SuffixRunner(copy.deepcopy(model), [x], {"late": ["late"]})
    assert runner.gm is not None and runner.start["late"] > 0
    torch.testing.assert_close(runner.run(0, record=True)[0], model(x))
    torch.testing.assert_close(runner.run(runner.start["late"], record=False)[0], model(x))


class ReuseNet(nn.Module):
    """A module called twice, one used only through its weight, a parameter, and late inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 4, 1)  # never called: its weight feeds a functional conv
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.late = nn.Conv2d(4, 4, 1)
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, k: float = 0.5) -> torch.Tensor:
        h = self.stem(x)
        s = F.conv2d(h, self.side.weight)
        h = self.shared(F.relu(h))
        h = self.mid(F.relu(h))
        h = self.shared(F.relu(h))
        h = self.bn(h)
        h = self.late(F.relu(h)) + s * self.gain
        return self.fc(h.mean((2, 3))) + k * x.mean((1, 2, 3))[:, None]


@pytest.mark.parametrize("output", ["logits", "last_bn"])
def test_runner_suffix_equals_a_full_forward_of_the_edited_network(output: str) -> None:
    torch.manual_seed(2)
    model = ReuseNet().eval()
    randomise_bn(model)
    x = torch.randn(6, 3, 5, 5)
    keys = {"stem": ["stem"], "shared": ["shared"], "late": ["late"], "late+side": ["late", "side"]}
    work = copy.deepcopy(model)
    runner = SuffixRunner(work, [x[:4], x[4:]], keys)
    assert runner.gm is not None
    # a key's start is the first call of any of its modules, and 0 (the input) when one of them
    # is never called as a module
    assert 0 < runner.start["stem"] < runner.start["shared"] < runner.start["late"]
    assert runner.start["late+side"] == 0
    got: list[torch.Tensor] = []
    work.bn.register_forward_hook(lambda mod, inp, out: got.append(out))

    def outputs(start: int, record: bool) -> torch.Tensor:
        got.clear()
        out = runner.run(start, record)
        return torch.cat(out) if output == "logits" else torch.cat(got)

    def plain(m: nn.Module) -> torch.Tensor:  # the whole network in plain torch
        seen: list[torch.Tensor] = []
        h = m.bn.register_forward_hook(lambda mod, inp, out: seen.append(out))
        with torch.no_grad():
            out = m(x)
        h.remove()
        return out if output == "logits" else seen[0]

    def edit(name: str, sign: float) -> nn.Module:
        with torch.no_grad():
            work.get_submodule(name).weight[:, :2] *= sign
        return copy.deepcopy(work)

    with torch.enable_grad():
        assert not runner.run(0, record=True)[0].requires_grad  # inference values, no autograd graph
    if output == "logits":  # `bn` runs before `late`: its output is not recomputed from there
        torch.testing.assert_close(outputs(runner.start["late"], False), plain(model))
    # a trial move scored without record leaves the caches of later starts as they were
    edited = edit("stem", -1.0)
    torch.testing.assert_close(outputs(runner.start["stem"], False), plain(edited))
    edit("stem", -1.0)
    torch.testing.assert_close(outputs(runner.start["shared"], False), plain(model))
    # an edit of a module called twice acts from its first call
    edited = edit("shared", 0.0)
    torch.testing.assert_close(outputs(runner.start["shared"], True), plain(edited))
    # an edit of a module used only through its weight needs the whole forward
    edited = edit("side", -3.0)
    torch.testing.assert_close(outputs(runner.start["late+side"], True), plain(edited))
    if output == "logits":
        torch.testing.assert_close(outputs(runner.start["late"], False), plain(edited))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return -h if bool(h.sum() > 0) else h  # data-dependent: torch.fx cannot trace this


def test_runner_on_an_untraceable_model_runs_whole_forwards() -> None:
    torch.manual_seed(3)
    model = Untraceable().eval()
    chunks = [torch.randn(2, 3, 3, 3), -torch.rand(2, 3, 3, 3)]
    runner = SuffixRunner(model, chunks, {"conv": ["conv"], "none": []})
    assert runner.gm is None and runner.start == {"conv": 0, "none": 0}
    for ci, x in enumerate(chunks):
        torch.testing.assert_close(runner.run_chunk(ci, runner.start["conv"], record=False), model(x))


def test_logits_of_takes_the_first_tensor_of_nested_outputs() -> None:
    a, b = torch.arange(4, dtype=torch.float16).reshape(2, 2), torch.ones(2)
    for out in (a, (a,), (a, b), [(a, b), b]):
        got = logits_of(out)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, a.float())
    for bad in ({"logits": a}, (None, a), (), [[], a]):
        with pytest.raises(ConfigError) as exc:
            logits_of(bad)
        assert str(exc.value) == (
            "hbgts needs a model whose forward returns a tensor of logits (or a tuple starting with one)"
        )
