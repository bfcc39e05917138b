"""The layers depend downwards only, and nothing in celeriac imports celery or kombu.

Order, bottom up: exceptions/states/utils, codecs, protocol, brokers and backends, app, worker,
cli/contrib. A module may import its own layer and those below, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import celeriac

PACKAGE = Path(celeriac.__file__).parent

LAYER = {
    "exceptions": 0,
    "states": 0,
    "utils": 0,
    "_portal": 0,
    "signals": 0,
    "codecs": 1,
    "protocol": 2,
    "brokers": 3,
    "backends": 3,
    "app": 4,
    "worker": 5,
    "cli": 6,
    "contrib": 6,
    "__init__": 6,
    "__main__": 6,
}


def _layer_of(module: str) -> int:
    return LAYER[module.split(".")[1]] if "." in module else LAYER["__init__"]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_every_module_belongs_to_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert top in LAYER, f"{path} is in no layer; add it to LAYER"


def test_dependencies_point_down_and_never_to_celery() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        own = LAYER[top]
        for name in _imports(path):
            root = name.split(".")[0]
            if root in ("celery", "kombu"):
                problems.append(f"{rel} imports {name}")
            if root == "celeriac" and "." in name and _layer_of(name) > own:
                problems.append(f"{rel} (layer {own}) imports {name} (layer {_layer_of(name)})")
    assert problems == []
