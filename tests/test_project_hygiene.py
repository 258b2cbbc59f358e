"""Project hygiene: the package's import graph has no cycles and never goes through the package ``__init__``, and
nothing a user reads points outside the repository.

The modules are found with ``pkgutil`` over ``src/quantlm`` and read with ``ast``; none of them is imported.
"""

from __future__ import annotations

import ast
import itertools
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "quantlm"


def package_modules(src: Path = ROOT / "src" / PACKAGE, name: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package, ``{dotted name: file}``, packages as their ``__init__.py``.

    ``pkgutil.walk_packages`` imports each subpackage to find its path, so the walk is done here with
    ``pkgutil.iter_modules`` one directory at a time, which imports nothing."""
    modules = {name: src / "__init__.py"}
    for info in pkgutil.iter_modules([str(src)]):
        dotted = f"{name}.{info.name}"
        if info.ispkg:
            modules.update(package_modules(src / info.name, dotted))
        else:
            modules[dotted] = src / f"{info.name}.py"
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(body: list[ast.stmt], in_functions: bool):
    """Import statements that run when the module runs: not under ``if TYPE_CHECKING:`` (its ``else`` does run),
    and, unless ``in_functions``, not inside a function body. Class bodies run at import, so they count."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.orelse, in_functions)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not in_functions:
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from _import_nodes([c for c in children if isinstance(c, ast.AST)], in_functions)


def imported_modules(module: str, path: Path, modules: dict[str, Path], in_functions: bool = False):
    """``(line, imported module)`` for each package module that ``module`` imports.

    ``from a.b import c`` is module ``a.b.c`` when that is a module, else ``a.b``; ``from quantlm import x`` of a
    name that is not a module (``__version__``) is the package ``quantlm`` itself, i.e. its ``__init__``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in _import_nodes(tree.body, in_functions):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield node.lineno, alias.name
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in modules:
                yield node.lineno, target
            elif base in modules:
                yield node.lineno, base


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` of the module-level imports between package modules."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for line, target in imported_modules(module, path, modules):
            if target != module:
                edges.setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph has ~100 nodes, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                strongconnect(w)
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
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # shortest path back to start inside the component (BFS), so the printed cycle is a real one
        previous = {start: None}
        queue = [start]
        found = None
        while queue and found is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    found = v
                    break
                if w in members and w not in previous:
                    previous[w] = v
                    queue.append(w)
        chain = []
        v = found
        while v != start:
            chain.append(v)
            v = previous[v]
        cycles.append([start] + chain[::-1] + [start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    steps = [f"  {a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) imports {b}" for a, b in itertools.pairwise(cycle)]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_walk_finds_every_source_file():
    found = {path.resolve() for path in package_modules().values()}
    on_disk = {path.resolve() for path in (ROOT / "src" / PACKAGE).rglob("*.py")}
    assert on_disk - found == set(), "files outside a package (a directory without __init__.py?)"


def test_module_imports_have_no_cycle():
    modules = package_modules()
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between quantlm modules:\n" + "\n".join(
        _describe(cycle, graph, modules) for cycle in cycles
    )


def test_no_module_imports_the_package_init():
    """Inside the package, nothing imports ``quantlm`` itself (``import quantlm``, ``from quantlm import
    __version__``): its ``__init__`` imports the whole public API, so doing that from a module the API needs is a
    cycle in waiting. Checked at module level and inside functions alike (not under ``if TYPE_CHECKING:``)."""
    modules = package_modules()
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for module, path in sorted(modules.items())
        if module != PACKAGE
        for line, target in imported_modules(module, path, modules, in_functions=True)
        if target == PACKAGE
    ]
    assert not offenders, "these import the package __init__ (import the module that defines the name instead):\n" + (
        "\n".join(offenders)
    )


def _user_facing_files() -> list[Path]:
    files = [ROOT / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "src").rglob("*.py"))
    files += sorted((ROOT / "benchmarks").glob("*.py"))
    return [path for path in files if path.is_file()]


def test_nothing_points_outside_the_repository():
    """README, docs, sources and benchmark scripts never refer to ``../shared/...``: a clone does not have it."""
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _user_facing_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "shared/" in line
    ]
    assert not hits, "references to files outside the repository (point to docs/ instead):\n" + "\n".join(hits)
