"""The layers of docs/architecture.md, checked: imports point down, no cycles, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lorag"
MAX_LINES = 400

# Lowest first. A module's layer is the first prefix that matches its dotted name.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (1, ("lorag.config", "lorag.cli_options", "lorag.errors", "lorag.logging", "lorag.paths", "lorag.schema",
         "lorag.knowledge.settings", "lorag.plugins.settings", "lorag.serving.settings", "lorag.models.names",
         "lorag.fleet.settings", "lorag.lanes", "lorag.finetune.settings", "lorag.server.pagination", "lorag.loop.settings",
         "lorag.loop.grader_settings")),
    (2, ("lorag.adapters", "lorag.knowledge", "lorag.models", "lorag.plugins", "lorag.loop", "lorag.state")),
    (3, ("lorag.engine", "lorag.fleet")),
    (4, ("lorag.serving", "lorag.finetune")),
    (5, ("lorag.server", "lorag.evaluation", "lorag.improve")),
    (6, ("lorag.cli", "lorag.chat", "lorag.demo")),
]


def layer_of(module: str) -> int:
    if module == "lorag":
        return 0  # the package itself: __version__
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to docs/architecture.md and LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every lorag module `path` imports, at the top or inside functions (lazily) alike."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


GRAPH = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}


def test_every_module_is_in_a_layer() -> None:
    for name in GRAPH:
        layer_of(name)


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
                    for name, targets in GRAPH.items() for target in targets
                    if layer_of(target) > layer_of(name))
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    """Between modules, counting lazy imports too; a package's __init__ is not a cycle with its children."""
    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in GRAPH[node]:
                if target == start:
                    return [*path, start]
                if target not in path and not start.startswith(target + "."):
                    stack.append((target, [*path, target]))
        return None

    for name in GRAPH:
        cycle = cycle_from(name)
        parent_package = cycle is not None and any(a.startswith(b + ".") or b.startswith(a + ".")
                                                   for a, b in zip(cycle, cycle[1:], strict=False))
        assert cycle is None or parent_package, " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_modules_stay_small(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines (split it by job)"


def test_every_llama_index_dependency_of_the_package_is_imported_by_it() -> None:
    """`pip install lorag` pulls no llama-index package lorag does not use (tests and benchmarks: `dev`)."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = [dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]]
    modules = {name: "llama_index." + name.removeprefix("llama-index-").replace("-", ".", 1).replace("-", "_")
               for name in names if name.startswith("llama-index-")}
    assert "llama-index-core" in modules
    source = "\n".join(path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py"))
    unused = [name for name, module in modules.items() if module not in source]
    assert not unused, f"declared but never imported by lorag: {unused}"
