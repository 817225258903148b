"""Promises of the leaderboard: a row is one configuration, nothing vanishes, nothing foreign is
overwritten, one bad record never blocks the pages, and the output does not depend on the
process or the order of the files."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _records import SMOKE, put, rec, table_rows
from _support import one_line_error, prunebench
from typer.testing import CliRunner

from prunebench.cli import app
from prunebench.errors import ConfigError
from prunebench.leaderboard import build, check_stale, write


def test_runs_that_differ_in_anything_but_the_seed_are_separate_labelled_rows(tmp_path):
    # 1 shot, 2 shots, and 2 shots + 1 epoch between them: three configurations, never one mean
    put(tmp_path, "a", rec(final=50.0))
    put(tmp_path, "b", rec(final=54.0, shots=2))
    put(tmp_path, "c", rec(final=58.0, shots=2, shot_epochs=1.0))
    rows = table_rows(build(tmp_path)["digits-resnet20.md"])
    assert [(r[1], r[2]) for r in rows] == [
        ("l1 · shots 2 · shot epochs 1", "58.00"), ("l1 · shots 2 · shot epochs 0", "54.00"),
        ("l1 · shots 1 · shot epochs 0", "50.00")]


def test_identity_separates_rows_and_shared_options_go_to_the_caption(tmp_path):
    ident = {"criterion": "l1", "seed": 0, "scope": "all", "layer_ratios": None}
    for seed, final in ((0, 70.0), (1, 72.0)):
        put(tmp_path, f"all{seed}", rec(seed=seed, final=final, scope="all", identity={**ident, "seed": seed}))
    page = build(tmp_path)["digits-resnet20.md"]
    rows = table_rows(page)
    assert len(rows) == 1 and rows[0][1] == "l1" and rows[0][2] == "71.00 ± 1.41"  # seeds averaged
    assert "All rows: scope all, baseline trained, precision not recorded." in page
    # a second scope in the same table splits the rows and names the scope in each label
    put(tmp_path, "inner", rec(final=60.0, scope="inner", identity={**ident, "scope": "inner"}))
    labels = [r[1] for r in table_rows(build(tmp_path)["digits-resnet20.md"])]
    assert labels == ["l1 · scope all", "l1 · scope inner"]


def test_a_non_finite_result_never_vanishes_from_the_mean(tmp_path):
    put(tmp_path, "ok", rec(seed=0, final=80.0))
    put(tmp_path, "nan", rec(seed=1, final=float("nan")))
    put(tmp_path, "r0", rec("random", seed=0, final=40.0))
    rows = table_rows(build(tmp_path)["digits-resnet20.md"])
    assert rows[0][1] == "random"  # a NaN row ranks last, never first by a partial mean
    assert rows[1][1] == "l1" and rows[1][2] == "NaN (1 of 2 seeds non-finite)" and rows[1][-1] == "2"


def test_one_bad_record_is_reported_and_skipped_without_blocking_the_pages(tmp_path):
    records = tmp_path / "records"
    put(records, "good", rec())
    (records / "truncated.json").write_text('{"schema": "prunebench-result/1", "status": "comp')
    (records / "list.json").write_text("[1, 2, 3]")
    put(records, "missing", {k: v for k, v in rec().items() if k != "final"})
    put(records, "badfield", rec(target={"metric": "macs"}))
    res = CliRunner().invoke(app, ["leaderboard", "--records", str(records), "--out", str(tmp_path / "lb")])
    assert res.exit_code == 0, res.output
    for name in ("truncated.json", "list.json", "missing.json", "badfield.json"):
        assert f"skipped {records / name}" in res.output
    index = (tmp_path / "lb" / "README.md").read_text()
    assert "## Records not used" in index and "- `missing.json`: complete record lacks final" in index
    assert table_rows((tmp_path / "lb" / "digits-resnet20.md").read_text())[0][2] == "80.00"


@pytest.mark.parametrize("name,content", [("README.md", "# my project notes\n"), ("results.csv", "a,b\n1,2\n")])
def test_out_never_overwrites_files_prunebench_did_not_generate(tmp_path, name, content):
    records, out = tmp_path / "records", tmp_path / "out"
    put(records, "a", rec())
    out.mkdir()
    (out / name).write_text(content)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write(build(records), out)
    assert (out / name).read_text() == content and sorted(p.name for p in out.iterdir()) == [name]
    res = CliRunner().invoke(app, ["leaderboard", "--records", str(records), "--out", str(out)])
    assert isinstance(res.exception, ConfigError) and "refusing to overwrite" in str(res.exception)
    # its own files it regenerates freely
    (out / name).unlink()
    write(build(records), out)
    write(build(records), out)
    assert check_stale(records, out) == []


_DIGEST = """
import hashlib, sys
from pathlib import Path
from prunebench.leaderboard import build
files = build(Path(sys.argv[1]))
print(hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest())
"""


def test_output_is_identical_across_hash_seeds_and_file_orders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    recs = []
    for crit in ("l1", "random", "coring"):
        for seed in (0, 1):
            for ratio in (0.3, 0.5):
                recs.append(rec(crit, seed=seed, ratio=ratio, final=70 + seed + 10 * ratio + len(crit),
                                criterion_params={"distance": "cosine"} if crit == "coring" else {}))
    for i, r in enumerate(recs):  # the same records under names that sort in opposite orders
        put(a, f"{i:03d}", r)
        put(b, f"{len(recs) - i:03d}", r)

    def digest(folder: Path, seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _DIGEST, str(folder)], env=env, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    assert digest(a, "1") == digest(a, "2") == digest(b, "3")
    assert hashlib.sha256(repr(sorted(build(a).items())).encode()).hexdigest() == digest(a, "0")


def test_a_copy_of_a_record_is_never_counted_as_another_seed(tmp_path):
    records = tmp_path / "records"
    seeds = [rec(seed=0, final=80.0), rec(seed=1, final=82.0)]
    for r in seeds:
        put(records, r["run_id"], r)
    shutil.copy(records / f"{seeds[1]['run_id']}.json", records / "copy.json")  # cp rec.json copy.json
    put(records, "failed-copy", {**seeds[0], "status": "failed", "error": "RuntimeError: x"})
    res = CliRunner().invoke(app, ["leaderboard", "--records", str(records), "--out", str(tmp_path / "lb")])
    assert res.exit_code == 0, res.output
    (row,) = table_rows((tmp_path / "lb" / "digits-resnet20.md").read_text())
    assert row[2] == "81.00 ± 1.41" and row[-1] == "2"  # two seeds, not three
    assert f"skipped {records / 'copy.json'}: the same run as {seeds[1]['run_id']}.json" in res.output
    assert f"skipped {records / 'failed-copy.json'}: the same run as {seeds[0]['run_id']}.json" in res.output
    res = CliRunner().invoke(app, ["records", "check", str(records)])
    assert res.exit_code == 1 and f"duplicate record: {records / 'copy.json'}: the same run as" in res.output


HOSTILE_TEXT = "x|99.99|<b>bold</b> & `code` [link](http://example.com) $x$ *em* ~~s~~ #h\r\nnext\u202eline"


def test_nothing_a_user_typed_reaches_a_page_unescaped(tmp_path):
    import csv
    import io

    records, out = tmp_path / "records", tmp_path / "lb"
    put(records, "a", rec(final=80.0, criterion_params={"note": HOSTILE_TEXT}, scope="in|ner",
                          hardware={"device": "<script>cpu</script>"}, versions={"torch": "2|<i>", "prunebench": "0"},
                          budget={**SMOKE, "name": "smoke|<u>"}))
    put(records, "b", rec(seed=1, final=70.0, criterion_params={"note": "plain"}, scope="in|ner",
                          hardware={"device": "<script>cpu</script>"}, versions={"torch": "2|<i>", "prunebench": "0"},
                          budget={**SMOKE, "name": "smoke|<u>"}))
    (records / "bad|<img src=x>`.json").write_text("[]")
    res = CliRunner().invoke(app, ["leaderboard", "--records", str(records), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page, index = (out / "digits-resnet20.md").read_text(), (out / "README.md").read_text()
    for text in (page, index):
        assert "<b>" not in text and "<script>" not in text and "<u>" not in text and "<img" not in text
        assert not re.search(r"(?<!\\)\]\(http", text) and "\r" not in text and "\u202e" not in text
    # a markdown table splits its cells at every "|" that is not escaped as "\\|"
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in page.splitlines()
            if line.startswith("| ")]
    assert {len(r) for r in rows} == {13}  # no cell is split or added (13 columns, the 95 % CI among them)
    assert [(r[2], r[-1]) for r in rows[1:]] == [("80.00", "1"), ("70.00", "1")]
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "\\[link\\](http://example.com)" in page
    assert "x\\|99.99\\|" in page and "\\\\r\\\\nnext\\\\u202eline" in page
    # the CSV holds the text as it was typed, quoted so that it stays one field
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and HOSTILE_TEXT in table[0]["criterion"] and table[0]["budget"].startswith("smoke|<u>")
    page_csv = (out / "digits-resnet20.csv").read_bytes().decode("utf-8")
    assert list(csv.reader(io.StringIO(page_csv, newline="")))[1][5] == table[0]["criterion"]


@pytest.mark.parametrize("field,value,why", [
    ("final", {"top1": 150.0}, "final.top1 is 150.0, not a percentage in [0, 100]"),
    ("baseline", {"top1": -3.0}, "baseline.top1 is -3.0, not a percentage in [0, 100]"),
    ("oneshot", {"top1": float("inf")}, "oneshot.top1 is inf, not a percentage in [0, 100]"),
    ("macs", {"before": 100, "after": 120}, "macs after compression (120) exceed those before (100)"),
    ("params", {"before": 0, "after": 5}, "params before/after are 0/5, not positive counts"),
    ("achieved", {"macs_reduction": 0.9, "params_reduction": 0.5}, "achieved.macs_reduction 0.9 disagrees with"),
    ("seed", -1, "seed is -1, not an integer in [0, 2**64)"),
    ("criterion_seconds", -2.0, "criterion_seconds is -2.0, not a time >= 0"),
    ("latency", {"speedup_batch1": float("nan")}, "latency.speedup_batch1 is nan, not a positive ratio"),
    ("target", {"metric": "macs", "ratio": 1.5, "tolerance": 0.01}, "target.ratio is 1.5, not a fraction in (0, 1)"),
])
def test_implausible_values_are_never_published_and_records_check_names_them(tmp_path, field, value, why):
    records = tmp_path / "records"
    put(records, "good", rec(final=80.0))
    put(records, "odd", {**rec(seed=1, final=90.0), field: value})
    res = CliRunner().invoke(app, ["leaderboard", "--records", str(records), "--out", str(tmp_path / "lb")])
    assert res.exit_code == 0, res.output
    assert f"skipped {records / 'odd.json'}: implausible: {why}" in res.output
    assert [r[2] for r in table_rows((tmp_path / "lb" / "digits-resnet20.md").read_text())] == ["80.00"]
    assert "odd.json" in (tmp_path / "lb" / "README.md").read_text()
    res = CliRunner().invoke(app, ["records", "check", str(records)])
    assert res.exit_code == 1 and f"implausible record: {records / 'odd.json'}: implausible: {why}" in res.output


def test_records_check_reports_a_non_finite_result_the_page_shows_as_nan(tmp_path):
    put(tmp_path, "ok", rec(seed=0, final=80.0))
    put(tmp_path, "nan", rec(seed=1, final=float("nan")))
    res = CliRunner().invoke(app, ["records", "check", str(tmp_path)])
    assert res.exit_code == 1 and f"implausible record: {tmp_path / 'nan.json'}: implausible: final.top1 is nan" \
        in res.output


@pytest.mark.parametrize("content", ["nothing", "failed records only"])
def test_a_records_folder_with_nothing_to_publish_is_a_one_line_error(tmp_path, content):
    records, out = tmp_path / "records", tmp_path / "lb"
    records.mkdir()
    if content == "failed records only":
        put(records, "f1", {**rec(), "status": "failed", "error": "RuntimeError: x"})
        (records / "broken.json").write_text("{")
    proc = prunebench("leaderboard", "--records", records, "--out", out)
    line = one_line_error(proc)
    assert f"no complete, usable record in {records}" in line and "nothing written" in line
    assert not out.exists()  # no empty results.csv
    if content == "failed records only":
        assert f"skipped {records / 'f1.json'}: a failed record (only complete runs are published)" in proc.stderr
        assert f"skipped {records / 'broken.json'}: not valid JSON" in proc.stderr
