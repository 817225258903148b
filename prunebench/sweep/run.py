"""Sweeps: a benchmark grid (criteria × architectures × targets × seeds, plus controls) from one
TOML file, run by the local executor (one run after another in this process, or
``runs_per_gpu`` at a time in worker processes, see :mod:`prunebench.sweep.packing`) or fanned out
over Ray.

Every run of the grid is an ordinary :func:`prunebench.pipeline.runner.execute` call, so each writes one
atomic record whose id is derived from its configuration. That is what makes a sweep safe to
interrupt and to re-start: a complete record is skipped, anything else is (re-)run. Before
the grid fans out, each distinct baseline is trained once (or found in the cache). While a
run executes, its process holds ``<results>/<run_id>.lock``; a sweep that finds a run locked
by another process skips it for now and comes back to it at the end, so two sweeps on the
same results directory never execute the same run at once.

The file format is documented in docs/sweeps.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunebench import registry
from prunebench.config.budgets import Budget, get_budget
from prunebench.errors import ConfigError, DivergedError, suggest
from prunebench.pipeline.runner import PRETRAINED, RunConfig, Sharing, check_timeout
from prunebench.pipeline.validation import ALLOCATIONS, check_device, check_run, load_profile
from prunebench.protocols import Target
from prunebench.results.records import is_complete, run_id
from prunebench.results.store import check_results_dir
from prunebench.storage.locks import FileLock
from prunebench.training.precision import check_precision, device_type, resolve_precision

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CONTROLS = ("random", "scratch")
EXECUTORS = ("local", "ray")

#: allowed keys, per table of the config file
TOP_KEYS = (
    "description", "criteria", "architectures", "dataset", "targets", "seeds", "budget", "allocation",
    "max_layer_ratio", "layer_ratios", "shots", "shot_epochs", "controls", "device", "results_dir", "baseline", "scope",
    "precision", "runs_per_gpu", "dense", "timeout", "round_to",
)
CRITERION_KEYS = ("name", "params")
DATASET_KEYS = ("name", "options", "data_dir")
TARGET_KEYS = ("macs", "params", "tolerance")
#: environment variables a Ray worker needs to see as the driver does
FORWARDED_ENV = ("PRUNEBENCH_CACHE", "PRUNEBENCH_DATA")


@dataclass(frozen=True)
class CriterionSpec:
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep configuration; :meth:`runs` expands it into run configurations."""

    criteria: tuple[CriterionSpec, ...]
    architectures: tuple[str, ...]
    budget: Budget
    dataset: str = "digits"
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    targets: tuple[Target, ...] = (Target(),)
    seeds: tuple[int, ...] = (0,)
    controls: tuple[str, ...] = ()
    allocation: str = "uniform"
    max_layer_ratio: float = 0.9
    layer_ratios: Mapping[str, float] | None = None
    shots: int = 1
    shot_epochs: float = 0.0
    device: str = "auto"
    data_dir: Path | None = None
    results_dir: Path = Path("results")
    baseline: Path | str | None = None  # "pretrained" (the model zoo) or a checkpoint file
    precision: str = "auto"
    runs_per_gpu: int = 1
    scope: str | None = None
    dense: tuple[str, ...] = ()  # smaller-dense controls: one run per (architecture, dense arch, seed)
    timeout: float | None = None  # seconds each run may take (None: no limit); not part of any run id
    round_to: int | None = None  # kept channel counts rounded to multiples of this (score criteria)

    def runs(self) -> list[RunConfig]:
        """Every run of the grid, in a stable order, each once (a control that is also listed
        as a criterion appears once). ``precision = "auto"`` is resolved here, on the machine
        that starts the sweep, so that every worker computes the same run ids."""
        base = dict(
            budget=self.budget, dataset=self.dataset, dataset_options=dict(self.dataset_options),
            allocation=self.allocation, max_layer_ratio=self.max_layer_ratio, layer_ratios=self.layer_ratios,
            shots=self.shots, shot_epochs=self.shot_epochs, data_dir=self.data_dir,
            results_dir=self.results_dir, device=self.device, baseline=self.baseline, scope=self.scope,
            precision=resolve_precision(self.precision, self.device), timeout=self.timeout, round_to=self.round_to,
        )
        out: dict[str, RunConfig] = {}
        for arch in self.architectures:
            for target in self.targets:
                for seed in self.seeds:
                    cell = [RunConfig(criterion=c.name, criterion_params=dict(c.params), arch=arch,
                                      target=target, seed=seed, **base) for c in self.criteria]
                    if "random" in self.controls:
                        cell.append(RunConfig(criterion="random", arch=arch, target=target, seed=seed, **base))
                    if "scratch" in self.controls:
                        cell.append(RunConfig(criterion="random", scratch=True, arch=arch, target=target,
                                              seed=seed, **base))
                    for cfg in cell:
                        out.setdefault(cfg_run_id(cfg), cfg)
            for small in self.dense:  # no target: one run per seed, whatever the targets
                for seed in self.seeds:
                    cfg = RunConfig(criterion="random", dense=small, arch=arch, seed=seed, **base)
                    out.setdefault(cfg_run_id(cfg), cfg)
        return list(out.values())


