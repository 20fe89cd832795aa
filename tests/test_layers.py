"""The package's layers point one way: no module imports, directly or through others, a module
that imports it back.

Every import counts -- at the top, inside a function (a lazy import only hides a circle until
the function runs), and under ``TYPE_CHECKING`` (a type that both sides need belongs in a leaf
module both import). The modules are read with ``ast``; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("timm_local", "det")

#: Circles still to be cut, each as the set of modules it joins. A circle not listed here, or one
#: that grows beyond its listed modules, fails the test; cutting one means deleting its entry.
KNOWN_CIRCLES: dict[str, frozenset[str]] = {
    # Still to be cut: argument parsing belongs in the CLI layer and config.py should hold data and
    # validation only (config imports cli's parser; cli's error table imports config, data, training).
    # timm_options, training.starting, .targets and .weights join it only through the error classes they
    # raise (cli.UsageError, config.ConfigError): error classes in a leaf module cut them out with the rest.
    # training.trainer and .hooks join it only through the modules they use (builders, console, weights).
    "cli-config-training": frozenset({
        "timm_local.cli", "timm_local.config", "timm_local.training", "timm_local.training.builders",
        "timm_local.training.console", "timm_local.training.loop", "timm_local.training.resolved",
        "timm_local.training.resume", "timm_local.training.run", "timm_local.training.runners",
        "timm_local.timm_options", "timm_local.training.starting", "timm_local.training.targets",
        "timm_local.training.weights", "timm_local.training.trainer", "timm_local.training.hooks",
    }),
    # Still to be cut: cost.cost_report (a report) runs process_cost's fresh-process measurement, which
    # measures with cost's live-tensor tracker (a primitive); the report belongs above both.
    "cost-process_cost": frozenset({"timm_local.cost", "timm_local.process_cost"}),
    # Still to be cut: data.streams reads resolve's HUB_PREFIX (a constant) with a lazy import, and
    # resolve imports the readers, which import streams; the constant belongs in a leaf both import.
    "data-readers-streams": frozenset({
        "timm_local.data.readers", "timm_local.data.readers.imagetar", "timm_local.data.resolve",
        "timm_local.data.streams",
    }),
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (a package is its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module an ``from ... import`` names, with a relative one resolved against ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the package
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # ``import a.b.c`` where only a.b is ours
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One concrete circle through the component's first module, for the error message."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first: the shortest way back to the start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_circle_finder_reports_a_circle_and_ignores_a_chain() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [{"a", "b", "c"}]
    assert a_cycle(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_imports_of_reads_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import leaf\n"
        "def f():\n    from .b import thing\n    import pkg.sub.leaf\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py",
               "pkg.sub": pkg / "sub" / "__init__.py", "pkg.sub.leaf": pkg / "sub" / "leaf.py"}
    assert imports_of("pkg.a", modules["pkg.a"], modules) == {"pkg.sub.leaf", "pkg.b"}
    assert imports_of("pkg", modules["pkg"], modules) == {"pkg.a"}


def test_no_import_circle_beyond_the_known_ones() -> None:
    graph = import_graph()
    assert "timm_local.partition" in graph and "det.backbone" in graph  # the walk found the packages
    new = []
    for component in circles(graph):
        if not any(component <= known for known in KNOWN_CIRCLES.values()):
            new.append(" -> ".join(a_cycle(graph, component)) + f" (modules: {', '.join(sorted(component))})")
    assert not new, "import circles (move what both sides need into a leaf module):\n" + "\n".join(new)
