"""Leaderboard pages, CSVs and trade-off plots, built from records fabricated here."""

from __future__ import annotations

import io
import struct

import pandas as pd
import pytest
from typer.testing import CliRunner

from prunebench.cli import app
from prunebench.config.budgets import ADAPTATION_FIELDS, BUDGETS
from prunebench.leaderboard import budget_label, build, check_stale, write
from prunebench.results.records import write_atomic

# a record of the unmodified preset, as a run from a trained baseline records it (no adaptation fields)
SMOKE = {k: v for k, v in BUDGETS["smoke"].resolved().items() if k not in ADAPTATION_FIELDS}

# final top-1 at MACs -30/-50/-70 % per criterion: l1 best, random worst
FINALS = {"l1": (88.0, 84.0, 78.0), "random": (85.0, 80.0, 70.0), "scratch": (86.0, 81.0, 74.0)}


def record(criterion, seed, ratio, final, arch="resnet20", metric="macs", budget=None, **over):
    rec = {
        "schema": "prunebench-result/1", "run_id": f"{arch}-{criterion}-{metric}{ratio}-s{seed}", "status": "complete",
        "criterion": criterion, "criterion_kind": "score", "criterion_params": {}, "arch": arch,
        "dataset": "digits", "budget": budget or SMOKE, "target": {"metric": metric, "ratio": ratio, "tolerance": 0.01},
        "seed": seed, "allocation": "uniform", "started": "2026-03-01T10:00:00+00:00",
        "finished": f"2026-03-0{1 + seed}T11:00:00+00:00",
        "versions": {"torch": "2.9.0", "prunebench": "0.1.0", "torch_pruning": "1.6.0"},
        "hardware": {"device": "cpu"}, "baseline": {"top1": 90.0 + seed}, "oneshot": {"top1": 40.0 + 10 * ratio},
        "final": {"top1": final + seed}, "macs": {"before": 100, "after": 100 * (1 - ratio)},
        "params": {"before": 10, "after": 10 * (1 - (ratio - 0.02))},
        "achieved": {"macs_reduction": ratio, "params_reduction": ratio - 0.02},
        "latency": {"speedup_batch1": 1 + ratio, "after": {"device": "Test CPU 3000"}}, "criterion_seconds": 0.25,
        "ledger": {}, "widths": {},
    }
    if criterion == "scratch":
        rec.update(oneshot=None, architecture_from="random")
    rec.update(over)
    return rec


@pytest.fixture
def records(tmp_path):
    d = tmp_path / "records"
    for crit, finals in FINALS.items():
        for seed in (0, 1):
            for ratio, final in zip((0.3, 0.5, 0.7), finals, strict=True):
                rec = record(crit, seed, ratio, final)
                write_atomic(d / f"{rec['run_id']}.json", rec)
    for crit in ("l1", "random"):  # a second page with a single target: no plot
        rec = record(crit, 0, 0.5, 60.0 if crit == "l1" else 50.0, arch="vgg16_bn")
        write_atomic(d / f"{rec['run_id']}.json", rec)
    return d


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_index_pages_csv_and_plot(records):
    files = build(records)
    assert set(files) == {"README.md", "results.csv", "digits-resnet20.md", "digits-resnet20.csv",
                          "digits-resnet20.smoke.png", "digits-vgg16_bn.md", "digits-vgg16_bn.csv"}
    index = files["README.md"]
    assert "[digits · resnet20](digits-resnet20.md)" in index and "[digits · vgg16_bn](digits-vgg16_bn.md)" in index
    assert "macs -30%, macs -50%, macs -70%" in index

    page = files["digits-resnet20.md"]
    # header: hardware, budget, dates, versions
    assert "Test CPU 3000" in page
    b = SMOKE
    assert (f"Budget `smoke`: baseline {b['baseline_epochs']:g} ep (lr {b['lr']:g}, {b['schedule']}), "
            f"fine-tune {b['finetune_epochs']:g} ep (lr {b['finetune_lr']:g}), batch {b['batch_size']}") in page
    assert "2026-03-01 – 2026-03-02 (18 records)" in page
    assert "prunebench 0.1.0, torch 2.9.0, torch-pruning 1.6.0" in page
    assert "![final top-1 vs MACs reduction, budget smoke](digits-resnet20.smoke.png)" in page
    # one table per target, ranked; mean ± std over the two seeds; scratch has no one-shot number
    sections = page.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        f"digits · resnet20 · macs -{r}% · budget `smoke`" for r in (30, 50, 70)]
    ranked70 = sections[2].split("<details>")[0]  # the ranked table, not the pairwise matrix below it
    rows70 = [line for line in ranked70.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[2].strip() for r in rows70] == ["l1", "scratch", "random"]
    l1 = [c.strip() for c in rows70[0].split("|")[1:-1]]
    # seeds 78, 79 vs random's 70, 71: Welch's t = 8 / sqrt(0.5/2 + 0.5/2) on 2 df, p = 0.0039 before
    # the page's Holm adjustment; the 95 % interval is 78.5 ± t(0.975, 1) · 0.5 = 78.5 ± 6.353
    assert l1 == ["1", "l1", "78.50 ± 0.71", "72.15 – 84.85", "-12.00", "47.00", "—", l1[7], "70.0%", "68.0%",
                  "1.70×", "0.25", "2"]
    assert l1[7].startswith("yes (p=")
    scratch = [c.strip() for c in rows70[1].split("|")[1:-1]]
    assert scratch[1] == "scratch" and scratch[5] == "—"
    random = [c.strip() for c in rows70[2].split("|")[1:-1]]
    assert random[1] == "random" and random[7] == "control"

    csv = pd.read_csv(io.StringIO(files["digits-resnet20.csv"]))
    assert len(csv) == 9 and set(csv["criterion"]) == {"l1", "random", "scratch"}
    assert csv["oneshot_top1"].isna().sum() == 3  # the scratch rows
    assert list(csv.columns[:6]) == ["dataset", "arch", "budget", "target", "rank", "criterion"]
    everything = pd.read_csv(io.StringIO(files["results.csv"]))
    assert len(everything) == 11

    vgg = files["digits-vgg16_bn.md"]
    assert ".png" not in vgg and "| 1      | l1" in vgg


