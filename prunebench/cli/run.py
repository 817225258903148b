"""``prunebench run`` (one run of the protocol, or a dense control) and ``prunebench sweep``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from prunebench.cli.app import PRECISION_HELP, THREADS_HELP, _pairs, _set_threads, app, err, out
from prunebench.config.budgets import DEFAULT_BUDGET
from prunebench.errors import ConfigError


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
    threads: Annotated[str | None, typer.Option(help=THREADS_HELP)] = None,
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
    threads: Annotated[str | None, typer.Option(help=THREADS_HELP)] = None,
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