def cfg_run_id(cfg: RunConfig) -> str:
    return run_id(cfg.identity())


def record_path(cfg: RunConfig) -> Path:
    return Path(cfg.results_dir) / f"{cfg_run_id(cfg)}.json"


# --- reading and validating the config file ------------------------------------------------


def load_sweep(path: str | os.PathLike[str], results_dir: Path | None = None,
               data_dir: Path | None = None, runs_per_gpu: int | None = None,
               precision: str | None = None, timeout: float | None = None) -> Sweep:
    """Read and validate a sweep file. Nothing runs; every error is a :class:`ConfigError`.

    Relative paths inside the file are relative to the file's folder; ``results_dir``,
    ``data_dir``, ``runs_per_gpu``, ``precision`` and ``timeout`` given here (from the command
    line) win over the file's.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep config {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text, as TOML must be (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"sweep config {path} cannot be read ({exc.strerror or exc})") from None
    if runs_per_gpu is not None:
        doc["runs_per_gpu"] = runs_per_gpu
    if precision is not None:
        doc["precision"] = precision
    if timeout is not None:
        doc["timeout"] = timeout
    return parse_sweep(doc, base=path.parent, results_dir=results_dir, data_dir=data_dir)


def parse_sweep(doc: Mapping[str, Any], base: Path = Path("."), results_dir: Path | None = None,
                data_dir: Path | None = None) -> Sweep:
    _check_keys(doc, TOP_KEYS, "the sweep config")
    for key in ("criteria", "architectures"):
        if key not in doc:
            raise ConfigError(f"the sweep config needs {key!r} (a list)")

    dense = tuple(_str(a, "dense") for a in _list(doc["dense"], "dense")) if "dense" in doc else ()
    for name in dense:
        registry.architectures.get(name)
    # a file of dense controls alone may list no criterion
    listed = doc["criteria"] if dense and doc["criteria"] == [] else _list(doc["criteria"], "criteria")
    criteria = tuple(_criterion(item, i) for i, item in enumerate(listed))
    architectures = tuple(_str(a, "architectures") for a in _list(doc["architectures"], "architectures"))
    for name in architectures:
        registry.architectures.get(name)

    dataset, dataset_options, file_data_dir = _dataset(doc.get("dataset", "digits"), base)
    targets = _targets(doc.get("targets", [0.5]))
    seeds = tuple(_int(s, "seeds") for s in _list(doc.get("seeds", [0]), "seeds"))
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"'seeds' lists a seed twice: {list(seeds)}")
    budget = _budget(doc.get("budget", "smoke"))

    controls = doc.get("controls", [])
    if not isinstance(controls, list):
        raise ConfigError(f"'controls' must be a list (of {', '.join(map(repr, CONTROLS))}), got {controls!r}")
    controls = tuple(_str(c, "controls") for c in controls)
    for c in controls:
        if c not in CONTROLS:
            raise ConfigError(f"unknown control {c!r}.{suggest(c, CONTROLS)} Available: {', '.join(CONTROLS)}")
    if controls:
        registry.criteria.get("random")

    allocation = _str(doc.get("allocation", "uniform"), "allocation")
    scope = _str(doc["scope"], "scope") if "scope" in doc else None
    if scope is not None:
        for name in architectures:
            registry.architectures.get(name).resolve_scope(scope)
    layer_ratios = None
    if "layer_ratios" in doc:
        arch = architectures[0] if len(architectures) == 1 else None
        layer_ratios = load_profile(_str(doc["layer_ratios"], "layer_ratios"), "layer_ratios", base=base, arch=arch)
        allocation = "profile"
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {allocation!r}.{suggest(allocation, ALLOCATIONS)} "
                          f"Available: {', '.join(ALLOCATIONS)}")
    if allocation == "profile" and layer_ratios is None:
        raise ConfigError("allocation 'profile' needs per-layer ratios: set layer_ratios = \"FILE.json\"")

    precision = check_precision(_str(doc.get("precision", "auto"), "precision"))
    runs_per_gpu = _int(doc.get("runs_per_gpu", 1), "runs_per_gpu")
    if runs_per_gpu < 1:
        raise ConfigError(f"'runs_per_gpu' must be at least 1, got {runs_per_gpu}")

    timeout = doc.get("timeout")
    check_timeout(timeout, "'timeout'")

    if results_dir is None:
        results_dir = base / _str(doc["results_dir"], "results_dir") if "results_dir" in doc else Path("results")
    baseline = _baseline(doc.get("baseline"), base, architectures, dataset)
    sweep = Sweep(
        criteria=criteria, architectures=architectures, budget=budget, dataset=dataset,
        dataset_options=dataset_options, targets=targets, seeds=seeds, controls=controls,
        allocation=allocation, max_layer_ratio=_float(doc.get("max_layer_ratio", 0.9), "max_layer_ratio"),
        layer_ratios=layer_ratios, shots=_int(doc.get("shots", 1), "shots"),
        shot_epochs=_float(doc.get("shot_epochs", 0.0), "shot_epochs"),
        device=check_device(_str(doc.get("device", "auto"), "device")),
        data_dir=data_dir if data_dir is not None else file_data_dir, results_dir=Path(results_dir),
        baseline=baseline, precision=precision, runs_per_gpu=runs_per_gpu, scope=scope, dense=dense,
        timeout=None if timeout is None else float(timeout),
        round_to=_int(doc["round_to"], "round_to") if "round_to" in doc else None,
    )
    for cfg in sweep.runs():  # every run of the grid, checked as `prunebench run` checks one
        check_run(cfg)
    return sweep


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    for key in table:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}.{suggest(key, allowed)} "
                              f"Allowed keys: {', '.join(allowed)}")


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key!r} must be a non-empty list, got {value!r}")
    return value


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key!r} expects a string, got {value!r}")
    return value


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key!r} expects an integer, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key!r} expects a number, got {value!r}")
    return float(value)


def _criterion(item: Any, index: int) -> CriterionSpec:
    if isinstance(item, str):
        item = {"name": item}
    _check_keys(item, CRITERION_KEYS, f"criteria[{index}]")
    if "name" not in item:
        raise ConfigError(f"criteria[{index}] needs a 'name'")
    name = _str(item["name"], "criteria.name")
    params = item.get("params", {})
    if not isinstance(params, Mapping):
        raise ConfigError(f"criteria[{index}].params must be a table of hyper-parameters, got {params!r}")
    cls = registry.criteria.get(name)
    cls.from_kwargs(seed=0, **params)  # unknown or ill-typed hyper-parameters fail here
    return CriterionSpec(name, dict(params))


def _dataset(value: Any, base: Path) -> tuple[str, dict[str, Any], Path | None]:
    if isinstance(value, str):
        value = {"name": value}
    _check_keys(value, DATASET_KEYS, "[dataset]")
    if "name" not in value:
        raise ConfigError("[dataset] needs a 'name'")
    name = _str(value["name"], "dataset.name")
    options = value.get("options", {})
    if not isinstance(options, Mapping):
        raise ConfigError(f"dataset.options must be a table of dataset options, e.g. {{ n_train = 512 }}, "
                          f"got {options!r}")
    options = dict(options)
    ds = registry.datasets.get(name)
    accepted = getattr(ds.load, "options", None)
    if accepted is not None:
        for key in options:
            if key not in accepted:
                raise ConfigError(f"dataset {name!r} has no option {key!r}.{suggest(key, accepted)} "
                                  f"Accepted options: {', '.join(accepted) or 'none'}.")
    data_dir = base / _str(value["data_dir"], "dataset.data_dir") if "data_dir" in value else None
    return name, options, data_dir


def _baseline(value: Any, base: Path, architectures: Sequence[str], dataset: str) -> Path | str | None:
    """``baseline = "pretrained"`` (every architecture needs a zoo entry for the dataset) or a file."""
    if value is None:
        return None
    value = _str(value, "baseline")
    if value == PRETRAINED:
        from prunebench import zoo

        for arch in architectures:
            zoo.lookup(arch, dataset)
        return PRETRAINED
    path = base / value
    if not path.is_file():
        raise ConfigError(f"baseline file {path} does not exist (or write baseline = \"pretrained\")")
    return path


def _targets(value: Any) -> tuple[Target, ...]:
    if isinstance(value, list):
        value = {"macs": value}
    _check_keys(value, TARGET_KEYS, "[targets]")
    tolerance = _float(value.get("tolerance", 0.01), "targets.tolerance")
    out = []
    for metric in ("macs", "params"):
        ratios = value.get(metric, [])
        if not isinstance(ratios, list):
            raise ConfigError(f"targets.{metric} must be a list of fractions removed, got {ratios!r}")
        out += [Target(metric, _float(r, f"targets.{metric}"), tolerance) for r in ratios]
    if not out:
        raise ConfigError("[targets] names no target: give macs = [0.5, ...] and/or params = [...]")
    return tuple(dict.fromkeys(out))


def _budget(value: Any) -> Budget:
    if isinstance(value, str):
        return get_budget(value)
    if not isinstance(value, Mapping) or "name" not in value:
        raise ConfigError(f"'budget' must be a name or a table with 'name' and overrides, got {value!r}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k != "name"}
    return get_budget(_str(value["name"], "budget.name"), overrides)


# --- executing -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one run in this sweep."""

    run_id: str
    status: str  # complete | failed | diverged | skipped | busy (locked by another process; retried at the end)
    seconds: float = 0.0
    error: str | None = None
    note: str = ""


