"""``prunebench leaderboard``, ``prunebench latency`` and ``prunebench records check|migrate``:
what is done with the records runs write."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from prunebench.cli.app import _one_line, app, err, out
from prunebench.errors import ConfigError


@app.command()
def leaderboard(
    records: Annotated[Path, typer.Option(help="directory of result records")] = Path("results"),
    out_dir: Annotated[Path, typer.Option("--out", help="where pages, CSVs and plots go")] = Path("leaderboard"),
    check: Annotated[bool, typer.Option(help="fail if the files in --out are stale")] = False,
) -> None:
    """Aggregate result records into leaderboard pages: an index, one markdown page and CSV per
    (dataset, arch), and accuracy-vs-MACs plots where there are several targets."""
    from prunebench.leaderboard import build, check_stale, write
    from prunebench.leaderboard.output import read_records

    if not records.is_dir():
        raise ConfigError(f"no records directory {records} (run `prunebench run ...` first, or pass --records)")
    usable, problems = read_records(records)
    for name, why in problems:
        err.print(f"skipped {_one_line(str(records / name))}: {_one_line(why)}", markup=False, highlight=False,
                  soft_wrap=True)
    unfinished = [(name, rec["status"]) for name, rec in usable if rec["status"] != "complete"]
    for name, status in unfinished:
        err.print(f"skipped {_one_line(str(records / name))}: a {_one_line(status)} record (only complete runs "
                  "are published)", markup=False, highlight=False, soft_wrap=True)
    if len(usable) == len(unfinished):
        skipped = len(problems) + len(unfinished)
        raise ConfigError(
            f"no complete, usable record in {records}: nothing to publish, nothing written"
            + (f" ({skipped} file{'s' if skipped != 1 else ''} skipped, each named above)" if skipped
               else " (it holds no *.json record file)"))
    if check:
        stale = check_stale(records, out_dir)
        if stale:
            err.print("[red]leaderboard is stale:[/] " + escape(", ".join(stale)) + " — run `prunebench leaderboard`")
            raise typer.Exit(1)
        out.print("leaderboard is up to date")
        return
    try:
        files = write(build(records), out_dir)
    except OSError as exc:
        where = exc.filename or out_dir
        raise ConfigError(f"cannot write the leaderboard to {where} ({exc.strerror or exc}); "
                          "choose another --out") from None
    for f in files:
        out.print(f"wrote {escape(str(f))}", highlight=False, soft_wrap=True)


@app.command()
def latency(
    results_dir: Annotated[Path, typer.Argument(help="results directory of complete runs")],
    runtime: Annotated[list[str] | None, typer.Option(
        help="torch | onnxruntime | openvino | torch-cuda (repeat for several; default: each one usable here)")] = None,
    batch: Annotated[list[int] | None, typer.Option(help="batch sizes, paired with --threads (default 1 and 64)")] = None,
    threads: Annotated[list[int] | None, typer.Option(
        help="threads per batch size, in the same order (default 1 and 0; 0: every CPU this process may use)")] = None,
    repeats: Annotated[int, typer.Option(help="timed repeats per model, at least 30")] = 30,
    warmup: Annotated[int, typer.Option(help="untimed calls per model first")] = 5,
    force: Annotated[bool, typer.Option(help="measure again what has a latency record")] = False,
    allow_noisy: Annotated[bool, typer.Option(
        "--allow-noisy", help="on a machine that is not quiet, record the result marked unreliable instead of refusing")] = False,
) -> None:
    """Measure each compressed model of RESULTS_DIR against its baseline: interleaved timing,
    the median latency and a 95 % interval of the speed-up, per runtime, batch and threads.
    Writes RESULTS_DIR/latency/*.json; the accuracy records are never changed (docs/latency.md)."""
    from prunebench.latency import protocol as lat

    runtimes = runtime or [r for r in lat.RUNTIMES if lat.installed(r)]
    missing = [f"{r} (pip install 'prunebench[{lat.ONNX_RUNTIMES[r]}]')" for r in lat.ONNX_RUNTIMES if r not in runtimes]
    if not runtime and missing:
        err.print(f"not installed, not measured: {', '.join(missing)}", highlight=False, markup=False,
                  soft_wrap=True)
    batches = batch or [1, 64]
    thread_counts = threads or ([1, 0] if not batch else [1] * len(batches))
    if len(thread_counts) != len(batches):
        raise ConfigError(f"give one --threads per --batch ({len(batches)} batch sizes, {len(thread_counts)} thread counts)")
    options = lat.Options(runtimes=runtimes, settings=list(zip(batches, thread_counts, strict=True)), repeats=repeats,
                          warmup=warmup, force=force, allow_noisy=allow_noisy)
    outcomes = lat.run_latency(results_dir, options,
                               log=lambda line: (err if line.startswith("error:") else out).print(
                                   line, highlight=False, markup=False, soft_wrap=True))
    measured = sum(o.status == "measured" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = sorted({o.run_id for o in outcomes if o.status == "failed"})
    unreliable = sum(bool(o.record and o.record.get("unreliable")) for o in outcomes)
    out.print(f"{results_dir / 'latency'}: {measured} measured ({unreliable} unreliable), {skipped} already measured, "
              f"{len(failed)} model(s) failed", highlight=False, markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


records_app = typer.Typer(no_args_is_help=True, help="Check result records, or migrate them to the current run-id rule.")
app.add_typer(records_app, name="records")


@records_app.command("check")
def records_check(
    directory: Annotated[Path, typer.Argument(help="directory of result records")] = Path("results"),
) -> None:
    """List every file in DIRECTORY that is not a usable record, and why (exit 1 if any)."""
    from prunebench.results.survey import survey

    if not directory.is_dir():
        raise ConfigError(f"no records directory {directory}")
    found, problems = survey(directory)
    labels = {"unusable": "bad record", "implausible": "implausible record", "duplicate": "duplicate record"}
    for p in problems:
        err.print(f"{labels.get(p.kind, 'bad record')}: {_one_line(str(p))}", markup=False, highlight=False,
                  soft_wrap=True)
    counts: dict[str, int] = {}
    for _, r in found:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {_one_line(s)}" for s, n in sorted(counts.items())) or "no records"
    kinds = {k: sum(p.kind == k for p in problems) for k in ("unusable", "implausible", "duplicate")}
    more = "".join(f", {kinds[k]} {k}" for k in ("implausible", "duplicate") if kinds[k])
    out.print(f"{directory}: {summary}; {kinds['unusable']} unusable file(s){more}", markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)


@records_app.command("migrate")
def records_migrate(
    directory: Annotated[Path, typer.Argument(help="directory of result records")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would change; change nothing")] = False,
) -> None:
    """Rename records (and models) written under an older run-id rule to their current ids.

    Each record's configuration is rebuilt from its fields and must reproduce its old id;
    records that do not are reported and left alone (docs/guarantees.md)."""
    from prunebench.results.migrate import apply, plan

    if not directory.is_dir():
        raise ConfigError(f"no records directory {directory}")
    changes = plan(directory)
    todo = [c for c in changes if c.action in ("rename", "merge", "add identity")]
    for c in changes:
        if dry_run or c.action in ("skip", "current"):
            out.print(_one_line(c.line()), markup=False, highlight=False, soft_wrap=True)
    if not dry_run:
        apply(directory, todo,
              log=lambda line: out.print(_one_line(line), markup=False, highlight=False, soft_wrap=True))
    skipped = sum(c.action == "skip" for c in changes)
    verb = "would change" if dry_run else "changed"
    out.print(f"{len(changes)} files: {verb} {len(todo)}, {sum(c.action == 'current' for c in changes)} current, "
              f"{skipped} left as they are", markup=False, highlight=False)
