"""The ``prunebench`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunebench.config.budgets import DEFAULT_BUDGET
from prunebench.errors import ConfigError, PrunebenchError

app = typer.Typer(
    pretty_exceptions_enable=False,
    add_completion=False, no_args_is_help=True,
    help="Benchmark neural-network pruning criteria under one protocol.",
)


def _version(value: bool) -> None:
    if value:
        from prunebench import __version__

        out.print(f"prunebench {__version__}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print prunebench's version and exit")] = False,
) -> None:
    """Benchmark neural-network pruning criteria under one protocol."""
out = Console()
err = Console(stderr=True)

KINDS = ("criteria", "architectures", "datasets", "budgets", "pretrained")
PRECISION_HELP = "training precision: auto (bf16 where the device computes it natively) | bf16 | fp32"


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} must look like KEY=VALUE, got {item!r}")
        result[key.strip().replace("-", "_")] = value.strip()
    return result


def _baseline_option(value: str | None) -> Path | str | None:
    """``--baseline``: 'pretrained', or a checkpoint file that must exist."""
    from prunebench.config.run import PRETRAINED

    if value is None or value == PRETRAINED:
        return value
    return Path(value)


def _target(target_macs: float | None, target_params: float | None, tolerance: float):
    from prunebench.protocols import Target

    if target_macs is not None and target_params is not None:
        raise ConfigError("give either --target-macs or --target-params, not both")
    if target_params is not None:
        return Target("params", target_params, tolerance)
    return Target("macs", 0.5 if target_macs is None else target_macs, tolerance)


@app.command()
def run(
    arch: Annotated[str, typer.Option("--arch", "-a", help="architecture name")],
    criterion: Annotated[str | None, typer.Option("--criterion", "-c", help="criterion name (prunebench list criteria)")] = None,
    dense: Annotated[str | None, typer.Option(
        help="instead of a criterion: the smaller-dense control, this smaller architecture (e.g. resnet20 beside "
             "resnet56) trained for the post-compression epochs and recorded against --arch")] = None,
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "digits",
    target_macs: Annotated[float | None, typer.Option(help="fraction of baseline MACs to remove (default 0.5)")] = None,
    target_params: Annotated[float | None, typer.Option(help="fraction of baseline params to remove")] = None,
    tolerance: Annotated[float, typer.Option(help="allowed |achieved - target|")] = 0.01,
    budget: Annotated[str, typer.Option("--budget", "-b", help="prunebench list budgets")] = DEFAULT_BUDGET,
    seed: Annotated[int, typer.Option("--seed", "-s")] = 0,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="criterion hyper-parameter KEY=VALUE")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="budget override KEY=VALUE, e.g. finetune_epochs=3")] = None,
    dataset_option: Annotated[list[str] | None, typer.Option("--dataset-option", help="dataset option KEY=VALUE")] = None,
    allocation: Annotated[str, typer.Option(help="score criteria: uniform | global | profile")] = "uniform",
    max_layer_ratio: Annotated[float, typer.Option(help="never remove more than this fraction of a layer")] = 0.9,
    layer_ratios: Annotated[str | None, typer.Option(help="JSON {layer: ratio} file or a named profile, e.g. hrank-resnet56-2 (implies --allocation profile)")] = None,
    scope: Annotated[str | None, typer.Option(help="which layers may be pruned: the architecture's scopes (prunebench info --arch), e.g. inner | all")] = None,
    shots: Annotated[int, typer.Option(help="score criteria: prune iteratively in K shots")] = 1,
    round_to: Annotated[int | None, typer.Option(
        help="score criteria: keep a multiple of N channels in every pruned layer (faster on most hardware)")] = None,
    shot_epochs: Annotated[float, typer.Option(help="training between shots, drawn from the fine-tune ledger")] = 0.0,
    data_dir: Annotated[Path | None, typer.Option(envvar="PRUNEBENCH_DATA", help="dataset root")] = None,
    results_dir: Annotated[Path, typer.Option(help="where result records go")] = Path("results"),
    baseline: Annotated[str | None, typer.Option(
        help="'pretrained' (the model zoo's checkpoint for the arch and dataset) or a checkpoint FILE, "
             "instead of training a baseline")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    force: Annotated[bool, typer.Option(help="re-run even if a complete record exists")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    nproc: Annotated[int, typer.Option(
        help="processes for this one run (data-parallel; streamed datasets such as imagenet): one per GPU")] = 1,
    workers: Annotated[int | None, typer.Option(
        help="DataLoader workers per process for streamed datasets (default: the CPUs per process, at most 8)")] = None,
    threads: Annotated[str | None, typer.Option(
        help="CPU threads per process (default: measured at the start of each training stage; "
             "or PRUNEBENCH_THREADS)")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="stop the run after SECONDS and record it as failed (default: no limit)")] = None,
) -> None:
    """Run one criterion on one architecture under the protocol and write a result record.

    Under torchrun (several machines) every process runs this same command without --nproc."""
    _set_threads(threads)
    from prunebench import registry
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig
    from prunebench.config.validation import load_profile
    from prunebench.pipeline.runner import execute
    from prunebench.progress import Reporter

    if (criterion is None) == (dense is None):
        raise ConfigError("give --criterion NAME (prunebench list criteria), or --dense ARCH for the smaller-dense "
                          "control" if criterion is None else "give either --criterion or --dense, not both")
    if dense is not None:
        criterion = "random"  # compresses nothing; the record names the control
    profile = None
    if scope is not None:
        registry.architectures.get(arch).resolve_scope(scope)
    if layer_ratios is not None:
        profile = load_profile(layer_ratios, arch=arch)
        allocation = "profile"
    cfg = RunConfig(
        criterion=criterion, arch=arch, dataset=dataset, budget=get_budget(budget, _pairs(set_, "--set")),
        target=_target(target_macs, target_params, tolerance), seed=seed,
        criterion_params=_pairs(param, "--param"), dataset_options=_pairs(dataset_option, "--dataset-option"),
        allocation=allocation, max_layer_ratio=max_layer_ratio, layer_ratios=profile, shots=shots,
        shot_epochs=shot_epochs, data_dir=data_dir,
        results_dir=results_dir, baseline=_baseline_option(baseline), device=device, force=force, precision=precision,
        scope=scope, workers=workers, dense=dense, timeout=timeout, round_to=round_to,
    )
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    from prunebench.training import distributed

    if distributed.env_world_size() > 1:  # one process of a torchrun launch
        if nproc > 1:
            raise ConfigError("under torchrun, give the processes to torchrun (--nproc-per-node), not --nproc")
        from prunebench.pipeline.launch import worker

        worker(cfg, quiet, locked=False)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        from prunebench.config.run import run_id
        from prunebench.results.records import read_record
        from prunebench.results.store import record_path

        path = record_path(cfg.results_dir, run_id(cfg.identity()))
        record = read_record(path)
    elif nproc > 1:
        from prunebench.pipeline.launch import launch

        record, path = launch(cfg, nproc, quiet)
    else:
        record, path = execute(cfg, Reporter(quiet=quiet))
    if record["status"] == "complete":
        stages = [f"baseline {record['baseline']['top1']:.2f}%"]
        if record.get("oneshot") is not None:  # the scratch control has no one-shot stage
            bn = f" (BN re-estimated {record['oneshot_bn']['top1']:.2f}%)" if record.get("oneshot_bn") else ""
            stages.append(f"one-shot {record['oneshot']['top1']:.2f}%{bn}")
        stages.append(f"final {record['final']['top1']:.2f}%")
        out.print(
            f"{_row_name(record)} on {record['arch']}/{record['dataset']}: {' → '.join(stages)} at "
            f"{record['achieved']['macs_reduction']:.1%} MACs ↓, {record['achieved']['params_reduction']:.1%} params ↓",
            highlight=False, markup=False,
        )
    out.print(f"record: {path}", highlight=False, markup=False)


def _set_threads(value: str | None) -> None:
    """``--threads N`` (or ``PRUNEBENCH_THREADS``), checked before any work, fixes the count."""
    from prunebench.training import threads

    if value is not None:
        os.environ[threads.ENV] = str(threads.check_threads(value))
    threads.apply_fixed()


def _row_name(record: dict) -> str:
    return f"dense {record['dense']}" if record.get("dense") else str(record["criterion"])


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="sweep file (TOML, see docs/sweeps.md)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the runs and their status; run nothing")] = False,
    executor: Annotated[str, typer.Option(help="local (here; runs_per_gpu > 1: worker processes) | ray (one task per run)")] = "local",
    address: Annotated[str | None, typer.Option(help="ray: join this cluster (default: start a local instance)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="where result records go (overrides the file)")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="at most N runs at once")] = None,
    runs_per_gpu: Annotated[int | None, typer.Option(
        help="runs sharing each GPU (each CPU-only machine) at once; overrides the file's runs_per_gpu")] = None,
    precision: Annotated[str | None, typer.Option(help=PRECISION_HELP + "; overrides the file's")] = None,
    data_dir: Annotated[Path | None, typer.Option(envvar="PRUNEBENCH_DATA", help="dataset root")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every run's stages")] = False,
    threads: Annotated[str | None, typer.Option(
        help="CPU threads per process (default: measured at the start of each training stage; "
             "or PRUNEBENCH_THREADS)")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="stop each run after SECONDS and record it as failed; overrides the file's timeout")] = None,
) -> None:
    """Run a benchmark grid (criteria × architectures × targets × seeds, plus controls) from a TOML file.

    Complete runs are skipped, so an interrupted sweep is resumed by starting it again.
    """
    _set_threads(threads)
    from prunebench.sweep.execute import plan
    from prunebench.sweep.run import EXECUTORS, run_sweep, summary
    from prunebench.sweep.spec import describe, load_sweep

    if executor not in EXECUTORS:
        from prunebench.errors import suggest

        raise ConfigError(f"unknown executor {executor!r}.{suggest(executor, EXECUTORS)} Available: {', '.join(EXECUTORS)}")
    if address and executor != "ray":
        raise ConfigError("--address joins a Ray cluster: use it with --executor ray")
    spec = load_sweep(config, results_dir=results_dir, data_dir=data_dir, runs_per_gpu=runs_per_gpu,
                      precision=precision, timeout=timeout)
    if dry_run:
        for key, value in describe(spec).items():
            out.print(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}",
                      highlight=False, markup=False, soft_wrap=True)
        listing = plan(spec.runs())
        done = sum(status == "complete" for _, status in listing)
        out.print(f"{len(listing)} runs in {spec.results_dir}: {done} complete, {len(listing) - done} pending",
                  highlight=False, markup=False, soft_wrap=True)
        for rid, status in listing:
            out.print(f"{status:<8}  {rid}", highlight=False, markup=False, soft_wrap=True)
        return
    try:
        outcomes = run_sweep(spec, executor=executor, address=address, max_parallel=max_parallel, verbose=verbose,
                             log=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))
    except KeyboardInterrupt:
        err.print("interrupted: run the same command again to resume (complete runs are skipped)", highlight=False)
        raise typer.Exit(130) from None
    out.print(summary(outcomes), highlight=False, markup=False, soft_wrap=True)
    if any(o.status in ("failed", "diverged") for o in outcomes):
        raise typer.Exit(1)


@app.command("list")
def list_(kind: Annotated[str, typer.Argument(
        help="criteria | architectures | datasets | budgets | pretrained")] = "criteria") -> None:
    """List registered plug-ins (broken ones are shown with the reason), budgets, or the
    pretrained baselines of the model zoo."""
    from prunebench import registry
    from prunebench.config.budgets import BUDGETS
    from prunebench.errors import suggest

    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}.{suggest(kind, KINDS)} Choose from: {', '.join(KINDS)}")
    if kind == "budgets":
        from prunebench.pipeline.recipes import recipe

        # what each stage uses: a budget without baseline epochs trains no baseline (its runs start
        # from --baseline pretrained or FILE), so its baseline lr is not shown as if it were used
        table = Table("budget", "baseline training", "fine-tune (the ledger)", "adaptation (--baseline pretrained)",
                      "batch", "train/test subset", "calib")
        for b in BUDGETS.values():
            tune = recipe(b, "finetune", b.finetune_epochs)
            baseline_cell = (f"{b.baseline_epochs:g} ep, lr {b.lr:g}, {b.schedule}" if b.baseline_epochs > 0
                             else "none (a given baseline)")
            table.add_row(b.name, baseline_cell, f"{b.finetune_epochs:g} ep, lr {b.finetune_lr:g}, {tune.schedule}",
                          f"{b.adapt_epochs:g} ep, lr {b.adapt_lr:g}, cosine" if b.adapt_epochs > 0 else "none",
                          str(b.batch_size), f"{b.train_subset or 'full'}/{b.test_subset or 'full'}",
                          str(b.calibration_size))
        out.print(table)
        return
    if kind == "pretrained":
        from prunebench import zoo

        table = Table("arch", "datasets (adapted)", "file", "reported top-1", "licence")
        for e in zoo.ENTRIES.values():
            served = ", ".join(e.datasets) + "".join(f", {d} (adapted)" for d in e.adapt_to)
            table.add_row(e.arch, served, e.file + (" (you supply it)" if e.user_supplied else ""),
                          f"{e.reported_top1:g}% on {e.trained_on}", e.license.split(" ")[0])
        out.print(table)
        return
    reg = {"criteria": registry.criteria, "architectures": registry.architectures, "datasets": registry.datasets}[kind]
    table = Table("name", "kind: summary" if kind == "criteria" else "description", "from", "status")
    for item in reg.listing():
        if item.broken:
            desc, status = "", f"[red]broken[/]: {escape(item.error or '')}"
        elif kind == "criteria":
            desc, status = escape(f"{item.obj.kind.value}: {item.obj.summary}"), "ok"
        else:
            desc, status = escape(item.obj.description), "ok"
        table.add_row(escape(item.name), desc, escape(f"{item.distribution} {item.version}"), status)
    out.print(table)


@app.command()
def info(
    arch: Annotated[str | None, typer.Option("--arch", "-a")] = None,
    criterion: Annotated[str | None, typer.Option("--criterion", "-c", help="show a criterion's hyper-parameters")] = None,
    input_size: Annotated[int | None, typer.Option(help="input resolution (default: the architecture's)")] = None,
    in_channels: Annotated[int, typer.Option()] = 3,
    num_classes: Annotated[int, typer.Option()] = 10,
    layers: Annotated[bool, typer.Option(help="list every prunable layer")] = False,
    scope: Annotated[str | None, typer.Option(help="the scope --layers lists (default: the architecture's default)")] = None,
) -> None:
    """MACs, params and prunable layers of an architecture, or a criterion's hyper-parameters."""
    if criterion is None and arch is None:
        raise ConfigError("give --arch NAME and/or --criterion NAME")
    if criterion is not None:
        _criterion_info(criterion)
    if arch is None:
        return
    import torch

    from prunebench import registry
    from prunebench.pipeline.metrics import count_macs, count_params

    a = registry.architectures.get(arch)
    model = a.build(num_classes=num_classes, in_channels=in_channels)
    size = input_size or a.input_size
    x = torch.zeros(1, in_channels, size, size)
    macs, params = count_macs(model, x), count_params(model)
    from prunebench.pipeline.surgery import pruning_units

    chosen = a.resolve_scope(scope)
    out.print(f"[bold]{escape(a.name)}[/]: {escape(a.description)}")
    out.print(f"  input {in_channels}×{size}×{size}, {num_classes} classes")
    out.print(f"  MACs   {macs / 1e6:.2f}M  ({macs:,})")
    out.print(f"  params {params / 1e6:.2f}M  ({params:,})")
    out.print(f"  protected {', '.join(a.protected(model))}", markup=False)
    unit_of: dict[str, str] = {}
    for name in a.scope_names():
        names = a.prunable_layers(model, name)
        units = pruning_units(model, x, names)
        if name == chosen:
            unit_of = {m: u.root for u in units for m in u.members if len(u.members) > 1}
        default = " (default)" if name == a.default_scope else ""
        note = a.scope_notes.get(name, "")
        out.print(f"  scope {name}{default}: {len(names)} prunable convs in {len(units)} pruning units"
                  + (f" — {note}" if note else ""), highlight=False, markup=False)
    if a.pruning_note:
        out.print(f"  note: {a.pruning_note}", highlight=False, markup=False)
    if layers:
        modules = dict(model.named_modules())
        table = Table("layer", "out channels", "kernel", "unit")
        for n in a.prunable_layers(model, chosen):
            m = modules[n]
            table.add_row(escape(n), str(m.out_channels), "×".join(map(str, m.kernel_size)), escape(unit_of.get(n, "")))
        out.print(f"  prunable layers, scope {chosen}:", highlight=False)
        out.print(table)