def plan(runs: Iterable[RunConfig]) -> list[tuple[str, str]]:
    """(run id, "complete" | "pending") for every run."""
    return [(cfg_run_id(cfg), "complete" if is_complete(record_path(cfg)) else "pending") for cfg in runs]


def run_one(cfg: RunConfig, blocking: bool = False, verbose: bool = False) -> Outcome:
    """Execute one run unless it is complete. Holds ``<results>/<run_id>.lock`` meanwhile; when
    another process holds it, returns ``busy`` at once (or, with ``blocking``, waits for it)."""
    from prunebench.pipeline.runner import execute
    from prunebench.progress import Reporter

    rid = cfg_run_id(cfg)
    results = Path(cfg.results_dir)
    lock = FileLock(results / f"{rid}.lock")
    if not lock.acquire(blocking=blocking):
        return Outcome(rid, "busy", note="running in another process")
    try:
        if is_complete(results / f"{rid}.json"):  # checked under the lock: it may have just finished
            return Outcome(rid, "skipped", note="already complete")
        t0 = time.perf_counter()
        try:
            record, _ = execute(cfg, Reporter(quiet=not verbose), locked=True)
        except Exception as exc:  # noqa: BLE001 - the runner has written a failed record
            status = "diverged" if isinstance(exc, DivergedError) else "failed"
            return Outcome(rid, status, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        return Outcome(rid, record["status"], time.perf_counter() - t0)
    finally:
        lock.release()


def prepare_baseline(cfg: RunConfig) -> str:
    """Train (or load from the cache) the baseline that ``cfg`` needs; returns what happened."""
    import torch

    from prunebench.pipeline.runner import get_baseline, load_data, resolve_device
    from prunebench.progress import Reporter

    try:
        torch.manual_seed(cfg.seed)  # as the runner does: the same seed gives the same baseline
        device = resolve_device(cfg.device)
        splits, data = load_data(cfg, device)
        arch = registry.architectures.get(cfg.arch)
        model = arch.build(num_classes=splits.num_classes, in_channels=splits.in_channels).to(device)
        info = get_baseline(cfg, model, splits, data, Reporter(quiet=True))
    except Exception as exc:  # noqa: BLE001 - the runs that need it will fail and say why
        return f"failed: {type(exc).__name__}: {exc}"
    if info["source"] == "trained":
        return f"trained in {info['trained_seconds']:.1f}s"
    if info["source"] == "pretrained":
        adapted = info["adaptation"]
        if adapted is None:
            return f"pretrained {info['zoo']['name']}"
        how = "loaded from the cache" if adapted["cached"] else f"in {adapted['seconds']:.1f}s"
        return (f"pretrained {info['zoo']['name']}, adapted ({how}): top-1 {adapted['top1_before']:.2f}% → "
                f"{adapted['top1_after']:.2f}%")
    return "loaded from the cache"


def baseline_groups(runs: Iterable[RunConfig]) -> list[RunConfig]:
    """One representative run per distinct baseline (runs with a given ``baseline`` file need none;
    pretrained baselines are adapted with one seed for all run seeds)."""
    seen: dict[str, RunConfig] = {}
    for cfg in runs:
        if cfg.baseline is not None and not cfg.pretrained:
            continue
        seed = None if cfg.pretrained else cfg.seed
        key = json.dumps([cfg.arch, cfg.dataset, dict(cfg.dataset_options), cfg.budget.resolved(), seed,
                          str(cfg.data_dir), cfg.pretrained, cfg.resolved_precision()], sort_keys=True, default=str)
        seen.setdefault(key, cfg)
    return list(seen.values())


def run_sweep(
    sweep: Sweep, executor: str = "local", address: str | None = None, max_parallel: int | None = None,
    log: Callable[[str], None] = print, verbose: bool = False,
) -> list[Outcome]:
    """Run every pending run of the sweep; returns one outcome per run (in grid order).

    The local executor runs ``sweep.runs_per_gpu`` runs per GPU at once (per CPU-only
    machine), in worker processes when that is more than one, capped by ``max_parallel``;
    the Ray executor gives each task ``1 / runs_per_gpu`` of a GPU.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}.{suggest(executor, EXECUTORS)} "
                          f"Available: {', '.join(EXECUTORS)}")
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}")
    runs = sweep.runs()
    ids = [cfg_run_id(cfg) for cfg in runs]
    check_results_dir(sweep.results_dir)
    outcomes: dict[str, Outcome] = {}
    pending = []
    for rid, cfg in zip(ids, runs, strict=True):
        if is_complete(record_path(cfg)):
            outcomes[rid] = Outcome(rid, "skipped", note="already complete")
        else:
            pending.append(cfg)
    log(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} already complete, {len(pending)} to run "
        f"({executor} executor)")
    if pending:
        engine = _local_engine(sweep, max_parallel, verbose) if executor == "local" else \
            _RayEngine(address, max_parallel, verbose, sweep.runs_per_gpu)
        pending = [dataclasses.replace(cfg, sharing=engine.sharing) for cfg in pending]
        log(f"runs at once: {engine.sharing.runs_per_device} per device")
        try:
            baselines = baseline_groups(pending)
            for cfg, what in zip(baselines, engine.baselines(baselines), strict=True):
                seed = "" if cfg.pretrained else f"/seed {cfg.seed}"
                log(f"baseline {cfg.arch}/{cfg.dataset}/{cfg.budget.name}{seed}: {what}")
            done = 0
            for outcome in engine.runs(pending, blocking=False):
                outcomes[outcome.run_id] = outcome
                if outcome.status != "busy":
                    done += 1
                log(_progress_line(outcome, done, len(pending)))
            busy = [cfg for cfg in pending if outcomes[cfg_run_id(cfg)].status == "busy"]
            if busy:  # another process had them: wait for it, then run whatever it did not finish
                log(f"waiting for {len(busy)} runs held by another process")
                for outcome in engine.runs(busy, blocking=True):
                    if outcome.status == "skipped":
                        outcome.note = "completed by another process"
                    outcomes[outcome.run_id] = outcome
                    done += 1
                    log(_progress_line(outcome, done, len(pending)))
        finally:
            engine.close()
    return [outcomes[rid] for rid in ids]


def _progress_line(o: Outcome, done: int, total: int) -> str:
    detail = f" ({o.seconds:.1f}s)" if o.seconds else ""
    if o.error:
        detail += f": {o.error}"
    elif o.note:
        detail += f": {o.note}"
    return f"[{done}/{total}] {o.status:<8} {o.run_id}{detail}"


def summary(outcomes: Sequence[Outcome]) -> str:
    """A plain-text table of the sweep's runs and the counts per status."""
    from tabulate import tabulate

    rows = [[o.run_id, o.status, f"{o.seconds:.1f}" if o.seconds else "", o.error or o.note] for o in outcomes]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("complete", "failed", "skipped")}
    diverged = sum(o.status == "diverged" for o in outcomes)
    if diverged:
        counts = {"complete": counts["complete"], "failed": counts["failed"], "diverged": diverged,
                  "skipped": counts["skipped"]}
    table = tabulate(rows, headers=["run", "status", "seconds", "note"], tablefmt="simple", disable_numparse=True)
    return table + "\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(outcomes)} runs)"


