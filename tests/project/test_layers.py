"""The package's layers point one way: no module imports, directly or through others, a module
that imports it back, and no module imports one of a higher layer (:data:`LAYERS`).

Every import counts -- at the top, inside a function (a lazy import only hides a circle until
the function runs), and under ``TYPE_CHECKING`` (a type that both sides need belongs in a leaf
module both import). The modules are read with ``ast``; only the command-line test imports one, in a
fresh process.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence
from tests.helpers import ROOT

PACKAGES = ("timm_local", "det")

#: The layers of the packages, lowest first: a module may import modules of its own layer or lower ones,
#: never a higher one (a circle within a layer is the circle test's). An entry names one module, or with
#: ``.*`` a package and everything under it; the most specific entry places a module. The order is the
#: one DESIGN.md's data flow needs from the imports' side: what is used sits below what uses it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("timm_local.errors", "timm_local.version", "timm_local.registry", "timm_local.format_version")),
    ("primitives", ("timm_local.memory", "timm_local.macs", "timm_local.balance", "timm_local.distributed")),
    ("data", ("timm_local.data.*",)),
    ("models", ("timm_local.models.*",)),
    ("families", ("timm_local.families.*",)),
    ("partition", ("timm_local.partition",)),
    ("methods", ("timm_local.methods.*",)),
    # what LocalModel runs itself (one local step on one process); the engines that cut and place it, above
    ("local step", ("timm_local.engine.stage", "timm_local.engine.sequential", "timm_local.engine.speed")),
    ("model", ("timm_local.model",)),
    ("engines", ("timm_local.engine.*",)),
    ("export", ("timm_local.export",)),
    ("cost primitives", ("timm_local.cost", "timm_local.process_cost")),
    ("cost report", ("timm_local.cost_report",)),
    ("config", ("timm_local.timm_options", "timm_local.config")),
    ("training", ("timm_local.training.*",)),
    ("api and command line", ("timm_local", "timm_local.cli")),
    ("detectron2 plug-in", ("det.*",)),
)


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


def test_no_import_circle() -> None:
    graph = import_graph()
    assert "timm_local.partition" in graph and "det.backbone" in graph  # the walk found the packages
    found = [" -> ".join(a_cycle(graph, component)) + f" (modules: {', '.join(sorted(component))})"
             for component in circles(graph)]
    assert not found, "import circles (move what both sides need into a leaf module):\n" + "\n".join(found)


def layer_of(module: str, layers: Sequence[tuple[str, Sequence[str]]]) -> Optional[int]:
    """The index of the layer that places ``module`` (its most specific entry), or None."""
    best: Optional[tuple[int, int]] = None  # (specificity, layer)
    for index, (_, entries) in enumerate(layers):
        for entry in entries:
            package = entry[:-2] if entry.endswith(".*") else None
            if entry == module:
                specificity = 10_000
            elif package is not None and (module == package or module.startswith(package + ".")):
                specificity = len(package)
            else:
                continue
            if best is None or specificity > best[0]:
                best = (specificity, index)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]], layers: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """One line per import that points to a higher layer, naming both modules and their layers."""
    found = []
    for module in sorted(graph):
        low = layer_of(module, layers)
        for imported in sorted(graph[module]):
            high = layer_of(imported, layers)
            if low is not None and high is not None and high > low:
                found.append(f"{module} ({layers[low][0]}) imports {imported} ({layers[high][0]})")
    return found


def test_layer_checker_names_an_upward_import() -> None:
    layers = (("low", ("p.a", "p.sub.*")), ("high", ("p.b",)), ("top", ("p",)))
    assert [layer_of(m, layers) for m in ("p.a", "p.sub", "p.sub.x", "p.b", "p", "q")] == [0, 0, 0, 1, 2, None]
    graph = {"p.a": {"p.sub.x"}, "p.sub.x": {"p.b"}, "p.b": {"p.a"}, "p": {"p.b"}}
    assert upward_imports(graph, layers) == ["p.sub.x (low) imports p.b (high)"]


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in import_graph() if layer_of(m, LAYERS) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_import_points_to_a_higher_layer() -> None:
    found = upward_imports(import_graph(), LAYERS)
    assert not found, ("imports that point up (move what both need into the lower layer, or the importer up):\n"
                       + "\n".join(found))


def test_command_line_module_loads_neither_torch_nor_the_training_loop() -> None:
    """``timm_local.cli`` and everything it imports stay light: a tool parses its flags and reports a bad one
    before torch loads. The package ``__init__`` is left out (it registers our architectures in timm, which
    needs torch); the module is imported under a bare package of the same folder."""
    script = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("timm_local")
        package.__path__ = [{str(ROOT / "timm_local")!r}]
        sys.modules["timm_local"] = package
        import timm_local.cli
        cfg = timm_local.cli.parse_config(["--batch-size", "8"])
        assert cfg.batch_size == 8
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm") or m.startswith("timm_local.training"))
        print(heavy)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
