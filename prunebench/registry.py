"""Plug-in registries backed by Python entry points.

Three groups: ``prunebench.criteria``, ``prunebench.architectures``, ``prunebench.datasets``.
Built-in plug-ins are declared in prunebench's own pyproject exactly like a third-party
package declares its own, so the third-party path is the one every run exercises.

Entries load lazily: listing names imports nothing, and a plug-in that fails to import
is reported as broken (with the reason) instead of breaking the listing. Unknown names
fail with close-match suggestions and the list of available names.

Name clashes are never resolved silently. When a third-party distribution registers a name
that a built-in already has, the built-in is used and the other entry is listed as broken
("name clash"); ``PRUNEBENCH_PREFER="NAME=DISTRIBUTION,..."`` explicitly chooses the other
one. When two third-party distributions register one name and neither is preferred, the
name cannot be used until one is. A run's id and record name the distribution of every
plug-in that is not built in.
"""

from __future__ import annotations

import importlib.metadata as md
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prunebench.errors import ConfigError, PluginError, suggest

T = TypeVar("T")

BUILTIN = "prunebench"  # the distribution whose entry points are the built-ins
PREFER_ENV = "PRUNEBENCH_PREFER"


@dataclass(frozen=True)
class Entry:
    name: str
    value: str  # "module:attr"
    distribution: str
    version: str
    clash: str | None = None  # why this name cannot be used as it stands (a clash nobody settled)


@dataclass(frozen=True)
class Listing:
    name: str
    distribution: str
    version: str
    obj: Any | None
    error: str | None

    @property
    def broken(self) -> bool:
        return self.error is not None


class Registry(Generic[T]):
    """Name → lazily loaded plug-in object, validated on load."""

    def __init__(self, group: str, kind: str, validate: Callable[[str, Any], T]) -> None:
        self.group = group
        self.kind = kind
        self._validate = validate
        self._extra: dict[str, Entry] = {}
        self._loaded: dict[tuple[str, str], T] = {}  # (name, PRUNEBENCH_PREFER) -> object
        self._resolved: tuple[tuple, tuple[dict[str, Entry], list[tuple[Entry, str]]]] | None = None

    def entries(self) -> dict[str, Entry]:
        """The entry used for each name (clashes settled as the module docstring says)."""
        return self._resolve()[0]

    def shadowed(self) -> list[tuple[Entry, str]]:
        """Entries not used because another distribution has their name, with the reason."""
        return self._resolve()[1]

    def _resolve(self) -> tuple[dict[str, Entry], list[tuple[Entry, str]]]:
        # scanning the installed distributions takes milliseconds and run ids ask often: cache
        # per search path and preference (a distribution installed into a folder already on
        # the path while this process runs is seen by the next process)
        key = (tuple(sys.path), os.environ.get(PREFER_ENV, ""))
        if self._resolved is None or self._resolved[0] != key:
            self._resolved = (key, self._scan())
        chosen, shadowed = self._resolved[1]
        return dict(sorted({**chosen, **self._extra}.items())), list(shadowed)

    def _scan(self) -> tuple[dict[str, Entry], list[tuple[Entry, str]]]:
        candidates: dict[str, list[Entry]] = {}
        for ep in md.entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            entry = Entry(
                name=ep.name,
                value=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
            )
            same = candidates.setdefault(ep.name, [])
            if all(e.distribution != entry.distribution for e in same):
                same.append(entry)
        prefer = preferences()
        chosen: dict[str, Entry] = {}
        shadowed: list[tuple[Entry, str]] = []
        for name, entries in candidates.items():
            if len(entries) == 1:
                chosen[name] = entries[0]
                continue
            dists = [e.distribution for e in entries]
            picked = [e for e in entries if e.distribution == prefer.get(name)]
            builtin = [e for e in entries if e.distribution == BUILTIN]
            if name in prefer and not picked:
                chosen[name] = Entry(name, "", " / ".join(dists), "", clash=(
                    f"{PREFER_ENV} chooses {prefer[name]!r} for {self.kind} {name!r}, but it is provided by "
                    f"{' and '.join(dists)}"))
                continue
            if picked or builtin:
                winner = (picked or builtin)[0]
                why = f"chosen by {PREFER_ENV}" if picked else "the built-in is used"
                chosen[name] = winner
                for e in entries:
                    if e is not winner:
                        fix = ("the built-in is not used" if e.distribution == BUILTIN else
                               f"this one is not used. Rename its entry point, or set "
                               f"{PREFER_ENV}={name}={e.distribution} to use it instead")
                        shadowed.append((e, f"name clash: {winner.distribution} {winner.version} also provides "
                                            f"{self.kind} {name!r} ({why}); {fix}"))
                continue
            chosen[name] = Entry(name, "", " / ".join(dists), "", clash=(
                f"name clash: {self.kind} {name!r} is provided by {' and '.join(dists)}; choose one with "
                f"{PREFER_ENV}={name}={dists[0]}"))
        return dict(sorted(chosen.items())), shadowed

    def names(self) -> list[str]:
        return list(self.entries())

    def register(self, name: str, value: str, distribution: str = "<runtime>") -> None:
        """Add a ``module:attr`` entry at run time (tests, notebooks)."""
        self._extra[name] = Entry(name, value, distribution, "")
        for key in [k for k in self._loaded if k[0] == name]:
            del self._loaded[key]

    def get(self, name: str) -> T:
        key = (name, os.environ.get(PREFER_ENV, ""))
        if key in self._loaded:
            return self._loaded[key]
        entries = self.entries()
        if name not in entries:
            available = ", ".join(entries) or "(none installed)"
            raise ConfigError(f"unknown {self.kind} {name!r}.{suggest(name, entries)} Available: {available}")
        entry = entries[name]
        if entry.clash is not None:
            raise PluginError(entry.clash)
        try:
            obj = _load(entry.value)
        except Exception as exc:  # noqa: BLE001 - any import failure is the plug-in's
            raise PluginError(
                f"{self.kind} {name!r} from {entry.distribution} {entry.version} failed to load "
                f"({entry.value}): {type(exc).__name__}: {exc}"
            ) from exc
        try:
            obj = self._validate(name, obj)
        except PluginError as exc:
            raise PluginError(f"{exc} [plug-in {name!r} from {entry.distribution} {entry.version}]") from None
        self._loaded[key] = obj
        return obj

    def listing(self) -> list[Listing]:
        """Every entry, working or broken; entries shadowed by a name clash are listed as broken."""
        out = []
        for name, entry in self.entries().items():
            try:
                obj, err = self.get(name), None
            except PluginError as exc:
                obj, err = None, str(exc)
            out.append(Listing(name, entry.distribution, entry.version, obj, err))
        for entry, why in self.shadowed():
            out.append(Listing(entry.name, entry.distribution, entry.version, None, why))
        return sorted(out, key=lambda item: (item.name, item.error is not None))

    def provider(self, name: str) -> str | None:
        """The distribution that provides ``name`` when it is not built in (None for built-ins)."""
        entry = self.entries().get(name)
        if entry is None or entry.distribution == BUILTIN:
            return None
        return entry.distribution