def _local_engine(sweep: Sweep, max_parallel: int | None, verbose: bool):
    from prunebench.sweep.packing import PackedEngine, plan_slots

    slots = plan_slots(sweep.runs_per_gpu, device_type(sweep.device), max_parallel)
    if slots.total == 1:
        return _LocalEngine(verbose)
    if slots.gpus and sweep.device not in ("auto", "cuda"):
        raise ConfigError(f"device {sweep.device!r}: with several GPUs the local executor gives each worker its own "
                          "GPU; set device to 'auto' or 'cuda'")
    return PackedEngine(slots, verbose)


class _LocalEngine:
    """Sequential, in this process."""

    sharing = Sharing(1, "local")

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def baselines(self, cfgs: Sequence[RunConfig]) -> list[str]:
        return [prepare_baseline(cfg) for cfg in cfgs]

    def runs(self, cfgs: Sequence[RunConfig], blocking: bool):
        for cfg in cfgs:
            yield run_one(cfg, blocking=blocking, verbose=self.verbose)

    def close(self) -> None:
        pass


def _ray_run(cfg: RunConfig, blocking: bool, verbose: bool, env: Mapping[str, str]) -> Outcome:
    os.environ.update(env)
    return run_one(cfg, blocking=blocking, verbose=verbose)


