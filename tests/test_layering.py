"""The import rules of the layout (README, "Layout"; docs/interfaces.md, "Layout"), read from the source.

Every ``import`` in a package's files counts, also the ones inside functions, so a lazy import cannot hide a
dependency that the layout forbids.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "mmoe"

# Which mmoe packages each one may import (besides itself). cli: the commands, over any of them.
MAY_IMPORT: dict[str, set[str]] = {
    "files": set(),
    "resources": set(),
    "moe": set(),
    "metrics": {"files"},
    "model": {"moe", "files", "resources"},
    "data": {"files", "metrics"},
    "viz": {"moe", "model", "data", "files"},
    "baselines": {"data", "metrics", "files"},
    "train": {"moe", "model", "data", "metrics", "viz", "files", "resources"},
    "cli": {"moe", "model", "data", "metrics", "viz", "train", "files", "resources"},
}
LIGHTNING = {"lightning", "pytorch_lightning"}


def _part(path: Path) -> str:
    """``mmoe/data/vqa.py`` -> ``data``; ``mmoe/files.py`` -> ``files``."""
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    package = ["mmoe", *path.relative_to(PACKAGE).parts[:-1]]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.add(".".join(base + ([node.module] if node.module else [])))
    return names


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_a_rule() -> None:
    assert {_part(p) for p in _sources()} - {"__init__"} <= set(MAY_IMPORT)


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_packages_import_only_what_the_layout_allows(part: str) -> None:
    wrong = []
    for path in (p for p in _sources() if _part(p) == part):
        for name in _imports(path):
            tokens = name.split(".")
            if tokens[0] == "mmoe" and len(tokens) > 1 and tokens[1] not in MAY_IMPORT[part] | {part}:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
            if tokens[0] in LIGHTNING and part != "train":
                wrong.append(f"{path.relative_to(REPO)} imports {name} (Lightning belongs to mmoe.train)")
    assert wrong == []
