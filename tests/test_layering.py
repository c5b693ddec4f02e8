"""The package's layering: every module imports only modules of lower layers (function-level imports
included), so there are no import cycles and each concern stays in its place."""
import ast
from pathlib import Path

from conftest import REPO

# low to high; a module may import from its own layer's package (e.g. samplers/*) and from lower layers
LAYERS = [
    {"errors", "analytic"},
    {"schedules", "storage"},
    {"denoisers"},
    {"samplers"},
    {"models"},
    {"rewards"},
    {"search"},
    {"config"},
    {"request"},
    {"manifest"},
    {"worker", "sinks", "contact_sheet"},
    {"faults"},
    {"job", "serve"},
    {"calibration"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit(path: Path) -> str:
    """The layer unit of a module: its top-level name under pipeline/ (packages count as one)."""
    return path.relative_to(REPO / "pipeline").parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    tree, units = ast.parse(path.read_text()), set()
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                names = [parts] if node.module else [[*base, a.name] for a in node.names]
            else:
                names = [node.module.split(".")]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        units |= {n[1] for n in names if len(n) > 1 and n[0] == "pipeline"}
    return units


def test_every_module_imports_only_lower_layers():
    modules = sorted(p for p in (REPO / "pipeline").rglob("*.py") if "__pycache__" not in p.parts)
    assert {unit(p) for p in modules} - {"__init__"} <= set(LEVEL), "a new module needs a layer here"
    bad = []
    for path in modules:
        me = unit(path)
        for other in imported_units(path) - {me}:
            if LEVEL[other] >= LEVEL.get(me, -1):
                bad.append(f"{path.relative_to(REPO)} imports pipeline.{other} (layer {LEVEL[other]} >= {LEVEL.get(me)})")
    assert not bad, "\n".join(bad)
