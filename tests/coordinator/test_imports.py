"""The coordinator imports from ``sandrun`` only the wire modules and ``identity``.

The wire modules (types and helpers shared by worker and coordinator) are
leaves: from ``sandrun`` they import only each other.  ``sandrun``
never imports ``coordinator``.  (The rule is stated in ``coordinator/__init__.py``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIRE = {"sandrun.wire", "sandrun.httpjson", "sandrun.netaddr", "sandrun.daemon",
        "sandrun.pages", "sandrun.gpuwire", "sandrun.connections"}
ALLOWED_IN_COORDINATOR = WIRE | {"sandrun.identity"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (``from sandrun import x`` as ``sandrun.x``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("sandrun", "coordinator"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                names.add(node.module)
    return names


def under(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_coordinator_imports_only_the_wire_modules_and_identity_from_sandrun() -> None:
    used = {(path.name, name) for path in under("coordinator")
            for name in imported_modules(path) if name.split(".")[0] == "sandrun"}
    assert used and {name for _, name in used} <= ALLOWED_IN_COORDINATOR, sorted(used)


def test_the_wire_modules_import_from_sandrun_only_other_wire_modules() -> None:
    for module in WIRE:
        path = ROOT / (module.replace(".", "/") + ".py")
        from_sandrun = {name for name in imported_modules(path) if name.startswith("sandrun")}
        assert from_sandrun <= WIRE, (module, from_sandrun)


def test_sandrun_never_imports_the_coordinator() -> None:
    for path in under("sandrun"):
        assert not any(name.split(".")[0] == "coordinator" for name in imported_modules(path)), path
