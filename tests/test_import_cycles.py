"""The package's import graph has no cycle, between modules or between subpackages: every import
counts, including those inside functions (a lazy import still ties the two modules together)."""

import ast
from pathlib import Path

import longcat_train

PACKAGE = Path(longcat_train.__file__).parent


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports (a `from X import name` counts as X.name when
    that is a module, else as X)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (found := visit(successor)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph(level: int | None) -> dict[str, set[str]]:
    """Edges between modules (`level` None) or between their first `level` name parts."""
    modules = _module_names()
    group = (lambda name: name) if level is None else (lambda name: ".".join(name.split(".")[:level]))
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        for target in _imports(module, path, modules):
            if group(module) != group(target):
                graph.setdefault(group(module), set()).add(group(target))
    return graph


def test_the_walk_sees_relative_lazy_and_absolute_imports_and_finds_cycles():
    graph = _graph(None)
    assert "longcat_train.objective.loss" in graph["longcat_train.training.loop"]  # from ..objective.loss
    assert "longcat_train.model.bsa" in graph["longcat_train.model.attention"]  # inside a function
    assert "longcat_train.model.bsa_kernels" in graph["longcat_train.model.bsa"]  # from longcat_train.model import
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_modules():
    assert _cycle(_graph(None)) is None


def test_no_import_cycle_between_subpackages():
    assert _cycle(_graph(2)) is None