def test_plot_is_a_deterministic_png_without_versions_or_dates(records):
    a = build(records)["digits-resnet20.smoke.png"]
    b = build(records)["digits-resnet20.smoke.png"]
    assert a == b
    assert png_size(a) == (840, 460)
    for needle in (b"matplotlib", b"Software", b"2026", b"Creation"):
        assert needle not in a


def test_budgets_with_different_numbers_are_not_averaged(tmp_path):
    d = tmp_path / "records"
    write_atomic(d / "a.json", record("l1", 0, 0.5, 80.0))
    write_atomic(d / "b.json", record("l1", 1, 0.5, 60.0, budget={**SMOKE, "finetune_epochs": 5}))
    page = build(d)["digits-resnet20.md"]
    other = budget_label({**SMOKE, "finetune_epochs": 5})
    assert other.startswith("smoke~") and budget_label(SMOKE) == "smoke"
    assert page.count("## digits · resnet20 · macs -50%") == 2 and f"budget `{other}`" in page
    assert "| 80.00 " in page and "| 61.00 " in page and "70.50" not in page  # one seed in each section


def test_check_detects_stale_tables_plots_and_leftover_pages(records, tmp_path):
    runner = CliRunner()
    out = tmp_path / "lb"

    def lb(*extra):
        return runner.invoke(app, ["leaderboard", "--records", str(records), "--out", str(out), *extra])

    assert lb().exit_code == 0
    assert lb("--check").exit_code == 0
    assert check_stale(records, out) == []

    # a new record changes the page, its CSV, the plot and the index
    rec = record("l1", 2, 0.7, 70.0)
    write_atomic(records / "extra.json", rec)
    res = lb("--check")
    assert res.exit_code == 1 and "stale" in res.output
    assert check_stale(records, out) == ["README.md", "digits-resnet20.csv", "digits-resnet20.md",
                                         "digits-resnet20.smoke.png", "results.csv"]
    assert lb().exit_code == 0 and lb("--check").exit_code == 0

    # a plot edited by hand is stale
    png = out / "digits-resnet20.smoke.png"
    png.write_bytes(png.read_bytes() + b"\0")
    assert check_stale(records, out) == ["digits-resnet20.smoke.png"]

    # a page whose records are gone is stale, and regenerating removes it (and only it)
    for p in records.glob("vgg16_bn-*.json"):
        p.unlink()
    (out / "notes.md").write_text("my own notes\n")
    assert "digits-vgg16_bn.md" in check_stale(records, out)
    assert lb().exit_code == 0 and lb("--check").exit_code == 0
    assert not (out / "digits-vgg16_bn.md").exists() and not (out / "digits-vgg16_bn.csv").exists()
    assert (out / "notes.md").exists()


def test_empty_records_make_an_index_only(tmp_path):
    (tmp_path / "r").mkdir()
    files = build(tmp_path / "r")
    assert set(files) == {"README.md", "results.csv"} and "No complete result records yet." in files["README.md"]
    write(files, tmp_path / "lb")
    assert check_stale(tmp_path / "r", tmp_path / "lb") == []


def test_a_packaged_profile_is_named_on_the_page_and_rows_without_one_do_not_say_so(tmp_path):
    from _records import put, rec, table_rows

    from prunebench.config.profiles import name_of, named_profile
    from prunebench.leaderboard import build

    ratios = {k: float(v) for k, v in named_profile("hrank-resnet56-2")["ratios"].items()}
    assert name_of(ratios) == "hrank-resnet56-2"
    assert name_of({**ratios, next(iter(ratios)): 0.33}) is None and name_of(None) is None
    put(tmp_path, "plain", rec(final=60.0))
    put(tmp_path, "named", rec(final=70.0, allocation="profile", layer_ratios=ratios))
    put(tmp_path, "own", rec(final=65.0, allocation="profile", layer_ratios={**ratios, next(iter(ratios)): 0.33}))
    labels = [r[1] for r in table_rows(build(tmp_path)["digits-resnet20.md"])]
    assert labels[0].endswith("profile hrank-resnet56-2")
    assert "profile \\#" in labels[1] and "hrank" not in labels[1]  # the user's own profile: a digest (escaped #)
    assert "profile" not in labels[2] and "none" not in labels[2]


def test_rounded_widths_are_their_own_labelled_rows_compared_with_random_rounded_alike(tmp_path):
    from _records import put, rec, table_rows

    from prunebench.leaderboard import build

    for seed in (0, 1):
        put(tmp_path, f"l1-{seed}", rec(seed=seed, final=70.0 + seed))
        put(tmp_path, f"l1r-{seed}", rec(seed=seed, final=60.0 + seed, round_to=8))
        put(tmp_path, f"rnd-{seed}", rec("random", seed=seed, final=40.0 + seed))
        put(tmp_path, f"rndr-{seed}", rec("random", seed=seed, final=65.0 + seed, round_to=8))
    rows = {r[1]: r for r in table_rows(build(tmp_path)["digits-resnet20.md"])}
    assert set(rows) == {"l1", "l1 · round to 8", "random", "random · round to 8"}
    assert rows["l1"][7].startswith("yes")  # 70.5 against the plain random's 40.5
    assert rows["l1 · round to 8"][7].startswith("no")  # 60.5 against the rounded random's 65.5
