"""The package's import graph: the config schema is a leaf, inference never imports the trainer, no cycles.

Every import statement counts, also those inside functions (a lazy import is still a dependency)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vitdiff"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The vitdiff modules a file imports (``from . import x`` resolves to module x where x is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vitdiff"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("vitdiff"):
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
    found.discard(name)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in files}
    return {module_name(path): imported_modules(path, modules) for path in files}


def test_config_is_a_leaf():
    assert import_graph()["vitdiff.config"] == set()


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_inference_never_imports_the_trainer():
    graph = import_graph()
    for entry in ("vitdiff.generate", "vitdiff.sample_cli", "vitdiff.evaluate", "vitdiff.build"):
        assert "vitdiff.trainer" not in reachable(graph, entry), entry


def test_no_import_cycle():
    graph = import_graph()
    # Package __init__ files re-export their submodules; a submodule importing its package's names is not a cycle.
    edges = {name: {target for target in imports if not (name.startswith(target + ".") and target in graph)}
             for name, imports in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
