"""HBGS / HBGTS ``__init__.py``: the registered variants' defaults, validation messages and names."""

from __future__ import annotations

import pytest
from _hbgs_support import SmallCNN, make_ctx

from prunebench.criteria.hbgs import HBGS, HBGSB, HBGTS, HBGTSB
from prunebench.errors import ConfigError

#: each class's ``name`` as imported, before any registry lookup (the registry sets ``name`` from
#: the entry point when it loads a class); users who import a class directly, as the docs'
#: example does, see this name in its errors and ledger entries
_NAME_AS_IMPORTED = {cls: cls.name for cls in (HBGS, HBGSB, HBGTS, HBGTSB)}

#: the "Knobs" table of docs/criteria/hbgs.md
_DOCUMENTED_DEFAULTS = {
    "block": 5, "compensation": True, "finetune_epochs_between": 0.0, "lazy": False,
    "max_layer_ratio": 0.9, "output": "logits", "reselect": True, "ridge": 1e-4,
}
_VARIANTS = {"hbgs": "omp", "hbgs-b": "backward", "hbgts": "omp", "hbgts-b": "backward"}


@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_a_run_records_the_documented_defaults_and_the_same_run_given_them_explicitly(name):
    from prunebench.config.run import resolved_params

    documented = {**_DOCUMENTED_DEFAULTS, "selector": _VARIANTS[name]}
    assert resolved_params(name, {}) == documented
    # the defaults given on the command line (strings) resolve to the same run
    as_cli = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in documented.items()}
    assert resolved_params(name, as_cli) == documented


def test_validated_hyper_parameters_cannot_be_changed_afterwards():
    import dataclasses

    crit = HBGS.from_kwargs(block=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        crit.params.block = 0  # would bypass the validation
    assert crit.params.block == 3 and hash(crit.params) == hash(HBGS.from_kwargs(block=3).params)


@pytest.mark.parametrize("kwargs, message", [
    ({"selector": "bakward"}, "unknown hbgs selector 'bakward'. Did you mean 'backward'? Available: backward, omp"),
    ({"reselect": 1}, "hbgs reselect must be true or false, got 1"),
    ({"block": 0}, "hbgs block must be an integer >= 1, got 0"),
    ({"block": True}, "hbgs block must be an integer >= 1, got True"),
    ({"block": 2.5}, "hbgs block must be an integer >= 1, got 2.5"),
    ({"ridge": -1.0}, "hbgs ridge must be >= 0, got -1.0"),
    ({"ridge": float("nan")}, "hbgs ridge must be >= 0, got nan"),
    ({"max_layer_ratio": 0.0}, "hbgs max_layer_ratio must lie in (0, 1), got 0.0"),
    ({"max_layer_ratio": 1.0}, "hbgs max_layer_ratio must lie in (0, 1), got 1.0"),
    ({"finetune_epochs_between": -0.5}, "hbgs finetune_epochs_between must be >= 0, got -0.5"),
    ({"output": "logit"}, "unknown hbgts output 'logit'. Did you mean 'logits'? Available: logits, last_bn"),
])
def test_bad_hyper_parameters_give_one_exact_line(kwargs, message):
    from prunebench import registry

    with pytest.raises(ConfigError) as exc:
        registry.criteria.get("hbgts").from_kwargs(**kwargs)
    assert str(exc.value) == message


def test_the_smallest_valid_values_are_accepted():
    crit = HBGS.from_kwargs(block=1, ridge=0.0, max_layer_ratio=1e-6, finetune_epochs_between=0.0)
    assert (crit.params.block, crit.params.ridge, crit.params.max_layer_ratio) == (1, 0.0, 1e-6)


@pytest.mark.parametrize("name", sorted(_VARIANTS))
def test_each_variant_speaks_under_its_registered_name(name):
    from typer.testing import CliRunner

    from prunebench import registry
    from prunebench.cli import app

    cls = registry.criteria.get(name)
    assert _NAME_AS_IMPORTED[cls] == name  # imported directly, the class already carries it
    model = SmallCNN(width=8).eval()
    ctx = make_ctx(model, 0.3)
    ctx.calibration = None
    with pytest.raises(ConfigError) as exc:
        cls().allocate(model, ctx)
    assert str(exc.value) == f"{name} needs calibration data (the harness passes it when needs_data=True)"
    res = CliRunner().invoke(app, ["info", "--criterion", name])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{name} (allocate, needs calibration data) from prunebench "), res.output