def _criterion_info(name: str) -> None:
    import dataclasses

    from prunebench import registry

    cls = registry.criteria.get(name)
    entry = registry.criteria.entries()[name]
    out.print(f"[bold]{escape(name)}[/] ({cls.kind.value}{', needs calibration data' if cls.needs_data else ''}) "
              f"from {escape(entry.distribution)} {escape(entry.version)}")
    out.print(f"  {cls.summary}", highlight=False, markup=False)
    if cls.reference:
        out.print(f"  reference: {cls.reference}", highlight=False, markup=False)
    table = Table("hyper-parameter (--param KEY=VALUE)", "type", "default")
    for f in dataclasses.fields(cls.Params):
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        table.add_row(escape(f.name), escape(str(typ)), escape(repr(f.default)))
    if dataclasses.fields(cls.Params):
        out.print(table)
    else:
        out.print("  no hyper-parameters")


@app.command()
def baseline(
    arch: Annotated[str, typer.Option("--arch", "-a")],
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "digits",
    budget: Annotated[str, typer.Option("--budget", "-b")] = DEFAULT_BUDGET,
    seed: Annotated[int, typer.Option("--seed", "-s")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set")] = None,
    dataset_option: Annotated[list[str] | None, typer.Option("--dataset-option")] = None,
    data_dir: Annotated[Path | None, typer.Option(envvar="PRUNEBENCH_DATA")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    pretrained: Annotated[bool, typer.Option(
        "--pretrained", help="the model zoo's checkpoint, adapted to the dataset where needed")] = False,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    threads: Annotated[str | None, typer.Option(
        help="CPU threads per process (default: measured at the start of each training stage; "
             "or PRUNEBENCH_THREADS)")] = None,
) -> None:
    """Train (or find in the cache) the baseline for (arch, dataset, budget, seed); with
    --pretrained, load the zoo's checkpoint and run (or find) its adaptation."""
    _set_threads(threads)
    import torch

    from prunebench import registry
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import PRETRAINED, RunConfig
    from prunebench.config.validation import check_data, check_run
    from prunebench.pipeline.baseline import get_baseline
    from prunebench.pipeline.data import evaluate, load_data, resolve_device
    from prunebench.progress import Reporter

    cfg = RunConfig(criterion="l1", arch=arch, dataset=dataset, budget=get_budget(budget, _pairs(set_, "--set")),
                    seed=seed, dataset_options=_pairs(dataset_option, "--dataset-option"), data_dir=data_dir,
                    device=device, baseline=PRETRAINED if pretrained else None, precision=precision)
    check_run(cfg)
    check_data(cfg)
    dev = resolve_device(device)
    splits, data = load_data(cfg, dev)
    torch.manual_seed(seed)  # as `run` does, so both train the identical baseline
    model = registry.architectures.get(arch).build(num_classes=splits.num_classes, in_channels=splits.in_channels).to(dev)
    info_ = get_baseline(cfg, model, splits, data, Reporter())
    acc = evaluate(model.to(dev), data, splits.num_classes)
    if pretrained:
        adapted = info_["adaptation"]
        how = "no adaptation needed" if adapted is None else (
            f"adapted {adapted['epochs']:g} epochs in {adapted['seconds']:.0f}s: "
            f"{adapted['top1_before']:.2f}% → {adapted['top1_after']:.2f}%")
        out.print(f"baseline {arch}/{dataset}/{budget}: pretrained {info_['zoo']['name']}, top-1 {acc['top1']:.2f}% "
                  f"({how})", highlight=False, markup=False)
    else:
        out.print(f"baseline {arch}/{dataset}/{budget}/seed {seed}: top-1 {acc['top1']:.2f}% ({info_['source']})",
                  markup=False)
    if "key" in info_:
        from prunebench.datasets import cache_dir

        out.print(f"checkpoint: {cache_dir() / 'baselines' / (info_['key'] + '.pt')}", markup=False)


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
        help="torch | onnxruntime | openvino (repeat for several; default: each one installed)")] = None,
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
    if not runtime and len(runtimes) < len(lat.RUNTIMES):
        missing = [f"{r} (pip install 'prunebench[{lat.ONNX_RUNTIMES[r]}]')" for r in lat.RUNTIMES if r not in runtimes]
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
    from prunebench.results.records import survey

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


def _degrade_unencodable_output() -> None:
    """On a terminal or pipe that cannot encode every character (LC_ALL=C, PYTHONIOENCODING=ascii),
    print what it cannot encode as ``?`` instead of failing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (getattr(stream, "errors", None) or "strict") == "strict":
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot change
                pass


def _one_line(text: str) -> str:
    """``text`` with control characters written as escapes, so that it prints as one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def main() -> None:
    _degrade_unencodable_output()
    try:
        app()
    except PrunebenchError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
