"""docs/architecture.md's floors hold: no module imports a module of a higher floor (lazy imports included;
imports under `if TYPE_CHECKING:` are annotations only and do not count)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmcraft"


def floors() -> dict[str, int]:
    """Module or package name (relative to lmcraft, dotted, no .py) -> floor, from the document's table."""
    table: dict[str, int] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        row = re.match(r"\| (\d) \| (.+?) \|", line)
        if row:
            for name in re.findall(r"`([^`]+)`", row.group(2)):
                table[name.removesuffix("/").removesuffix(".py").replace("/", ".")] = int(row.group(1))
    return table


def floor_of(module: str, table: dict[str, int]) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in table:
            return table[".".join(parts[:n])]
    return None


def imported_modules(path: Path) -> list[str]:
    """lmcraft modules imported anywhere in the file except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lmcraft":
                found += [alias.name for alias in node.names]
            elif node.module.startswith("lmcraft."):
                found.append(node.module.removeprefix("lmcraft."))
        elif isinstance(node, ast.Import):
            found += [a.name.removeprefix("lmcraft.") for a in node.names if a.name.startswith("lmcraft.")]
    return found


def test_every_module_has_a_floor() -> None:
    table = floors()
    unplaced = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                if p.name not in ("__init__.py", "__main__.py")
                and floor_of(".".join(p.relative_to(SRC).with_suffix("").parts), table) is None]
    assert unplaced == []


def test_no_module_imports_a_higher_floor() -> None:
    table = floors()
    upward = []
    for path in SRC.rglob("*.py"):
        importer = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        own = floor_of(importer, table)
        if own is None:
            continue
        for imported in imported_modules(path):
            other = floor_of(imported, table)
            if other is not None and other > own:
                upward.append(f"{importer} (floor {own}) imports {imported} (floor {other})")
    assert upward == []
