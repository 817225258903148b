"""A leaderboard that decides: intervals, Holm-adjusted verdicts, pairwise tests, the ranking
across budgets (Kendall's τ with a bootstrap over seeds), and the smaller-dense controls."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from _records import SMOKE, put, rec, table_rows

from prunebench.config.budgets import ADAPTATION_FIELDS, BUDGETS
from prunebench.leaderboard import build
from prunebench.leaderboard.pages import ranked
from prunebench.leaderboard.ranking import Stage, bootstrap_tau, holding, kendall_tau, ranks
from prunebench.leaderboard.rows import frame
from prunebench.leaderboard.stats import holm, pairwise, t_interval, welch_two_sided

# a second named budget: `demo` fine-tunes 3 epochs against `smoke`'s 2
DEMO = {k: v for k, v in BUDGETS["demo"].resolved().items() if k not in ADAPTATION_FIELDS}


# --- statistics against independent values -----------------------------------------------------


def test_t_interval_matches_scipy_and_the_formula():
    from scipy import stats

    vals = [84.1, 85.3, 84.8, 85.9, 84.4]
    lo, hi = t_interval(vals)
    mean = sum(vals) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)
    # t(0.975, 4) = 2.776445105 (tables); the interval is mean ± t · sd / sqrt(n)
    assert math.isclose(hi - mean, 2.776445105 * sd / math.sqrt(5), rel_tol=1e-8)
    ref = stats.t.interval(0.95, 4, loc=mean, scale=stats.sem(vals))
    assert math.isclose(lo, ref[0], rel_tol=1e-12) and math.isclose(hi, ref[1], rel_tol=1e-12)
    assert t_interval([80.0]) is None
    assert t_interval([80.0, float("nan")]) is None


def test_holm_matches_a_hand_computed_family():
    # m = 4 tested: sorted 0.01, 0.02, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.04, 0.06, 0.06, 0.04 → monotone
    assert holm([0.03, None, 0.01, 0.04, 0.02]) == pytest.approx([0.06, None, 0.04, 0.06, 0.06])
    # capped at 1, and an empty family
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([None, None]) == [None, None]
    # equal to statsmodels' "holm" on another family (values written out from its documented algorithm)
    assert holm([0.001, 0.01, 0.04, 0.2]) == pytest.approx([0.004, 0.03, 0.08, 0.2])


def test_welch_two_sided_is_twice_the_smaller_one_sided_p():
    from prunebench.leaderboard.stats import welch_greater

    a, b = [78.0, 79.0, 80.5], [76.0, 77.5, 77.0]
    assert welch_two_sided(a, b) == pytest.approx(2 * welch_greater(a, b))
    assert welch_two_sided([1.0], [2.0, 3.0]) is None


def test_pairwise_adjusts_over_the_tables_pairs():
    rows = [[90.0, 90.5, 91.0], [80.0, 80.4, 80.9], [80.1, 80.6, 80.2]]
    res = pairwise(rows)
    assert [(r.a, r.b) for r in res] == [(0, 1), (0, 2), (1, 2)]
    raw = [welch_two_sided(rows[a], rows[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert [r.p for r in res] == pytest.approx(raw)
    assert [r.p_adjusted for r in res] == pytest.approx(holm(raw))
    assert res[0].a_better and res[1].a_better
    assert res[0].p_adjusted < 0.05 and res[2].p_adjusted > 0.05


# --- Kendall's τ and its bootstrap on a hand-made example ------------------------------------------


def test_kendall_tau_and_ranks_by_hand():
    # pairs of (1,2,3,4) vs (1,3,2,4): 5 concordant, 1 discordant → τ = 4/6
    assert kendall_tau([4, 3, 2, 1], [4, 2, 3, 1]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert ranks([70.0, 90.0, 80.0, 90.0]) == [4, 1, 3, 1]


def test_bootstrap_interval_of_a_ranking_that_never_changes_is_a_point():
    # three rows far apart: every resample keeps the order in both stages → τ = 1 in every replicate
    a = Stage("a", "x", "final")
    b = Stage("b", "y", "final")
    samples = {"a": [{0: 90.0, 1: 91.0}, {0: 80.0, 1: 81.0}, {0: 70.0, 1: 71.0}],
               "b": [{0: 95.0, 1: 96.0, 2: 95.5}, {0: 85.0, 1: 84.0, 2: 86.0}, {0: 60.0, 1: 61.0, 2: 62.0}]}
    assert bootstrap_tau(samples, (a, b), n=200) == (1.0, 1.0)


def test_bootstrap_interval_by_hand_on_two_seeds():
    # Rows 1 and 2 swap in stage b exactly when the resample of row 2 takes its high seed twice.
    a = Stage("a", "x", "final")
    b = Stage("b", "y", "final")
    samples = {"a": [{0: 90.0, 1: 90.0}, {0: 80.0, 1: 80.0}, {0: 70.0, 1: 70.0}],
               "b": [{0: 85.0, 1: 85.0}, {0: 80.0, 1: 90.0}, {0: 70.0, 1: 70.0}]}
    # row 2's mean in b: 80 (p 1/4), 85 (1/2: a tie with row 1), 90 (1/4: above row 1)
    # τ-b: no swap → 1; tie → 2/sqrt(3·2)·... computed by scipy below; swap → 1/3
    from scipy import stats

    tie = stats.kendalltau([90, 80, 70], [85, 85, 70]).statistic
    lo, hi = bootstrap_tau(samples, (a, b), n=2000)
    assert hi == 1.0 and lo == pytest.approx(1 / 3)
    assert 1 / 3 < tie < 1  # the middle outcome lies inside the interval
    # seeded: the same interval every time
    assert bootstrap_tau(samples, (a, b), n=2000) == (lo, hi)


def _rows(records):
    return frame([(f"f{i}.json", r) for i, r in enumerate(records)])


def test_holding_ranks_each_stage_and_pairs_the_stages_of_one_budget():
    recs = []
    for seed in (0, 1, 2):
        for crit, short, bn, longer in (("l1", 80.0, 60.0, 85.0), ("random", 70.0, 40.0, 84.0),
                                        ("coring", 75.0, 65.0, 70.0)):
            recs.append(rec(crit, seed=seed, final=short + seed, oneshot_bn={"top1": bn + seed}))
            recs.append(rec(crit, seed=seed, final=longer + seed, budget=DEMO))
    df = _rows(recs)
    h = holding(df, {"smoke": 2.0, "demo": 3.0}, n=100)
    assert [s.name for s in h.stages] == ["0 ep (one-shot + BN)", "2 ep (`smoke`)", "3 ep (`demo`)"]
    # 0 ep: coring 66 > l1 61 > random 41; smoke: l1 81 > coring 76 > random 71; demo: l1 86 > random 85 > coring 71
    names = [df[df["config"] == c]["name"].iloc[0] for c in h.configs]
    got = {s.name: dict(zip(names, ranks(h.means[s.name]), strict=True)) for s in h.stages}
    assert got["0 ep (one-shot + BN)"] == {"coring": 1, "l1": 2, "random": 3}
    assert got["2 ep (`smoke`)"] == {"l1": 1, "coring": 2, "random": 3}
    assert got["3 ep (`demo`)"] == {"l1": 1, "random": 2, "coring": 3}
    taus = {(a.name, b.name): t for a, b, t, _lo, _hi in h.taus}
    assert taus[("0 ep (one-shot + BN)", "2 ep (`smoke`)")] == pytest.approx(1 / 3)
    assert taus[("2 ep (`smoke`)", "3 ep (`demo`)")] == pytest.approx(1 / 3)


def test_the_page_has_the_ranking_section_with_tau(tmp_path):
    for seed in (0, 1, 2):
        for crit, short, longer in (("l1", 80.0, 85.0), ("random", 70.0, 84.0), ("coring", 75.0, 70.0)):
            put(tmp_path, f"{crit}{seed}", rec(crit, seed=seed, final=short + seed, oneshot_bn={"top1": 50.0 + seed}
                                               if crit != "coring" else {"top1": 60.0 + seed}))
            put(tmp_path, f"{crit}{seed}l", rec(crit, seed=seed, final=longer + seed, budget=DEMO))
    page = build(tmp_path)["digits-resnet20.md"]
    section = page.split("## Does the ranking hold? macs -50%")[1]
    assert "| 2 ep (`smoke`) → 3 ep (`demo`)" in section
    assert "τ" in section and "95 % interval" in section
    assert "From 2 ep (`smoke`) to 3 ep (`demo`): no row moves 3 or more places." in section
    # l1 beats random after 2 epochs (80-82 against 70-72) but not after 3 (85-87 against 84-86)
    assert "- Verdicts against `random` that change with the budget: " in section
    assert "l1 (`smoke` yes, `demo` no)" in section


def test_a_budget_without_its_random_control_changes_no_verdict(tmp_path):
    for seed in (0, 1, 2):
        for crit, short in (("l1", 80.0), ("random", 70.0), ("coring", 75.0), ("qsfm", 72.0)):
            put(tmp_path, f"{crit}{seed}", rec(crit, seed=seed, final=short + seed, oneshot_bn={"top1": 50.0 + seed}))
            if crit != "random":  # the longer budget has not run its control yet
                put(tmp_path, f"{crit}{seed}l", rec(crit, seed=seed, final=short + 5 + seed, budget=DEMO))
    page = build(tmp_path)["digits-resnet20.md"]
    section = page.split("## Does the ranking hold? macs -50%")[1]
    assert "no random control" in page and "Verdicts against `random` that change" not in section
    assert "- No row's verdict against `random` changes with the budget (`demo`: no row tested against `random` yet)." \
        in section


# --- verdicts and tables on a page --------------------------------------------------------------------


def test_beats_random_is_holm_adjusted_over_the_page(tmp_path):
    finals = {"l1": (80.0, 80.5, 81.0), "coring": (76.0, 77.0, 76.5), "random": (70.0, 71.0, 70.6)}
    for ratio in (0.5, 0.7):
        for crit, vals in finals.items():
            for seed, v in enumerate(vals):
                put(tmp_path, f"{crit}{seed}{ratio}", rec(crit, seed=seed, final=v - 10 * (ratio > 0.6), ratio=ratio))
    files = build(tmp_path)
    page = files["digits-resnet20.md"]
    assert "p-values are Holm-adjusted over the 4 rows tested on this page" in page
    from prunebench.leaderboard.stats import welch_greater

    raw = [welch_greater(finals[c], finals["random"]) for c in ("l1", "coring")] * 2
    adjusted = holm(raw)
    csv = pd.read_csv(pd.io.common.StringIO(files["digits-resnet20.csv"]))
    l1 = csv[csv["criterion"] == "l1"]
    assert list(l1["p_vs_random"]) == pytest.approx([round(raw[0], 4)] * 2, abs=1e-4)
    assert list(l1["p_vs_random_holm"]) == pytest.approx([round(min(adjusted), 4)] * 2, abs=1e-4)
    lo, hi = t_interval(finals["l1"])
    assert list(l1["final_top1_ci_low"])[0] == pytest.approx(round(lo, 4))
    rows = {r[1]: r for r in table_rows(page.split("macs -50% · budget `smoke`")[1].split("<details>")[0])}
    assert rows["l1"][3] == f"{lo:.2f} – {hi:.2f}"


def test_a_ranking_table_refuses_to_mix_budgets():
    df = _rows([rec("l1", seed=0), rec("l1", seed=1, budget=DEMO), rec("random", seed=0)])
    with pytest.raises(ValueError, match="mixes budgets"):
        ranked(df)
    # the page ranks each budget in its own table
    assert sorted(df["budget"].unique()) == ["demo", "smoke"]


def test_budgets_of_one_name_but_other_numbers_are_never_one_table(tmp_path):
    other = {**SMOKE, "finetune_epochs": 9}
    for seed in (0, 1):
        put(tmp_path, f"a{seed}", rec("l1", seed=seed, final=80.0))
        put(tmp_path, f"b{seed}", rec("l1", seed=seed, final=90.0, budget=other))
    page = build(tmp_path)["digits-resnet20.md"]
    headings = [line for line in page.splitlines() if line.startswith("## digits")]
    assert len(headings) == 2 and any("smoke~" in h for h in headings)


# --- the smaller-dense control ---------------------------------------------------------------------------


def _dense(small, seed, final, macs, **over):
    return rec("dense", seed=seed, final=final, ratio=round(macs, 4), dense=small, criterion_kind="control",
               allocation=None, achieved={"macs_reduction": macs, "params_reduction": macs}, oneshot_bn=None,
               **over)


def test_dense_rows_form_their_own_series_and_answer_the_target(tmp_path):
    for seed in (0, 1, 2):
        put(tmp_path, f"l1-{seed}", rec("l1", seed=seed, final=85.0 + 0.1 * seed))
        put(tmp_path, f"rand-{seed}", rec("random", seed=seed, final=80.0 + 0.3 * seed))
        put(tmp_path, f"l1-7-{seed}", rec("l1", seed=seed, final=75.0 + 0.1 * seed, ratio=0.7))
        put(tmp_path, f"rand-7-{seed}", rec("random", seed=seed, final=70.0 + 0.2 * seed, ratio=0.7))
        put(tmp_path, f"d32-{seed}", _dense("resnet32", seed, 82.0 + 0.2 * seed, 0.4526))
        put(tmp_path, f"d20-{seed}", _dense("resnet20", seed, 79.0 + 0.1 * seed, 0.6768))
    files = build(tmp_path)
    page = files["digits-resnet20.md"]
    # a table of their own, not ranked among the pruned rows and not a target of their own
    dense_table = page.split("smaller dense networks (control) · budget `smoke`")[1].split("\n## ")[0]
    rows = {r[0]: r for r in table_rows(dense_table)}
    assert set(rows) == {"dense resnet20", "dense resnet32"}
    assert rows["dense resnet32"][1] == "82.20 ± 0.20" and rows["dense resnet32"][5] == "45.3%"
    assert "macs -45%" not in page and "macs -68%" not in page
    ranked_50 = page.split("macs -50% · budget `smoke`")[1].split("\n## ")[0]
    assert "dense" not in "".join(r[1] for r in table_rows(ranked_50.split("*Dense control:*")[0]))
    # one sentence per target: the nearest dense network, and who beats it
    assert ("*Dense control:* dense resnet32 (45.3% MACs ↓, 82.20 ± 0.20) is the nearest smaller network. "
            "Pruning beats it: l1") in ranked_50
    ranked_70 = page.split("macs -70% · budget `smoke`")[1]
    assert "*Dense control:* dense resnet20 (67.7% MACs ↓, 79.10 ± 0.10) is the nearest smaller network. " \
           "No pruned row beats it" in ranked_70
    # the index lists only the pruning targets
    assert "macs -50%, macs -70% |" in files["README.md"]
    assert "digits-resnet20.smoke.png" in files


def test_no_dense_network_near_a_target_is_said_so(tmp_path):
    for seed in (0, 1):
        put(tmp_path, f"l1-{seed}", rec("l1", seed=seed, final=85.0 + seed))
        put(tmp_path, f"d44-{seed}", _dense("resnet44", seed, 88.0 + seed, 0.2206))
    page = build(tmp_path)["digits-resnet20.md"]
    assert ("*Dense control:* no smaller dense network lies within 10 points of this target "
            "(dense resnet44 22.1% MACs ↓).") in page
