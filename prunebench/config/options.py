"""Typing a run's dataset options and criterion hyper-parameters, in one place for the command
line (strings) and sweep files (TOML values) alike."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prunebench import registry
from prunebench.errors import ConfigError, suggest

if TYPE_CHECKING:  # pragma: no cover
    pass


def check_dataset_options(dataset: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Known option names (with suggestions) and values of the right type and range; returns
    them typed. The one place where options are typed, for the command line and sweep files alike."""
    from prunebench.datasets import coerce_option

    ds = registry.datasets.get(dataset)
    accepted = getattr(ds.load, "options", None)
    if accepted is None:  # a plug-in loader that does not declare its options
        return dict(options)
    out = {}
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(f"dataset {dataset!r} has no option {key!r}.{suggest(key, accepted)} "
                              f"Accepted options: {', '.join(accepted) or 'none'}.")
        out[key] = coerce_option(ds.load, dataset, key, value)
    return out


def typed_dataset_options(dataset: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` typed as the dataset declares them; as given when they cannot be (the
    run's validation then says why)."""
    try:
        return check_dataset_options(dataset, options)
    except Exception:  # noqa: BLE001 - reported by check_run, with its own message
        return dict(options)


def typed_criterion_params(criterion: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The given hyper-parameters typed as the criterion declares them (no defaults added); as
    given when they cannot be (the run's validation then says why)."""
    try:
        import dataclasses

        from prunebench.protocols import _coerce

        fields = {f.name: f for f in dataclasses.fields(registry.criteria.get(criterion).Params)}
        return {k: _coerce(v, fields[k]) if k in fields else v for k, v in params.items()}
    except Exception:  # noqa: BLE001 - reported by check_run, with its own message
        return dict(params)
