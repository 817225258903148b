"""Reading the records folder and writing the leaderboard folder.

Reading never stops at a bad file: a truncated or foreign JSON file is reported (file and
reason) and skipped, so one broken record cannot block the page. Writing never overwrites a
file that prunebench did not generate (a page without the marker line, a CSV with other
columns), writes each file atomically (a temporary file, then a rename: a reader or a failed
write never finds half a file), and removes only files that an obsolete generated page
proves are its own: the page, its CSV (with the leaderboard's columns) and the plots the
page shows.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunebench.errors import ConfigError
from prunebench.files import replace_atomically
from prunebench.leaderboard.pages import CSV_COLUMNS, MARKER
from prunebench.records import RecordProblem, read_record


def slug(*parts: str) -> str:
    """A file-name-safe join of ``parts``."""
    return "-".join(re.sub(r"[^A-Za-z0-9_-]+", "_", p) for p in parts)


def page_stem(dataset: str, arch: str) -> str:
    return slug(dataset, arch)


def read_records(directory: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str]]]:
    """``(records, problems)``: every usable prunebench record as ``(file name, record)``, and
    ``(file name, reason)`` for each ``*.json`` file that is not one (sorted by name)."""
    records, problems = [], []
    for path in sorted(Path(directory).glob("*.json")):
        item = read_record(path)
        if isinstance(item, RecordProblem):
            problems.append((path.name, item.reason))
            continue
        try:
            _check_shapes(item)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append((path.name, f"malformed field ({type(exc).__name__}: {exc})"))
            continue
        records.append((path.name, item))
    return records, problems


def _check_shapes(rec: Mapping[str, Any]) -> None:
    """Raise when a complete record's fields do not have the shapes the pages read."""
    if rec.get("status") != "complete":
        return
    t = rec["target"]
    float(t["ratio"]), str(t["metric"])  # noqa: B018 - shape checks
    float(rec["achieved"]["macs_reduction"]), float(rec["achieved"]["params_reduction"])
    if not isinstance(rec["budget"], Mapping) or "name" not in rec["budget"]:
        raise ValueError("budget must be a table with a name")
    for key in ("baseline", "final"):
        if not isinstance(rec[key], Mapping) or "top1" not in rec[key]:
            raise ValueError(f"{key} must hold top1")


def _generated(path: Path) -> bool:
    """Whether an existing file in the output folder was written by this module."""
    if path.suffix == ".md":
        return MARKER in path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".csv":
        first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        return first == "" or first.startswith(",".join(CSV_COLUMNS[:6]) + ",")  # this or an older version
    if path.suffix == ".png":  # a plot belongs to the generated page of the same stem
        md = path.with_name(path.name.split(".")[0] + ".md")
        return md.is_file() and _generated(md)
    return False


_PLOT_LINE = re.compile(r"^!\[final top-1 vs MACs reduction, budget [^\]\n]*\]\(([A-Za-z0-9_.-]+\.png)\)$",
                        re.MULTILINE)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def obsolete(files: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Files in ``out_dir`` from pages that the records no longer produce: a generated page
    (one carrying the marker) that is not in ``files``, its ``<stem>.csv`` when that has the
    leaderboard's columns, and the ``<stem>.<budget>.png`` plots the page itself shows. Any
    other file, whatever its name, is the user's and stays."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    out = set()
    for p in out_dir.glob("*.md"):
        if p.name in files or p.name == "README.md" or not _plain_file(p):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if MARKER not in text:
            continue
        out.add(p.name)
        csv = p.with_suffix(".csv")
        if csv.name not in files and _plain_file(csv) and _generated(csv):
            out.add(csv.name)
        for name in _PLOT_LINE.findall(text):
            png = out_dir / name
            if name.startswith(p.stem + ".") and name not in files and _plain_file(png) and _is_png(png):
                out.add(name)
    return sorted(out)


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_PNG_MAGIC)) == _PNG_MAGIC


def foreign(files: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Names of files that writing ``files`` would overwrite although prunebench did not make them."""
    out_dir = Path(out_dir)
    return sorted(n for n in files if (out_dir / n).is_file() and not _generated(out_dir / n))


def write(files: Mapping[str, str | bytes], out_dir: Path) -> list[Path]:
    """Write the files (and remove the files of pages that no longer exist). Refuses, before
    touching anything, when a file it would replace was not generated by prunebench."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    clash = foreign(files, out_dir)
    if clash:
        raise ConfigError(
            f"refusing to overwrite {', '.join(str(out_dir / n) for n in clash)}: not generated by "
            "`prunebench leaderboard` (no marker line / other columns). Choose another --out or move the file away."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in obsolete(files, out_dir):
        (out_dir / name).unlink()
    written = []
    for name, content in sorted(files.items()):
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        written.append(replace_atomically(out_dir / name, lambda f, data=data: f.write(data)))
    return written


def stale(files: Mapping[str, str | bytes], out_dir: Path) -> list[str]:
    """Names of ``files`` that differ from (or are missing in, or are left over in) ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        write(files, Path(tmp))  # compare what would be written, byte for byte
        out = [n for n in sorted(files) if not (Path(out_dir) / n).is_file()
               or (Path(out_dir) / n).read_bytes() != (Path(tmp) / n).read_bytes()]
    return out + obsolete(files, out_dir)
