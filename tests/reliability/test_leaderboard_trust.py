"""Promises of the leaderboard: a row is one configuration, nothing vanishes, nothing foreign is
overwritten, one bad record never blocks the pages, and the output does not depend on the
process or the order of the files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _records import put, rec, table_rows
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