def _ray_baseline(cfg: RunConfig, env: Mapping[str, str]) -> str:
    os.environ.update(env)
    return prepare_baseline(cfg)


class _RayEngine:
    """One Ray task per run (``1 / runs_per_gpu`` of a GPU each where CUDA is available, else
    one CPU). Joins the cluster at ``address``, uses an already initialised Ray, or starts a
    local instance."""

    def __init__(self, address: str | None, max_parallel: int | None, verbose: bool, runs_per_gpu: int = 1) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray executor needs Ray: pip install 'prunebench[ray]'") from None
        import torch

        self.ray = ray
        self.verbose = verbose
        self.max_parallel = max_parallel
        self.env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.started = False
        if not ray.is_initialized():
            ray.init(address=address) if address else ray.init()
            self.started = True
        if torch.cuda.is_available():
            resources: dict[str, float] = {"num_gpus": 1 / runs_per_gpu}
            per_device = runs_per_gpu if max_parallel is None else min(runs_per_gpu, max_parallel)
        else:  # one CPU per task: as many runs share a node's cores as it has cores
            resources = {"num_cpus": 1}
            cores = max((int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
            per_device = cores if max_parallel is None else min(cores, max_parallel)
        self.sharing = Sharing(max(1, per_device), "ray")
        self.run_task = ray.remote(**resources)(_ray_run)
        self.baseline_task = ray.remote(**resources)(_ray_baseline)

    @staticmethod
    def _absolute(cfg: RunConfig) -> RunConfig:
        """Workers need not share the driver's working directory."""
        return dataclasses.replace(cfg, results_dir=Path(cfg.results_dir).absolute(),
                                   data_dir=Path(cfg.data_dir).absolute() if cfg.data_dir else None,
                                   baseline=cfg.baseline.absolute() if isinstance(cfg.baseline, Path) else cfg.baseline)

    def baselines(self, cfgs: Sequence[RunConfig]) -> list[str]:
        # distinct baselines never share a checkpoint, so they may train side by side
        out = []
        for ref in [self.baseline_task.remote(self._absolute(cfg), self.env) for cfg in cfgs]:
            try:
                out.append(self.ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - a lost worker; the runs will retry and fail
                out.append(f"failed: {type(exc).__name__}: {exc}")
        return out

    def runs(self, cfgs: Sequence[RunConfig], blocking: bool):
        queue = list(cfgs)
        in_flight: dict[Any, RunConfig] = {}
        while queue or in_flight:
            while queue and (self.max_parallel is None or len(in_flight) < self.max_parallel):
                cfg = queue.pop(0)
                in_flight[self.run_task.remote(self._absolute(cfg), blocking, self.verbose, self.env)] = cfg
            ready, _ = self.ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                cfg = in_flight.pop(ref)
                try:
                    yield self.ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died (e.g. out of memory)
                    yield Outcome(cfg_run_id(cfg), "failed", error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def describe(sweep: Sweep) -> dict[str, Any]:
    """The sweep's resolved settings, as plain data (printed by --dry-run)."""
    return {
        "criteria": [c.name + (f"({', '.join(f'{k}={v}' for k, v in sorted(c.params.items()))})" if c.params else "")
                     for c in sweep.criteria],
        "controls": list(sweep.controls), "architectures": list(sweep.architectures), "dataset": sweep.dataset,
        "targets": [f"{t.metric} -{t.ratio:.0%}" for t in sweep.targets], "seeds": list(sweep.seeds),
        "budget": sweep.budget.name + "".join(f" {k}={v}" for k, v in _overrides(sweep.budget).items()),
        "allocation": sweep.allocation, **({"scope": sweep.scope} if sweep.scope is not None else {}),
        **({"round_to": sweep.round_to} if sweep.round_to is not None else {}),
        "results_dir": str(sweep.results_dir),
        "baseline": str(sweep.baseline) if sweep.baseline is not None else "trained (cached per seed)",
        "precision": f"{sweep.precision} ({resolve_precision(sweep.precision, sweep.device)} here)"
        if sweep.precision == "auto" else sweep.precision,
        "runs_per_gpu": sweep.runs_per_gpu,
        **({"timeout": f"{sweep.timeout:g} s per run"} if sweep.timeout is not None else {}),
    }


def _overrides(budget: Budget) -> dict[str, Any]:
    ref = get_budget(budget.name)
    return {f.name: getattr(budget, f.name) for f in dataclasses.fields(budget)
            if getattr(budget, f.name) != getattr(ref, f.name)}
