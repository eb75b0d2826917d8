"""The folders are the architecture: what the device runs (client/) and what both sides share
(common/) never import the coordinator or the simulations, so an agent installs and starts
without them and no import cycle can form across those lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "client": ("tinyfleet.server", "tinyfleet.simulations"),
    "common": ("tinyfleet.server", "tinyfleet.simulations", "tinyfleet.client"),
}


def imported_modules(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_does_not_import_the_layers_above_it(folder: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    offending = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if module.startswith(FORBIDDEN[folder])
    ]
    assert not offending, "\n".join(offending)
