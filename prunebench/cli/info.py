"""``prunebench list``, ``prunebench info`` and ``prunebench baseline``: what is installed, and the
baselines runs start from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from prunebench.cli.app import KINDS, PRECISION_HELP, _pairs, _set_threads, app, out
from prunebench.config.budgets import DEFAULT_BUDGET
from prunebench.errors import ConfigError


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
