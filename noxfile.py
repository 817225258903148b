"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s slow`, `nox -s leaderboard`."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """Fast CPU suite (what CI runs)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Tests marked slow (bigger models) or data (real data: set PRUNEBENCH_DATA, or they skip)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-q", "-m", "slow or data", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "prunebench", "criteria", "architectures", "tests", "benchmarks", "noxfile.py")


@nox.session
def leaderboard(session: nox.Session) -> None:
    """Regenerate leaderboard/ from leaderboard/records (add `-- --check` to fail when stale)."""
    session.install("-e", ".[dev]")
    Path("leaderboard/records").mkdir(parents=True, exist_ok=True)  # no records yet: an empty leaderboard
    session.run("prunebench", "leaderboard", "--records", "leaderboard/records", "--out", "leaderboard", *session.posargs)
