"""Promise: a plug-in never silently takes over a name.

A third-party entry point with a built-in's name is shown as a clash and not used, unless
``PRUNEBENCH_PREFER`` chooses it explicitly; two third-party distributions with one name
make that name unusable until one is chosen. A run of a plug-in that is not built in
carries its distribution in the run id and the record. Plug-in text never breaks the
console output (rich markup is escaped).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from _support import invoke

from prunebench import registry
from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.errors import PluginError


def list_rows(output: str) -> dict[tuple[str, str], str]:
    """``prunebench list criteria`` as {(name, distribution): status}."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0] != "name":
            rows[(cells[0], cells[2].rsplit(" ", 1)[0])] = cells[3]
    return rows


def install_fake_distribution(root: Path, dist: str, module: str, names: list[str]) -> None:
    """A distribution on sys.path (dist-info + module) registering criteria ``names``."""
    (root / f"{module}.py").write_text(textwrap.dedent('''
        import torch
        from prunebench.protocols import ScoreCriterion

        class Impostor(ScoreCriterion):
            summary = "scores every channel the same [not really l1]"

            def scores(self, model, layers, calibration):
                modules = dict(model.named_modules())
                return {n: torch.ones(modules[n].out_channels) for n in layers}
    '''))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[prunebench.criteria]\n" + "".join(f"{n} = {module}:Impostor\n" for n in names))


@pytest.fixture
def impostor(tmp_path, monkeypatch):
    """`evil-l1` 1.0 registers a criterion named `l1` (and `shared`); `other-dist` registers `shared`."""
    install_fake_distribution(tmp_path, "evil-l1", "evil_l1_impl", ["l1", "shared"])
    second = tmp_path / "second"
    second.mkdir()
    install_fake_distribution(second, "other-dist", "other_impl", ["shared"])
    # appended, after site-packages: on entry-point order alone the impostor would win
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path), str(second)])
    monkeypatch.delenv("PRUNEBENCH_PREFER", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # `prunebench list` rows on one line each
    yield
    for name in ("evil_l1_impl", "other_impl"):
        sys.modules.pop(name, None)


def test_a_plugin_with_a_builtin_name_is_not_used_and_is_shown_as_a_clash(impostor):
    entry = registry.criteria.entries()["l1"]
    assert entry.distribution == "prunebench"
    assert registry.criteria.get("l1").__module__ == "prunebench.criteria.l1"
    res = invoke("list", "criteria")
    assert res.exit_code == 0, res.output
    rows = list_rows(res.output)
    builtin, clash = rows[("l1", "prunebench")], rows[("l1", "evil-l1")]
    assert builtin == "ok" and clash.startswith("broken")
    assert "name clash: prunebench" in clash and "the built-in is used" in clash
    assert "PRUNEBENCH_PREFER=l1=evil-l1" in clash


def test_an_explicit_preference_uses_the_plugin_and_the_run_id_and_record_name_it(impostor, monkeypatch):
    budget = get_budget("smoke")
    builtin_id = run_id(RunConfig(criterion="l1", arch="resnet20", budget=budget).identity())
    monkeypatch.setenv("PRUNEBENCH_PREFER", "l1=evil-l1")
    assert registry.criteria.get("l1").__module__ == "evil_l1_impl"
    identity = RunConfig(criterion="l1", arch="resnet20", budget=budget).identity()
    assert identity["plugins"] == {"criterion": "evil-l1"}
    assert run_id(identity) != builtin_id
    builtin = list_rows(invoke("list", "criteria").output)[("l1", "prunebench")]
    assert "name clash: evil-l1 1.0 also provides criterion 'l1' (chosen by PRUNEBENCH_PREFER)" in builtin


def test_two_plugins_with_one_name_make_it_unusable_until_one_is_chosen(impostor, monkeypatch):
    with pytest.raises(PluginError, match="'shared' is provided by (evil-l1 and other-dist|other-dist and evil-l1)"):
        registry.criteria.get("shared")
    monkeypatch.setenv("PRUNEBENCH_PREFER", "shared=other-dist")
    assert registry.criteria.get("shared").__module__ == "other_impl"
    assert registry.criteria.entries()["shared"].distribution == "other-dist"


def test_plugin_text_with_brackets_is_shown_verbatim(monkeypatch):
    """Rich markup must not eat "[...]" in plug-in summaries or errors."""
    import types

    from prunebench.protocols import ScoreCriterion

    class Bracketed(ScoreCriterion):
        summary = "keeps [bold] channels [/] and [red]more[/red]"

        def scores(self, model, layers, calibration):
            return {}

    module = types.ModuleType("reliability_bracketed")
    module.Bracketed = Bracketed
    monkeypatch.setitem(sys.modules, module.__name__, module)
    registry.criteria.register("bracketed", f"{module.__name__}:Bracketed")
    registry.criteria.register("ghost", "no_such_module_[x]:Thing")
    monkeypatch.setenv("COLUMNS", "400")
    try:
        text = invoke("list", "criteria").output
    finally:
        registry.criteria._extra.pop("bracketed", None)
        registry.criteria._extra.pop("ghost", None)
    assert "keeps [bold] channels [/] and [red]more[/red]" in text
    assert "no_such_module_[x]" in text
