"""The statistics behind "beats random?", the adaptive-BN column, provenance and reported tables."""

from __future__ import annotations

import math

from _records import put, rec, table_rows

from prunebench.leaderboard import build
from prunebench.leaderboard.reported import REPORTED, reported_for
from prunebench.leaderboard.stats import versus_random, welch_greater
from prunebench.results.records import write_atomic


def test_welch_p_value_matches_the_formula():
    a, b = [78.0, 79.0, 80.5], [70.0, 72.5]
    ma, mb = sum(a) / 3, sum(b) / 2
    va = sum((x - ma) ** 2 for x in a) / 2
    vb = sum((x - mb) ** 2 for x in b) / 1
    se2 = va / 3 + vb / 2
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / 3) ** 2 / 2 + (vb / 2) ** 2 / 1)
    from scipy import stats

    assert math.isclose(welch_greater(a, b), float(stats.t.sf(t, df)), rel_tol=1e-9)
    assert welch_greater(b, a) > 0.5  # one-sided: the other direction is not "greater"


def test_one_seed_is_never_a_yes():
    assert versus_random([99.0], [10.0, 11.0]).text == "not tested (1 seed)"
    assert versus_random([99.0, 99.5], [10.0]).text == "not tested (1 seed)"
    assert versus_random([99.0, 99.0], [10.0, 10.0]).text == "not tested (no spread)"
    assert versus_random([80.0, 81.0], None).text == "no random control"
    assert versus_random([80.0, 81.0], [80.5, 80.0]).text.startswith("no (p=")


def test_oneshot_bn_column_and_per_option_random_matching(tmp_path):
    for seed in (0, 1):
        put(tmp_path, f"l1{seed}", rec(seed=seed, final=80.0 + seed, oneshot_bn={"top1": 61.5 + seed}))
        put(tmp_path, f"r{seed}", rec("random", seed=seed, final=70.0 + seed))
        # a random control of another scope must not be the reference of the inner-scope rows
        put(tmp_path, f"ra{seed}", rec("random", seed=seed, final=85.0 + seed, scope="all"))
    rows = {r[1]: r for r in table_rows(build(tmp_path)["digits-resnet20.md"])}
    l1 = rows["l1 · scope inner"]
    assert l1[6] == "62.00" and l1[7].startswith("yes (p=")
    assert rows["random · scope all"][7] == "control"


def test_pretrained_provenance_scratch_note_and_reported_table(tmp_path):
    info = {"source": "pretrained", "zoo": {"name": "resnet56", "file": "resnet56-4bfd9763.th"},
            "adaptation": {"epochs": 3, "top1_before": 83.2, "top1_after": 90.6}}
    for crit in ("l1", "random"):
        r = rec(crit, final=88.0, arch="resnet56", dataset="cifar10-jpeg", baseline_info=info,
                baseline={"top1": 90.6})
        write_atomic(tmp_path / f"{crit}.json", r)
    page = build(tmp_path)["cifar10-jpeg-resnet56.md"]
    assert ("Baseline (budget `smoke`): pretrained resnet56 (adapted), top-1 90.60; adapted to `cifar10-jpeg` "
            "by a 3-epoch fine-tune on its training split: 83.20 → 90.60") in page
    assert "No `scratch` control in this table: the baseline is a converged pretrained checkpoint" in page
    published = page.split("## Published numbers for resnet56 (reported, not reproduced)")[1]
    assert "| HRank (Lin et al., CVPR 2020)" in published and "93.26" in published and "-0.09" in published
    # the ranked tables never contain a published row
    ranked = page.split("## Published numbers")[0]
    assert "HRank" not in ranked and "CORING-V-5" not in ranked


def test_reported_entries_are_consistent():
    assert {r.arch for r in REPORTED} == {"resnet56", "resnet20"}
    for r in REPORTED:
        if r.base is not None and r.pruned is not None:
            assert 80 < r.pruned < 100 and 80 < r.base < 100
        assert r.source and r.finetune
    assert reported_for("cifar10-jpeg", "resnet56") == reported_for("cifar10", "resnet56")
    assert reported_for("digits", "resnet56") == []
