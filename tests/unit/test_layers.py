"""The layers, as the imports show them: core below serving and training, neither above the other."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imports(package: str) -> dict[str, set[str]]:
    """Module path -> every module name it imports (top-level and lazily, inside functions)."""
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        if "v1" in path.relative_to(REPO).parts:
            continue  # generated gRPC code
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def _offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {
        module: sorted(n for n in names if n.split(".")[0] in forbidden or n.startswith(forbidden))
        for module, names in _imports(package).items()
        if any(n.split(".")[0] in forbidden or n.startswith(forbidden) for n in names)
    }


def test_serving_never_imports_training() -> None:
    assert _offending("router", ("training",)) == {}


def test_the_core_needs_neither_transport_nor_training_libraries() -> None:
    forbidden = ("grpc", "google", "router.serving", "router.v1", "router.cli", "torch", "lightgbm", "pandas")
    assert _offending("router/core", forbidden) == {}


def test_training_does_not_reach_into_serving_internals() -> None:
    assert _offending("training", ("router.serving", "router.cli")) == {}
