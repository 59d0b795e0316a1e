"""Each layer imports only the layers below it in the README's architecture picture."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gossamer

SRC = Path(gossamer.__file__).parent

# Rank of each layer, core (the bottom of the README's picture) first. Equal ranks may not
# import each other either, except within the same layer.
LAYER_RANK = {
    "core": 0,
    "proto": 1,
    "obs": 2,
    "lab": 3,
    "net": 4,
    "store": 5,
    "comm": 6,
    "models": 7,
    "data": 7,
    "train": 8,
    "bench": 9,
    "sched": 10,
    "serve": 10,
    "cli": 11,
}
# Top-level modules that every layer may use.
SHARED_MODULES = {"_version"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("gossamer.")]


def test_every_layer_folder_is_ranked() -> None:
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert folders <= set(LAYER_RANK), f"unranked layers: {folders - set(LAYER_RANK)}"


def test_no_layer_imports_a_layer_below_it() -> None:
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).parts
        if len(parts) < 2:
            continue  # gossamer/__init__.py re-exports the public API from every layer
        layer = parts[0]
        for line, name in _imports(path):
            target = name.split(".")[1]
            if target in SHARED_MODULES or target == layer or target not in LAYER_RANK:
                continue
            if LAYER_RANK[target] >= LAYER_RANK[layer]:
                violations.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not violations, "upward or sideways imports:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("layer", "source", "expect_violation"),
    [("core", "from gossamer.train import loop", True), ("train", "import gossamer.core", False)],
)
def test_checker_catches_upward_imports(
    tmp_path: Path, layer: str, source: str, expect_violation: bool
) -> None:
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    targets = [name.split(".")[1] for _, name in _imports(path)]
    upward = any(LAYER_RANK[t] >= LAYER_RANK[layer] for t in targets if t != layer)
    assert upward is expect_violation
