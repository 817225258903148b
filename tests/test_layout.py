"""The core's layout stays what docs/layout.md says: no import circles, no import up the layers,
no module over 500 lines, and a module map that names every module.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``, since a
reader needs the imported module to understand the importing one either way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package name -> source folder (pyproject's package-dir)
SOURCES = {"prunebench": ROOT / "prunebench", "prunebench.criteria": ROOT / "criteria",
           "prunebench.architectures": ROOT / "architectures"}
#: lowest first; a module may import from its own layer (without a circle) and from layers below
LAYERS = [
    ("foundation", ["prunebench", "prunebench.errors"]),
    ("storage and console", ["prunebench.storage", "prunebench.progress"]),
    ("plug-in API", ["prunebench.protocols", "prunebench.graph", "prunebench.registry", "prunebench.architectures",
                     "prunebench.datasets", "prunebench.zoo"]),
    ("training", ["prunebench.training"]),
    ("configuration", ["prunebench.config"]),
    ("results", ["prunebench.results"]),
    ("run pipeline", ["prunebench.pipeline"]),
    ("criteria and their checks", ["prunebench.criteria", "prunebench.testing"]),
    ("sweeps, latency, leaderboard", ["prunebench.sweep", "prunebench.latency", "prunebench.leaderboard"]),
    ("command line", ["prunebench.cli", "prunebench.__main__"]),
]
MAX_LINES = 500
#: modules allowed over MAX_LINES, each with the reason it stays whole
LONG_MODULES: dict[str, str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "build" in path.relative_to(folder).parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the prunebench modules it imports (anywhere in its file)."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from package import submodule` imports the submodule
                targets = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known] \
                    or [source]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != "prunebench":
                    continue
                resolved = _resolve(target, known)
                if resolved is not None and resolved != module:
                    graph[module].add(resolved)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix naming ``module``; the root package names only itself."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix != "prunebench"
            if (module == prefix or below) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return None if best is None else best[0]


def test_the_graph_sees_imports_in_functions_and_under_type_checking():
    graph = import_graph()
    # a function-level import (the engine hands streamed data to the streamed loop) ...
    assert "prunebench.training.streaming" in graph["prunebench.training.engine"]
    # ... and one under TYPE_CHECKING only
    assert "prunebench.config.run" in graph["prunebench.pipeline.adaptation"]


def test_the_cycle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_no_import_runs_up_the_layers():
    up = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
          for a, targets in import_graph().items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert up == []


def test_no_module_of_the_core_is_over_500_lines():
    core = ROOT / "prunebench"
    long = {m: n for m, p in modules().items() if p.is_relative_to(core)
            and (n := len(p.read_text().splitlines())) > MAX_LINES and m not in LONG_MODULES}
    assert long == {}


@pytest.mark.parametrize("document", ["docs/layout.md", "README.md"])
def test_the_module_map_names_every_folder(document):
    text = (ROOT / document).read_text()
    # the README's tree names the folders under prunebench/, the module map by their paths
    base = ROOT / "prunebench" if document == "README.md" else ROOT
    folders = sorted({p.parent.relative_to(base).as_posix() for p in (ROOT / "prunebench").rglob("__init__.py")}
                     - {"."})
    assert [f for f in folders if f"{f}/" not in text] == []


def test_the_module_map_names_every_module_under_its_folder():
    sections = (ROOT / "docs/layout.md").read_text().split("\n## ")[1:]
    missing = []
    for path in sorted((ROOT / "prunebench").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        folder = path.parent.relative_to(ROOT).as_posix()
        under = [s for s in sections if f"`{folder}/`" in s.split("\n", 1)[0]]
        if not any(f"`{path.stem}`" in s for s in under):
            missing.append(path.relative_to(ROOT).as_posix())
    assert missing == []