def preferences() -> dict[str, str]:
    """``PRUNEBENCH_PREFER="NAME=DISTRIBUTION,..."``: which distribution wins a name clash."""
    out = {}
    for item in os.environ.get(PREFER_ENV, "").split(","):
        name, sep, dist = item.partition("=")
        if sep and name.strip() and dist.strip():
            out[name.strip()] = dist.strip()
    return out


def _load(value: str) -> Any:
    module_name, _, attr = value.partition(":")
    obj: Any = importlib_import(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def importlib_import(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


# --- validators -------------------------------------------------------------------------


def _validate_criterion(name: str, obj: Any) -> Any:
    from prunebench.protocols import (
        AllocateCriterion,
        Criterion,
        ScoreCriterion,
        TransformCriterion,
    )

    if not (inspect.isclass(obj) and issubclass(obj, Criterion)):
        raise PluginError(
            f"criterion {name!r} must be a subclass of prunebench.protocols.Criterion, got {obj!r}. "
            "Subclass ScoreCriterion, AllocateCriterion or TransformCriterion."
        )
    bases = (ScoreCriterion, AllocateCriterion, TransformCriterion)
    if not issubclass(obj, bases):
        raise PluginError(f"criterion {name!r} must subclass one of {[b.__name__ for b in bases]}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PluginError(f"criterion {name!r} ({obj.__qualname__}) does not implement: {missing}")
    import dataclasses

    if not dataclasses.is_dataclass(obj.Params):
        raise PluginError(f"criterion {name!r}: Params must be a dataclass")
    if issubclass(obj, TransformCriterion) and not isinstance(getattr(obj, "knob", None), _knob_type()):
        raise PluginError(f"criterion {name!r}: a transform criterion must declare `knob = Knob(...)`")
    _check_signatures(name, obj)
    obj.name = name
    return obj


#: the method each kind must implement, with the parameters it is called with
_SIGNATURES = {
    "scores": ("model", "layers", "calibration"),
    "allocate": ("model", "ctx"),
    "transform": ("model", "value", "ctx"),
}


def _check_signatures(name: str, cls: Any) -> None:
    for method, expected in _SIGNATURES.items():
        fn = getattr(cls, method, None)
        if fn is None or getattr(fn, "__isabstractmethod__", False):
            continue
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        required = [p for p in positional if p.default is p.empty]
        if not varargs and (len(positional) < len(expected) or len(required) > len(expected)):
            raise PluginError(
                f"criterion {name!r}: {cls.__qualname__}.{method} must accept "
                f"({', '.join(expected)}), but its signature is {inspect.signature(fn)}"
            )


def _knob_type() -> type:
    from prunebench.protocols import Knob

    return Knob


def _validate_architecture(name: str, obj: Any) -> Any:
    from prunebench.architectures.base import Architecture

    if not isinstance(obj, Architecture):
        raise PluginError(f"architecture {name!r} must be a prunebench.architectures.Architecture, got {obj!r}")
    return obj


def _validate_dataset(name: str, obj: Any) -> Any:
    from prunebench.datasets.base import Dataset

    if not isinstance(obj, Dataset):
        raise PluginError(f"dataset {name!r} must be a prunebench.datasets.base.Dataset, got {obj!r}")
    return obj


criteria: Registry[Any] = Registry("prunebench.criteria", "criterion", _validate_criterion)
architectures: Registry[Any] = Registry("prunebench.architectures", "architecture", _validate_architecture)
datasets: Registry[Any] = Registry("prunebench.datasets", "dataset", _validate_dataset)
