"""The package's layering: every module imports only modules of lower layers (function-level imports
included), and inside a package no module imports one that imports it back (no import loop), so
each concern stays in its place and no import works only because of import order."""
import ast
from pathlib import Path

from conftest import REPO

# low to high; a module may import from lower layers only (a package counts as one unit here; the
# modules inside a package are checked for loops by test_no_import_loop_inside_any_package)
LAYERS = [
    {"errors", "analytic", "plugins"},
    {"schedules", "storage"},
    {"denoisers"},
    {"samplers"},
    {"models"},
    {"config"},
    {"rewards"},
    {"search"},
    {"request"},
    {"manifest"},
    {"encode", "contact_sheet"},
    {"batching"},
    {"worker", "sinks"},
    {"job", "serve"},
    {"calibration"},
    {"faults"},          # fault drills: loaded by dotted path (model.hook), imported by no production module
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit(path: Path, root: Path) -> str:
    """The layer unit of a module: its top-level name under the package (packages count as one)."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def imported_modules(path: Path, root: Path) -> set[tuple[str, ...]]:
    """The modules ``path`` imports, as dotted parts under ``root``'s package (``("samplers", "core")``;
    a package's ``__init__`` is ``("samplers", "__init__")``; top-level units as ``("config",)``)."""
    tree, found = ast.parse(path.read_text()), set()
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]      # e.g. ("pipeline", "samplers")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                mod = [*base, *(node.module.split(".") if node.module else [])]
                names = [mod] if node.module else [[*base, a.name] for a in node.names]
            else:
                mod = node.module.split(".")
                names = [mod + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for n in names:
            if n[0] == root.name and len(n) > 1:
                found.add(_resolve(root, tuple(n[1:])))
    return found


def _resolve(root: Path, parts: tuple[str, ...]) -> tuple[str, ...]:
    """The module a dotted name refers to: the longest prefix that is a module file or a package."""
    for k in range(len(parts), 0, -1):
        p = root.joinpath(*parts[:k])
        if p.with_suffix(".py").exists():
            return parts[:k]
        if (p / "__init__.py").exists():
            return (*parts[:k], "__init__")
    return parts[:1]


def package_graph(root: Path) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Every module under ``root`` -> the modules under ``root`` it imports."""
    graph = {}
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        me = path.relative_to(root).with_suffix("").parts
        graph[me] = {m for m in imported_modules(path, root) if m != me}
    return graph


def find_cycle(graph: dict) -> list | None:
    """One import loop of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_imports_only_lower_layers():
    root = REPO / "pipeline"
    modules = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    assert {unit(p, root) for p in modules} - {"__init__"} <= set(LEVEL), "a new module needs a layer here"
    bad = []
    for path in modules:
        me = unit(path, root)
        for other in {m[0].removesuffix(".py") for m in imported_modules(path, root)} - {me}:
            if LEVEL[other] >= LEVEL.get(me, -1):
                bad.append(f"{path.relative_to(REPO)} imports pipeline.{other} (layer {LEVEL[other]} >= {LEVEL.get(me)})")
    assert not bad, "\n".join(bad)


def test_no_import_loop_inside_any_package():
    cycle = find_cycle(package_graph(REPO / "pipeline"))
    assert cycle is None, " -> ".join(".".join(m) for m in cycle)


def test_the_loop_check_catches_a_loop_inside_a_package(tmp_path):
    """A throwaway package whose method module imports the registry back from the package's __init__
    (the loop samplers/ used to have): the check names it; importing from a registry module does not loop."""
    pkg = tmp_path / "toy" / "methods"
    pkg.mkdir(parents=True)
    (tmp_path / "toy" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import basic\nREGISTRY = {}\n")
    (pkg / "basic.py").write_text("from . import REGISTRY\n")
    cycle = find_cycle(package_graph(tmp_path / "toy"))
    assert cycle is not None and ("methods", "basic") in cycle and ("methods", "__init__") in cycle
    (pkg / "registry.py").write_text("REGISTRY = {}\n")
    (pkg / "basic.py").write_text("from .registry import REGISTRY\n")
    assert find_cycle(package_graph(tmp_path / "toy")) is None


def test_no_production_module_imports_the_fault_drills():
    root = REPO / "pipeline"
    users = [p.relative_to(REPO) for p in root.rglob("*.py") if "__pycache__" not in p.parts
             and p.name != "faults.py" and ("faults",) in imported_modules(p, root)]
    assert not users, users
