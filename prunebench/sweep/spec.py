"""A sweep file: the benchmark grid (criteria × architectures × targets × seeds, plus controls
and smaller-dense rows) read from TOML, checked, and expanded into run configurations.

The file format is documented in docs/sweeps.md; :mod:`prunebench.sweep.run` runs the grid.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunebench import registry
from prunebench.config.budgets import Budget, get_budget
from prunebench.config.run import PRETRAINED, RunConfig, cfg_run_id, check_timeout
from prunebench.config.validation import ALLOCATIONS, check_device, check_run, load_profile
from prunebench.errors import ConfigError, suggest
from prunebench.protocols import Target
from prunebench.training.precision import check_precision, resolve_precision

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

CONTROLS = ("random", "scratch")

#: allowed keys, per table of the config file
TOP_KEYS = (
    "description", "criteria", "architectures", "dataset", "targets", "seeds", "budget", "allocation",
    "max_layer_ratio", "layer_ratios", "shots", "shot_epochs", "controls", "device", "results_dir", "baseline", "scope",
    "precision", "runs_per_gpu", "dense", "timeout", "round_to",
)
CRITERION_KEYS = ("name", "params")
DATASET_KEYS = ("name", "options", "data_dir")
TARGET_KEYS = ("macs", "params", "tolerance")


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
