"""The package's shape as ARCHITECTURE.md draws it: every module described, and the seams that
keep stages apart (who may import the writers, no import circle between config and names files)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ie_gateway"
ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def _imports(path: Path) -> set[str]:
    """Every ie_gateway module ``path`` imports, at the top, in a function or for type checking."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ie_gateway"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ie_gateway"))
    return found


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_architecture_describes_every_module() -> None:
    """A module is described under its file name: `name.py` in the table, or in its package's row."""
    text = ARCHITECTURE.read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if not re.search(rf"`(?:[\w./-]*/)?(?:{re.escape(path.name)}|{re.escape(path.stem)})`", text)
    ]
    assert missing == []


def test_only_the_worker_and_the_commissioning_run_import_the_writers() -> None:
    allowed = {"ie_gateway.pipeline", "ie_gateway.commission.run"}
    importers = {
        _name(path)
        for path in _modules()
        if not _name(path).startswith("ie_gateway.write")
        and any(m == "ie_gateway.write" or m.startswith("ie_gateway.write.") for m in _imports(path))
    }
    assert importers <= allowed, importers - allowed


@pytest.mark.parametrize("module", ["roinames", "vocab", "imaging", "pictures", "errors"])
def test_a_module_below_the_config_does_not_import_it(module: str) -> None:
    """No import circle with the config: it loads names files and reads the vocabulary."""
    imports = _imports(PACKAGE / f"{module}.py")
    assert not {m for m in imports if m == "ie_gateway.config" or m.startswith("ie_gateway.config.")}
