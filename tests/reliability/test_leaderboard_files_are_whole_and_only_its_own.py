"""Promise: the leaderboard writes whole files, and removes only files it made.

Every file of the leaderboard folder (pages, CSVs, plots, ``results.csv``) is written to a
temporary file and renamed into place, so a failing write (here a real file-size limit)
leaves the previous file as it was, never half of a new one. Clean-up of a page that no
longer exists removes the page, its CSV and the plots the page shows, and nothing else: a
user's file that happens to share the page's name stays.
"""

from __future__ import annotations

import resource
import signal

import pytest
from _records import put, rec

from prunebench.leaderboard import build, write
from prunebench.leaderboard.pages import CSV_COLUMNS


def test_a_failing_write_leaves_the_previous_results_csv_whole(tmp_path):
    out = tmp_path / "leaderboard"
    out.mkdir()
    header = ",".join(CSV_COLUMNS)
    old = (header + "\n" + ",".join(["x"] * len(CSV_COLUMNS)) + "\n").encode()
    (out / "results.csv").write_bytes(old)
    new = header + "\n" + "".join(",".join([str(i)] * len(CSV_COLUMNS)) + "\n" for i in range(2000))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(old) + 4096, hard))
    try:
        with pytest.raises(OSError):
            write({"results.csv": new}, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert (out / "results.csv").read_bytes() == old
    assert [p.name for p in out.iterdir()] == ["results.csv"]  # no temporary file left either


def test_clean_up_removes_only_the_files_of_the_obsolete_page(tmp_path):
    records, out = tmp_path / "records", tmp_path / "leaderboard"
    for ratio in (0.3, 0.5):  # two targets: the page has a plot
        put(records, f"r{ratio}", rec(ratio=ratio))
    made = write(build(records), out)
    generated = {p.name for p in made} - {"README.md", "results.csv"}
    assert generated == {"digits-resnet20.md", "digits-resnet20.csv", "digits-resnet20.smoke.png"}
    png = (out / "digits-resnet20.smoke.png").read_bytes()
    users = {  # the user's own files, named after the page
        "digits-resnet20.txt": b"my notes\n",
        "digits-resnet20.notes.md": b"# my notes on this page\n",
        "digits-resnet20.old.csv": (",".join(CSV_COLUMNS) + "\n").encode(),  # even with the leaderboard's columns
        "digits-resnet20.draft.png": png,  # even a real PNG: the page does not show it
        "digits-resnet20": b"no suffix\n",
    }
    for name, data in users.items():
        (out / name).write_bytes(data)
    for ratio in (0.3, 0.5):  # the records now make a page for another architecture only
        (records / f"r{ratio}.json").unlink()
    put(records, "vgg", rec(arch="vgg16_bn"))
    write(build(records), out)
    names = {p.name for p in out.iterdir()}
    assert not names & generated  # the obsolete page, its CSV and its plot are gone
    for name, data in users.items():
        assert (out / name).read_bytes() == data, name
