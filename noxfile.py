"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s slow`, `nox -s leaderboard`,
`nox -s mutants` (mutation testing; slow, not part of CI: see docs/testing.md)."""

import os
import shutil
import subprocess
import time
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


#: the HBGS / HBGTS tests, one file per module of criteria/hbgs (the speed test left out)
HBGS_TESTS = [f"tests/test_hbgs{part}.py" for part in
              ("", "_paper", "_layer", "_compensation", "_variants", "_links", "_runner", "_search")]

#: Every module under mutation and the tests that exercise it (only those run per mutant).
MUTANT_TESTS = {
    "criteria/ht2.py": ["tests/test_ht2.py"],
    "criteria/trp.py": ["tests/test_trp.py"],
    "criteria/coring.py": ["tests/test_coring.py"],
    "criteria/qsfm.py": ["tests/test_qsfm.py"],
    "criteria/_selection.py": ["tests/test_selection.py", *HBGS_TESTS],
    "criteria/hbgs/layer.py": [*HBGS_TESTS, "tests/test_selection.py"],
    "criteria/hbgs/compensation.py": HBGS_TESTS,
    "criteria/hbgs/links.py": HBGS_TESTS,
    "criteria/hbgs/search.py": HBGS_TESTS,
    "criteria/hbgs/runner.py": HBGS_TESTS,
    "criteria/hbgs/__init__.py": HBGS_TESTS,
    "criteria/_factorized.py": ["tests/test_ht2.py", "tests/test_trp.py"],
    "criteria/_greedy.py": ["tests/test_coring.py", "tests/test_qsfm.py"],
    "criteria/l1.py": ["tests/test_compress.py"],
    "criteria/random.py": ["tests/test_compress.py"],
    "prunebench/pipeline/compress.py": ["tests/test_compress.py"],
    "prunebench/pipeline/allocation.py": ["tests/test_compress.py"],
    "prunebench/pipeline/meter.py": ["tests/test_compress.py"],
    "prunebench/pipeline/guard.py": ["tests/test_compress.py"],
    "prunebench/pipeline/costmodel.py": ["tests/test_costmodel.py"],
    # surgery's units and channel removal are run by compress and the cost model; its replay and
    # compressed-model files by the round trips
    "prunebench/pipeline/surgery.py": [
        "tests/test_surgery.py", "tests/test_roundtrip.py", "tests/test_compress.py", "tests/test_costmodel.py"
    ],
}


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing with mutmut: each mutant of a module must make that module's tests fail.

    `nox -s mutants` runs every module of MUTANT_TESTS (hours on 2 cores);
    `nox -s mutants -- criteria/ht2.py criteria/trp.py` only those. mutmut edits files in
    place, so it works on a copy of the tracked files under .nox/ (results accumulate there
    in .mutmut-cache: a second run re-tests only survivors and changed lines). Each mutant's
    tests run in a fork of a process that has torch imported (tests/_forkserver.py), which
    saves most of a short run. Prints `mutmut results`.
    """
    session.install("-e", ".[dev]")
    targets = session.posargs or list(MUTANT_TESTS)
    unknown = [t for t in targets if t not in MUTANT_TESTS]
    if unknown:
        session.error(f"no tests are mapped for {unknown}; known: {', '.join(MUTANT_TESTS)}")
    root = Path(__file__).resolve().parent
    work = Path(session.create_tmp()).resolve() / "mutants-tree"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src, dst = root / rel, work / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    # the copy is imported in place of the installed package: the same layout as pyproject's
    # package-dir (criteria/ and architectures/ are prunebench.criteria / .architectures)
    for sub in ("criteria", "architectures"):
        link = work / "prunebench" / sub
        if not link.exists():
            link.symlink_to(Path("..") / sub, target_is_directory=True)
    # no bytecode: two same-sized mutants written within one second would share a stale .pyc
    for cache in work.rglob("__pycache__"):
        shutil.rmtree(cache)
    env = {"PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    python = session.run("python", "-c", "import sys; print(sys.executable)", silent=True).strip()
    sock = work / ".forkserver.sock"
    with session.chdir(work):
        # torch & co. imported once; every mutant's pytest run is a fork of that process
        sock.unlink(missing_ok=True)
        server = subprocess.Popen([python, "tests/_forkserver.py", "serve", str(sock)], env={**os.environ, **env})
        try:
            for _ in range(600):
                if sock.exists() or server.poll() is not None:
                    break
                time.sleep(0.1)
            if not sock.exists():
                session.error("the pytest fork server did not start")
            for target in targets:
                tests = " ".join(MUTANT_TESTS[target])
                runner = f"python tests/_forkserver.py run {sock} -x -q -p no:cacheprovider {tests}"
                session.log(f"mutating {target} (tests: {tests})")
                # exit status: bit 2 survivors, 4 timeouts, 8 suspicious; only 1 is a failure
                session.run(
                    "mutmut", "run", "--paths-to-mutate", target, "--tests-dir", "tests", "--runner", runner,
                    env=env, success_codes=[c for c in range(16) if not c & 1],
                )
        finally:
            server.terminate()
            server.wait()
        session.run("mutmut", "results", env=env, success_codes=[0, 2])
    for line in mutation_scores(work / ".mutmut-cache"):
        session.log(line)


def mutation_scores(cache: Path) -> list[str]:
    """One line per mutated module from mutmut 2's cache: killed (suspicious included), survived,
    timed out, not yet tested, and the raw score killed / tested."""
    import sqlite3

    rows = sqlite3.connect(f"file:{cache}?mode=ro", uri=True).execute(
        "SELECT s.filename, m.status, COUNT(*) FROM Mutant m JOIN Line l ON m.line = l.id "
        "JOIN SourceFile s ON l.sourcefile = s.id GROUP BY s.filename, m.status ORDER BY s.filename"
    )
    counts: dict[str, dict[str, int]] = {}
    for filename, status, n in rows:
        counts.setdefault(filename, {})[status] = n
    lines = []
    for filename, c in counts.items():
        killed = c.get("ok_killed", 0) + c.get("ok_suspicious", 0)
        survived, timeout, untested = c.get("bad_survived", 0), c.get("bad_timeout", 0), c.get("untested", 0)
        tested = killed + survived + timeout
        score = f"{100 * killed / tested:.1f} %" if tested else "-"
        lines.append(
            f"{filename}: {sum(c.values())} mutants, {killed} killed, {survived} survived, "
            f"{timeout} timed out, {untested} untested; score {score}"
        )
    return lines
