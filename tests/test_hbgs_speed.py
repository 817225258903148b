"""HBGTS's cost cuts change no decision: the same moves, kept filters and folded weights as the
implementation before them, and one suffix forward per scored candidate, none per applied move."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest
import torch

from prunebench import registry
from prunebench.architectures import cifar_resnet
from prunebench.criteria import hbgs as hbgs_pkg
from prunebench.criteria.hbgs.runner import SuffixRunner
from prunebench.criteria.hbgs.search import Search
from prunebench.pipeline.metrics import count_macs
from prunebench.pipeline.surgery import prune_kept
from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target


def search_resnet20(pkg, criterion: str, images: int = 8, scope: str = "inner", ratio: float = 0.5, **params):
    """One search on a fixed-seed ResNet-20 with fixed random images: (moves, kept, weights, log)."""
    torch.manual_seed(0)
    model = cifar_resnet.RESNET20.build().eval()
    x = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    example = x[:1]
    base = count_macs(model, example)
    baseline = copy.deepcopy(model)

    def reduction_of(kept):
        m = copy.deepcopy(baseline)
        prune_kept(m, example, kept)
        return 1.0 - count_macs(m, example) / base

    lines: list[str] = []
    ctx = CompressionContext(
        example_inputs=example,
        calibration=Calibration(x, torch.zeros(images, dtype=torch.long), batch_size=4),
        target=Target(metric="macs", ratio=ratio),
        device=torch.device("cpu"),
        seed=0,
        prunable=registry.architectures.get("resnet20").prunable_layers(model, scope),
        protected=["fc"],
        ledger=EpochLedger(total=0.0),
        reduction=lambda m: 1.0 - count_macs(m, example) / base,
        reduction_of=reduction_of,
        train=lambda *a, **k: None,
        log=lines.append,
    )
    moves: list[str] = []
    search_cls = pkg.search.Search
    apply = search_cls.apply

    def logged(self, n, b):
        moves.append(f"{n}:{b}")
        return apply(self, n, b)

    search_cls.apply = logged
    try:
        cls = {"hbgs": pkg.HBGS, "hbgts": pkg.HBGTS}[criterion]
        kept = cls.from_kwargs(**params).allocate(model, ctx)
    finally:
        search_cls.apply = apply
    return moves, {k: v.tolist() for k, v in kept.items()}, model.state_dict(), lines


def digest(kept: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


# Recorded with the implementation before the cost cuts (every applied move forwarded again,
# the runner looking modules up per node), on search_resnet20(hbgs_pkg, "hbgts", lazy=True).
REFERENCE_MOVES = (
    "layer1.0.conv1:5 layer1.2.conv1:5 layer2.0.conv1:5 layer1.1.conv1:5 layer3.1.conv1:5 "
    "layer1.2.conv1:5 layer1.2.conv1:4 layer3.0.conv1:5 layer3.1.conv1:5 layer3.1.conv1:5 "
    "layer3.1.conv1:5 layer3.1.conv1:5 layer3.1.conv1:5 layer3.1.conv1:5 layer3.1.conv1:5 "
    "layer3.1.conv1:5 layer3.1.conv1:5 layer1.0.conv1:5 layer1.0.conv1:4 layer2.1.conv1:5 "
    "layer2.1.conv1:5 layer2.1.conv1:5 layer2.1.conv1:5 layer2.0.conv1:5 layer2.0.conv1:5 "
    "layer2.0.conv1:5 layer2.0.conv1:5 layer2.0.conv1:3 layer2.2.conv1:4"
).split()
REFERENCE_KEPT = "e11d44195ba83627"  # digest() of the kept filters of every unit


def test_lazy_hbgts_makes_the_recorded_moves_of_the_previous_implementation():
    moves, kept, _, _ = search_resnet20(hbgs_pkg, "hbgts", lazy=True)
    assert moves == REFERENCE_MOVES
    assert digest(kept) == REFERENCE_KEPT


CASES = [
    ("hbgts", dict(lazy=True), "inner", 0.5),
    ("hbgts", dict(lazy=True, selector="backward", output="last_bn"), "inner", 0.3),
    ("hbgts", dict(lazy=False, selector="backward"), "inner", 0.1),
    ("hbgts", dict(lazy=True, output="last_bn"), "all", 0.3),
    ("hbgts", dict(lazy=False), "all", 0.1),
    ("hbgs", dict(selector="backward"), "all", 0.3),
]


@pytest.mark.parametrize(("criterion", "params", "scope", "ratio"), CASES)
def test_applying_a_move_from_its_scoring_forward_changes_no_decision(monkeypatch, criterion, params, scope, ratio):
    """Every move, every kept filter and every folded weight as with a second forward per move."""
    new = search_resnet20(hbgs_pkg, criterion, scope=scope, ratio=ratio, **params)
    monkeypatch.setattr(Search, "_reuse_scoring_forward", False)
    old = search_resnet20(hbgs_pkg, criterion, scope=scope, ratio=ratio, **params)
    assert new[0] == old[0]
    assert new[1] == old[1]
    assert new[2].keys() == old[2].keys()
    for k in new[2]:
        assert torch.equal(new[2][k], old[2][k]), k


@pytest.mark.parametrize(("lazy", "ratio"), [(True, 0.5), (False, 0.15)])
def test_hbgts_forwards_once_per_scored_candidate_and_never_again_to_apply_it(monkeypatch, lazy, ratio):
    forwards = []
    run_chunk = SuffixRunner.run_chunk

    def counted(self, ci, start, record, *args, **kwargs):
        forwards.append((ci, start, record))
        return run_chunk(self, ci, start, record, *args, **kwargs)

    monkeypatch.setattr(SuffixRunner, "run_chunk", counted)
    moves, _, _, lines = search_resnet20(hbgs_pkg, "hbgts", ratio=ratio, lazy=lazy)
    evaluations = int(re.search(r"(\d+) network evaluations", lines[-1]).group(1))
    chunks = 2
    assert len(moves) >= 4
    # the first forward of the working copy, then one per candidate scored
    assert len(forwards) == chunks * (1 + evaluations)
    assert sum(record for _, _, record in forwards) == chunks


def test_larger_forward_chunks_give_every_candidate_the_same_error(monkeypatch):
    """HBGTS forwards several CHUNK-row pieces at once and sums its error per piece: every
    scored error is the same number as with one forward per piece, and so is every move."""
    search_mod = hbgs_pkg.search
    errors: list[tuple[str, int, float]] = []
    output_error = Search.output_error

    def logged(self, n, b):
        e = output_error(self, n, b)
        errors.append((n, b, e, len(self.runner.chunks)))
        return e

    monkeypatch.setattr(Search, "output_error", logged)
    monkeypatch.setattr(search_mod, "CHUNK", 2)
    runs = {}
    for forward in (2, 4):
        monkeypatch.setattr(search_mod, "FORWARD_CHUNK", forward)
        errors.clear()
        moves, kept, _, _ = search_resnet20(hbgs_pkg, "hbgts", ratio=0.3, lazy=True)
        runs[forward] = (moves, kept, [e[:3] for e in errors], {e[3] for e in errors})
    assert runs[2][3] == {4} and runs[4][3] == {2}  # 8 images: four forwards per candidate, then two
    assert len(runs[4][2]) > 20
    assert runs[4][2] == runs[2][2]  # the same errors, bit for bit
    assert runs[4][:2] == runs[2][:2]
